// The CPU selective scan: one sequential recurrence per (sequence, channel), its state loops
// written so that the compiler vectorizes them (checked in the assembly: see csrc/README.md).
//
// Included by each scan_cpu_<isa>.cpp after `#pragma GCC target(...)`. Everything here has
// internal linkage, so each translation unit keeps its own copy compiled for its instruction
// set, and includes nothing but <cmath>/<cstdint> (included before the pragma).
//
//   dt_t = softplus(dt_scale * delta_t + bias)            (threshold 20, optional)
//   h_t  = exp(dt_t A) h_{t-1} + dt_t u_t b_scale B_t
//   out  = (c_scale <C_t, h_t> + D u_t) * silu(z_t)
// The backward walks each chunk in reverse after recomputing the chunk's states, decays and
// steps from the state the forward saved at the chunk's start.

namespace ssm_kernels {
namespace cpu {
namespace {

// State loops run over P = d_state rounded up to whole blocks of kWidth (64 bytes) lanes.
template <typename R> struct Lanes;
template <> struct Lanes<float> { static constexpr int kWidth = 16; };
template <> struct Lanes<double> { static constexpr int kWidth = 8; };

inline float from_bits(uint32_t b) { float f; __builtin_memcpy(&f, &b, 4); return f; }
inline uint32_t to_bits(float f) { uint32_t b; __builtin_memcpy(&b, &f, 4); return b; }
inline double from_bits(uint64_t b) { double f; __builtin_memcpy(&f, &b, 8); return f; }
inline uint64_t to_bits(double f) { uint64_t b; __builtin_memcpy(&b, &f, 8); return b; }

// exp without a libm call, so that a loop over states vectorizes: 2^k exp(r) with |r| <= ln2/2;
// inf, -inf, NaN, overflow and underflow as std::exp. 2^k is applied as two factors so that
// neither leaves the normal range where the result does not.
inline float exp_lanes(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low bits
  const bool nan = x != x;
  const float xc = nan ? 0.0f : (x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x));
  const float t = xc * 1.44269504088896341f + magic;
  const float kf = t - magic;
  const int32_t k = static_cast<int32_t>(to_bits(t) - to_bits(magic));
  float r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;  // minimax polynomial of exp on [-ln2/2, ln2/2], as in Cephes' expf
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * (r * r) + r) + 1.0f;
  const int32_t k1 = k >> 1, k2 = k - k1;
  const float res = (e * from_bits(static_cast<uint32_t>(k1 + 127) << 23)) * from_bits(static_cast<uint32_t>(k2 + 127) << 23);
  return nan ? x : res;
}

inline double exp_lanes(double x) {
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const bool nan = x != x;
  const double xc = nan ? 0.0 : (x < -746.0 ? -746.0 : (x > 710.0 ? 710.0 : x));
  const double t = xc * 1.4426950408889634 + magic;
  const double kf = t - magic;
  const int64_t k = static_cast<int64_t>(to_bits(t) - to_bits(magic));
  double r = xc - kf * 6.93145751953125e-1;
  r = r - kf * 1.42860682030941723212e-6;
  // Taylor series to r^13: the remainder is below 1e-17 for |r| <= 0.35
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double e = (p * (r * r) + r) + 1.0;
  const int64_t k1 = k >> 1, k2 = k - k1;
  const double res = (e * from_bits(static_cast<uint64_t>(k1 + 1023) << 52)) * from_bits(static_cast<uint64_t>(k2 + 1023) << 52);
  return nan ? x : res;
}

// log for x >= 1 (all softplus needs), vectorizable: x = m 2^k with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh((m - 1) / (m + 1)) as an odd series; inf stays inf
template <typename R, typename U, int kMantissa, int kBias, int kTerms>
inline R log_from_one(R x) {
  const U bits = to_bits(x);
  U k = (bits >> kMantissa) - U(kBias);
  R m = from_bits((bits & ((U(1) << kMantissa) - 1)) | (U(kBias) << kMantissa));  // in [1, 2)
  const bool big = m > R(1.4142135623730951);
  m = big ? m * R(0.5) : m;
  k = big ? k + 1 : k;
  const R s = (m - R(1)) / (m + R(1)), s2 = s * s;
  R p = R(1) / R(2 * kTerms + 1);
#pragma GCC unroll 16
  for (int j = kTerms - 1; j >= 0; --j) p = p * s2 + R(1) / R(2 * j + 1);
  const R res = R(2) * s * p + static_cast<R>(static_cast<typename std::make_signed<U>::type>(k)) * R(0.6931471805599453);
  return x > R(3.0e38) ? x : res;
}
inline float log_lanes(float x) { return log_from_one<float, uint32_t, 23, 127, 6>(x); }
inline double log_lanes(double x) { return log_from_one<double, uint64_t, 52, 1023, 11>(x); }

template <typename R> inline R sigmoid_lanes(R x) { return R(1) / (R(1) + exp_lanes(-x)); }

// dt and (dsp not null: the backward) d dt / d pre-activation for `count` steps, vectorized over the steps. softplus(x) =
// log1p(e^x) for x <= 20 (else x), log1p(e) = log(w) - ((w - 1) - e) / w with w = 1 + e (exact
// for tiny e, where w rounds to 1). Two loops: one would be too many selects to vectorize.
template <typename R>
inline void discretize(const ScanArgs<R>& a, const R* __restrict delta, R bias, int64_t count, R* __restrict dt,
                       R* __restrict dsp) {
  const R scale = a.dt_scale;
  if (!a.softplus) {
    for (int64_t k = 0; k < count; ++k) dt[k] = delta[k] * scale + bias;
    if (dsp)
      for (int64_t k = 0; k < count; ++k) dsp[k] = R(1);
    return;
  }
#pragma GCC ivdep
  for (int64_t k = 0; k < count; ++k) {
    const R pre = delta[k] * scale + bias;
    const R e = exp_lanes(pre), w = R(1) + e;
    const R log1p_e = log_lanes(w) - ((w - R(1)) - e) / w;
    dt[k] = pre > R(20) ? pre : log1p_e;
  }
  if (!dsp) return;
#pragma GCC ivdep
  for (int64_t k = 0; k < count; ++k) {
    const R pre = delta[k] * scale + bias;
    const R sig = sigmoid_lanes(pre);
    dsp[k] = pre > R(20) ? R(1) : sig;
  }
}

// sigmoid(z) for `count` steps
template <typename R>
inline void gate_sigmoid(const R* __restrict z, int64_t count, R* __restrict sig) {
#pragma GCC ivdep
  for (int64_t k = 0; k < count; ++k) sig[k] = sigmoid_lanes(z[k]);
}

template <typename R>
inline R lane_sum(R* part) {  // a fixed order: results do not depend on the thread count
  constexpr int W = Lanes<R>::kWidth;
  for (int half = W / 2; half >= 1; half /= 2)
    for (int w = 0; w < half; ++w) part[w] += part[w + half];
  return part[0];
}

// h = exp(dt A) h + x B over all P states; returns <h, C>. The padding states stay exactly 0
// (selected, not multiplied: x = inf times a padded B of 0 would be NaN and reach the sums).
template <typename R>
inline R advance(R* __restrict h, const R* __restrict A, const R* __restrict B, const R* __restrict C, R dt, R x,
                 int64_t N, int64_t P) {
  constexpr int W = Lanes<R>::kWidth;
  alignas(64) R part[W] = {};
  for (int64_t n0 = 0; n0 < P; n0 += W) {
#pragma GCC ivdep
    for (int w = 0; w < W; ++w) {
      const R value = exp_lanes(dt * A[n0 + w]) * h[n0 + w] + x * B[n0 + w];
      const R hn = n0 + w < N ? value : R(0);
      h[n0 + w] = hn;
      part[w] += hn * C[n0 + w];
    }
  }
  return lane_sum(part);
}

template <typename R>
inline void load_state(R* __restrict h, const R* __restrict src, int64_t N, int64_t P) {
  for (int64_t n = 0; n < P; ++n) h[n] = (src != nullptr && n < N) ? src[n] : R(0);
}

template <typename R>
inline void store_state(R* __restrict dst, const R* __restrict h, int64_t N) {
  for (int64_t n = 0; n < N; ++n) dst[n] = h[n];
}

struct Channel {
  int64_t seq, d, b, g, t_begin, t_end, slot;
};

template <typename R>
inline Channel channel(const ScanArgs<R>& a, int64_t s, int64_t d) {
  return {s, d, a.seqs.batch[s], d / (a.dim / a.groups), a.seqs.start[s], a.seqs.end[s], a.seqs.slot[s]};
}

// B or C for channel ch at step t: fixed rows do not move with t
template <typename R>
inline const R* state_matrix(const ScanArgs<R>& a, const R* X, bool fixed, const Channel& ch) {
  return fixed ? X + ch.d * a.d_pad : X + (ch.b * a.groups + ch.g) * a.seqlen * a.d_pad;
}

// Task: one (sequence, channel).
template <typename R>
void forward_task(const ScanArgs<R>& a, int64_t task, R* scratch) {
  const Channel ch = channel(a, task / a.dim, task % a.dim);
  const int64_t P = a.d_pad, N = a.d_state, L = a.seqlen;
  const int64_t row = (ch.b * a.dim + ch.d) * L;
  const R* A = a.A + ch.d * P;
  const R* B = state_matrix(a, a.B, a.B_fixed, ch);
  const R* C = state_matrix(a, a.C, a.C_fixed, ch);
  const int64_t b_step = a.B_fixed ? 0 : P, c_step = a.C_fixed ? 0 : P;
  const R D = a.D ? a.D[ch.d] : R(0), bias = a.bias ? a.bias[ch.d] : R(0);
  R* h = scratch;
  load_state(h, a.h0 ? a.h0 + (ch.seq * a.dim + ch.d) * N : nullptr, N, P);
  R* states = a.states + ((ch.b * a.dim + ch.d) * a.n_slots + ch.slot) * N;
  R* dts = h + P;             // the chunk's dt and sigmoid(z): T each
  R* sigs = dts + a.chunk;
  for (int64_t t0 = ch.t_begin; t0 < ch.t_end; t0 += a.chunk) {
    const int64_t steps = t0 + a.chunk < ch.t_end ? a.chunk : ch.t_end - t0;
    store_state(states, h, N);
    states += N;
    discretize(a, a.delta + row + t0, bias, steps, dts, static_cast<R*>(nullptr));
    if (a.z) gate_sigmoid(a.z + row + t0, steps, sigs);
    for (int64_t k = 0; k < steps; ++k) {
      const int64_t t = t0 + k;
      const R ut = a.u[row + t];
      R y = advance(h, A, B + t * b_step, C + t * c_step, dts[k], dts[k] * ut * a.b_scale, N, P) * a.c_scale + D * ut;
      if (a.z) y *= a.z[row + t] * sigs[k];
      a.out[row + t] = y;
    }
  }
  store_state(a.last + (ch.seq * a.dim + ch.d) * N, h, N);
}

// Task: one (sequence, group, block of `a.block` channels of the group), so that the channels
// sharing a variable B/C row add their dB/dC into one partial in a fixed order.
template <typename R>
void backward_task(const ScanArgs<R>& a, int64_t task, R* scratch) {
  constexpr int W = Lanes<R>::kWidth;
  const int64_t dpg = a.dim / a.groups, n_blocks = (dpg + a.block - 1) / a.block;
  const int64_t s = task / (a.groups * n_blocks), g = (task / n_blocks) % a.groups, j = task % n_blocks;
  const int64_t P = a.d_pad, N = a.d_state, L = a.seqlen, T = a.chunk;
  const int64_t d_first = g * dpg + j * a.block;
  const int64_t d_end = g * dpg + (j + 1 < n_blocks ? (j + 1) * a.block : dpg);
  R* adj = scratch;               // dL/dh, P
  R* hist = adj + P;              // the chunk's states, (T + 1) x P; row 0 enters the chunk
  R* decay = hist + (T + 1) * P;  // exp(dt A) per step, T x P
  R* dA = decay + T * P;          // P
  R* dB_fixed = dA + P;           // P
  R* dC_fixed = dB_fixed + P;     // P
  R* dts = dC_fixed + P;          // T
  R* dsps = dts + T;              // T
  R* ys = dsps + T;               // T: y before the gate
  R* sigs = ys + T;               // T: sigmoid(z)
  const int64_t b = a.seqs.batch[s], t_begin = a.seqs.start[s], t_end = a.seqs.end[s];
  // this block's variable dB/dC partial rows, zeroed over the sequence's steps, then summed into
  const int64_t part_row = ((j * a.batch + b) * a.groups + g) * L * P;
  R* dB_var = a.B_fixed ? nullptr : a.dB + part_row;
  R* dC_var = a.C_fixed ? nullptr : a.dC + part_row;
  for (int64_t i = t_begin * P; i < t_end * P; ++i) {
    if (dB_var) dB_var[i] = R(0);
    if (dC_var) dC_var[i] = R(0);
  }

  for (int64_t d = d_first; d < d_end; ++d) {
    const Channel ch = channel(a, s, d);
    const int64_t row = (b * a.dim + d) * L;
    const R* A = a.A + d * P;
    const R* B = state_matrix(a, a.B, a.B_fixed, ch);
    const R* C = state_matrix(a, a.C, a.C_fixed, ch);
    const int64_t b_step = a.B_fixed ? 0 : P, c_step = a.C_fixed ? 0 : P;
    const R D = a.D ? a.D[d] : R(0), bias = a.bias ? a.bias[d] : R(0);
    const int64_t state_row = (s * a.dim + d) * N;
    load_state(adj, a.dlast ? a.dlast + state_row : nullptr, N, P);
    for (int64_t n = 0; n < P; ++n) dA[n] = dB_fixed[n] = dC_fixed[n] = R(0);
    R dD = 0, dbias = 0;
    const R* states = a.states + ((b * a.dim + d) * a.n_slots + ch.slot) * N;
    const int64_t n_chunks = (t_end - t_begin + T - 1) / T;
    for (int64_t c = n_chunks - 1; c >= 0; --c) {
      const int64_t t0 = t_begin + c * T, steps = (t0 + T < t_end ? T : t_end - t0);
      // recompute the chunk's states from the saved one
      load_state(hist, states + c * N, N, P);
      discretize(a, a.delta + row + t0, bias, steps, dts, dsps);
      if (a.z) gate_sigmoid(a.z + row + t0, steps, sigs);
      for (int64_t k = 0; k < steps; ++k) {
        const int64_t t = t0 + k;
        const R dtk = dts[k];
        const R x = dtk * a.u[row + t] * a.b_scale;
        const R* Bt = B + t * b_step;
        R* prev = hist + k * P;
        R* next = prev + P;
        R* ak = decay + k * P;
#pragma GCC ivdep
        for (int64_t n = 0; n < P; ++n) {
          ak[n] = exp_lanes(dtk * A[n]);
          const R value = ak[n] * prev[n] + x * Bt[n];
          next[n] = n < N ? value : R(0);  // padding stays 0, as in advance()
        }
        if (a.z) {
          alignas(64) R part[W] = {};
          const R* Ct = C + t * c_step;
          for (int64_t n0 = 0; n0 < P; n0 += W)
#pragma GCC ivdep
            for (int w = 0; w < W; ++w) part[w] += next[n0 + w] * Ct[n0 + w];
          ys[k] = lane_sum(part) * a.c_scale + D * a.u[row + t];
        }
      }
      // the adjoint recurrence, last step first
      for (int64_t k = steps - 1; k >= 0; --k) {
        const int64_t t = t0 + k;
        const R ut = a.u[row + t], dt = dts[k], dout = a.dout[row + t];
        R dy = dout;
        if (a.z) {
          const R zt = a.z[row + t], sz = sigs[k];
          a.dz[row + t] = dout * ys[k] * sz * (R(1) + zt * (R(1) - sz));
          dy = dout * zt * sz;
        }
        dD += dy * ut;
        const R dyc = dy * a.c_scale, dtu = dt * ut * a.b_scale;
        const R* Bt = B + t * b_step;
        const R* Ct = C + t * c_step;
        const R* prev = hist + k * P;
        const R* next = prev + P;
        const R* ak = decay + k * P;
        R* dBt = dB_var ? dB_var + t * P : dB_fixed;
        R* dCt = dC_var ? dC_var + t * P : dC_fixed;
        alignas(64) R sum_decayed[W] = {};  // sum_n g a h_{t-1} A
        alignas(64) R sum_input[W] = {};    // sum_n g B
        for (int64_t n0 = 0; n0 < P; n0 += W) {
#pragma GCC ivdep
          for (int w = 0; w < W; ++w) {
            const int64_t n = n0 + w;
            const R sum = adj[n] + dyc * Ct[n];
            const R gn = n < N ? sum : R(0);
            dCt[n] += dyc * next[n];
            // a_t h_{t-1} as a product: h_t - x_t would cancel under strong decay
            const R gah = gn * (ak[n] * prev[n]);
            dA[n] += gah * dt;
            sum_decayed[w] += gah * A[n];
            sum_input[w] += gn * Bt[n];
            dBt[n] += gn * dtu;
            adj[n] = gn * ak[n];
          }
        }
        const R s_decayed = lane_sum(sum_decayed), s_input = lane_sum(sum_input);
        a.du[row + t] = dy * D + s_input * a.b_scale * dt;
        const R d_pre = (s_decayed + s_input * a.b_scale * ut) * dsps[k];
        a.ddelta[row + t] = d_pre * a.dt_scale;
        dbias += d_pre;
      }
    }
    store_state(a.dh0 + state_row, adj, N);
    const int64_t part = (s * a.dim + d) * P;
    for (int64_t n = 0; n < P; ++n) a.dA[part + n] = dA[n];
    if (a.B_fixed)
      for (int64_t n = 0; n < P; ++n) a.dB[part + n] = dB_fixed[n];
    if (a.C_fixed)
      for (int64_t n = 0; n < P; ++n) a.dC[part + n] = dC_fixed[n];
    if (a.dD) a.dD[s * a.dim + d] = dD;
    if (a.dbias) a.dbias[s * a.dim + d] = dbias;
  }
}

#define SSMK_DEFINE_ISA(isa)                                                                                   \
  void forward_##isa(const ScanArgs<float>& a, int64_t task, float* scratch) { forward_task(a, task, scratch); }    \
  void forward_##isa(const ScanArgs<double>& a, int64_t task, double* scratch) { forward_task(a, task, scratch); }  \
  void backward_##isa(const ScanArgs<float>& a, int64_t task, float* scratch) { backward_task(a, task, scratch); }  \
  void backward_##isa(const ScanArgs<double>& a, int64_t task, double* scratch) { backward_task(a, task, scratch); }

}  // namespace
}  // namespace cpu
}  // namespace ssm_kernels
