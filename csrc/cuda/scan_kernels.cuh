// CUDA selective scan, forward and backward: the design the static model favours (see
// csrc/README.md). No torch header: this file compiles
// alone for the static model (scan_kernels_sm90.cu) and inside the extension (scan_cuda.cu).
//
// A thread owns NS consecutive states of one channel and runs the recurrence sequentially in
// time, the states in registers; the S = P / NS threads of a channel are neighbouring lanes and
// join y (and, backward, the sums over states) with S-1 shuffle rounds. A block covers channels
// of one (sequence, group), so they share variable B/C: each 8-step tile of B and C is staged in
// shared memory once per block, states last, and read with vector loads.
// The forward saves the state every kChunk = 8 steps; the backward recomputes a tile's states and
// decays in registers from the saved state and runs the adjoint recurrence over it in reverse.
// Variable dB/dC sum over the channels of a group: a transpose-reduction across the channel lanes
// of a warp (each lane ends with its share of the sums), then a fixed-order sum over the warps of
// the block into a per-block partial that the caller sums: deterministic, no atomics.
#pragma once
#include <cstdint>
#ifdef SSMK_EMULATE  // the kernels on the CPU, for tests (emulate.h)
#include "emulate.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace ssm_kernels {
namespace cuda {

constexpr int kChunk = 8;      // steps per tile and between saved states
constexpr int kThreads = 128;  // per block
constexpr unsigned kFull = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Params {
  int batch, dim, seqlen, d_state, groups, n_slots, n_seqs;
  const int64_t* seqs;  // (4, n_seqs): batch row, start, end, first saved-state slot
  bool softplus, B_fixed, C_fixed;
  float dt_scale, b_scale, c_scale;
  const void *u, *delta, *z;    // (batch, dim, L) in T
  const void *B, *C;            // variable: (batch, G, N, L) in TB; fixed: (dim, N) float
  const float *A, *D, *bias;    // (dim, N), (dim,), (dim,)
  const float* h0;              // (n_seqs, dim, N) or null
  float* states;                // (batch, dim, n_slots, N)
  void* out;                    // (batch, dim, L) in T
  float* last;                  // (n_seqs, dim, N)
  // backward
  const void* dout;             // (batch, dim, L) in T
  const float* dlast;           // (n_seqs, dim, N) or null
  void *du, *ddelta, *dz;       // (batch, dim, L) in T
  float *dA, *dB, *dC, *dD, *dbias, *dh0;  // partials, see scan_cuda.cu
  int n_cblocks;                // channel blocks per group (the variable dB/dC partials)
};

// 8 consecutive steps of a (.., L) row from step t, count of them valid (the rest 0); one vector
// load when the row is aligned (the branch is uniform across a block)
template <typename T>
__device__ __forceinline__ void load8(const T* p, int count, bool aligned, float (&v)[kChunk]) {
  if (aligned && count == kChunk) {
    if (sizeof(T) == 2) {
      uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) v[k] = to_float(e[k]);
    } else {
      float4 lo = reinterpret_cast<const float4*>(p)[0], hi = reinterpret_cast<const float4*>(p)[1];
      v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w; v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k) v[k] = k < count ? to_float(p[k]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void store8(T* p, int count, bool aligned, const float (&v)[kChunk]) {
  if (aligned && count == kChunk && sizeof(T) == 2) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) e[k] = from_float<T>(v[k]);
    *reinterpret_cast<uint4*>(p) = raw;
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k)
    if (k < count) p[k] = from_float<T>(v[k]);
}

// sum over the S lanes of a channel (neighbours): every one of them gets it
template <int S>
__device__ __forceinline__ float channel_sum(float x) {
#pragma unroll
  for (int m = 1; m < S; m <<= 1) x += __shfl_xor_sync(kFull, x, m);
  return x;
}

// Where a thread works: which (sequence, group, channel block) its block covers, its channel and
// its states. Lanes past the group's last channel compute on zeros and store nothing.
template <int NS, int S>
struct Place {
  int seq, b, g, d, slice, t_begin, t_end, slot, cblock;
  bool active;
  __device__ Place(const Params& p) {
    constexpr int channels = kThreads / S;
    const int dpg = p.dim / p.groups;
    const int n_cblocks = (dpg + channels - 1) / channels;
    cblock = blockIdx.x % n_cblocks;
    g = (blockIdx.x / n_cblocks) % p.groups;
    seq = blockIdx.x / (n_cblocks * p.groups);
    const int c = cblock * channels + threadIdx.x / S;
    active = c < dpg;
    d = g * dpg + (active ? c : 0);
    slice = threadIdx.x % S;
    b = static_cast<int>(p.seqs[seq]);
    t_begin = static_cast<int>(p.seqs[p.n_seqs + seq]);
    t_end = static_cast<int>(p.seqs[2 * p.n_seqs + seq]);
    slot = static_cast<int>(p.seqs[3 * p.n_seqs + seq]);
  }
};

// 8-step tiles of variable B or C for the block's (batch row, group) in shared memory, states last:
// tile[k * P + n], zero past N and past the sequence's end. Each thread stages kPer entries of a
// tile (consecutive threads walk time: coalesced reads), its pointers computed once.
template <typename TB, int P>
struct TileStager {
  static constexpr int kPer = (kChunk * P + kThreads - 1) / kThreads;
  const TB* src[kPer];
  int dst[kPer], k[kPer];
  bool ok[kPer];
  __device__ TileStager(const Params& p, const void* X, int b, int g) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int e = threadIdx.x + j * kThreads, n = e / kChunk;
      k[j] = e % kChunk;
      ok[j] = e < kChunk * P && n < p.d_state;
      dst[j] = k[j] * P + n;
      src[j] = static_cast<const TB*>(X) + ((int64_t)(b * p.groups + g) * p.d_state + (ok[j] ? n : 0)) * p.seqlen + k[j];
    }
  }
  __device__ __forceinline__ void stage(int t0, int count, float* tile) const {
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (threadIdx.x + j * kThreads < kChunk * P) tile[dst[j]] = (ok[j] && k[j] < count) ? to_float(src[j][t0]) : 0.f;
  }
};

// Step k's B (or C) for this thread's NS states: the fixed values, or float4 reads of the tile
template <int NS, int P>
__device__ __forceinline__ void state_row(bool fixed, const float (&fixed_values)[NS], const float* tile, int k,
                                          int n0, float (&out)[NS]) {
  if (fixed) {
#pragma unroll
    for (int i = 0; i < NS; ++i) out[i] = fixed_values[i];
    return;
  }
  const float4* row = reinterpret_cast<const float4*>(tile + k * P + n0);
#pragma unroll
  for (int q = 0; q < NS / 4; ++q) {
    const float4 v = row[q];
    out[4 * q] = v.x; out[4 * q + 1] = v.y; out[4 * q + 2] = v.z; out[4 * q + 3] = v.w;
  }
}

template <int NS>
__device__ __forceinline__ void load_states(const float* src, int n0, int N, float (&x)[NS], const float* base) {
#pragma unroll
  for (int i = 0; i < NS; ++i) x[i] = (base != nullptr && n0 + i < N) ? src[n0 + i] : 0.f;
}

// 2^x in one MUFU.EX2 (flushing results below 2^-126 to 0: decays that small are 0 anyway)
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef SSMK_EMULATE
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
__device__ __forceinline__ float exp_approx(float x) { return exp2_approx(x * 1.4426950408889634f); }
// softplus(x) = max(x, 0) + log1p(e), e = e^-|x| in (0, 1], for x <= 20: log1p(e) = 2 atanh(s),
// s = e / (2 + e) in [0, 1/3], an odd series to s^15 (relative error below 1e-7), exact as e -> 0;
// no log1pf call. (With e = e^x instead, s reaches 1 for x > 0 and the series is far off: the
// emulated kernels' first run against the reference showed it.)
__device__ __forceinline__ float softplus(float x) {
  const float e = exp_approx(-fabsf(x));
  const float s = __fdividef(e, 2.f + e), s2 = s * s;
  float p = 1.f / 15.f;
  p = p * s2 + 1.f / 13.f;
  p = p * s2 + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return x <= 20.f ? fmaxf(x, 0.f) + 2.f * s * p : x;
}
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + exp_approx(-x)); }

// dt and d dt / d pre-activation for M steps (a tile, or a lane's share of one)
template <int M>
__device__ __forceinline__ void discretize(const Params& p, float bias, const float (&delta)[M], float (&dt)[M],
                                           float (&dsp)[M]) {
#pragma unroll
  for (int k = 0; k < M; ++k) {
    const float pre = delta[k] * p.dt_scale + bias;
    dt[k] = p.softplus ? softplus(pre) : pre;
    dsp[k] = (p.softplus && pre <= 20.f) ? sigmoid(pre) : 1.f;
  }
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxDState = 128;  // the backward's shared memory (red) grows with it

// States per thread (NS) and threads per channel (S) for d_state N: the forward keeps 8 states a
// thread; the backward 4 (it holds a tile's states and decays), with at least 16 per channel so
// that a step's dB and dC (2 NS values) cover the 32 / S lanes of the transpose-reduction.
__host__ __device__ constexpr int next_pow2(int x) { return x <= 1 ? 1 : 2 * next_pow2((x + 1) / 2); }
__host__ __device__ constexpr int fwd_slices(int N) { return next_pow2((N + 7) / 8); }
__host__ __device__ constexpr int bwd_slices(int N) { return next_pow2((N + 3) / 4) < 4 ? 4 : next_pow2((N + 3) / 4); }
__host__ __device__ constexpr int channel_blocks(int dpg, int slices) {
  return (dpg + kThreads / slices - 1) / (kThreads / slices);
}

template <typename T, typename TB, int NS, int S>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(Params p) {
  constexpr int P = NS * S;
  __shared__ float B_tile[kChunk * P], C_tile[kChunk * P];
  const Place<NS, S> w(p);
  const int N = p.d_state, n0 = w.slice * NS;
  const int64_t row = ((int64_t)w.b * p.dim + w.d) * p.seqlen;
  const T* u = static_cast<const T*>(p.u) + row;
  const T* delta = static_cast<const T*>(p.delta) + row;
  const T* z = p.z ? static_cast<const T*>(p.z) + row : nullptr;
  T* out = static_cast<T*>(p.out) + row;
  float A2[NS], h[NS], Bf[NS], Cf[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const bool ok = n0 + i < N;
    A2[i] = ok ? p.A[w.d * N + n0 + i] * kLog2e : 0.f;
    Bf[i] = (ok && p.B_fixed) ? static_cast<const float*>(p.B)[w.d * N + n0 + i] : 0.f;
    Cf[i] = (ok && p.C_fixed) ? static_cast<const float*>(p.C)[w.d * N + n0 + i] : 0.f;
  }
  const int64_t srow = (int64_t)w.seq * p.dim + w.d;
  load_states<NS>(p.h0 ? p.h0 + srow * N : nullptr, n0, N, h, (w.active && p.h0) ? p.h0 : nullptr);
  const float D = p.D ? p.D[w.d] : 0.f, bias = p.bias ? p.bias[w.d] : 0.f;
  float* states = p.states + (((int64_t)w.b * p.dim + w.d) * p.n_slots + w.slot) * N;
  const TileStager<TB, P> B_stager(p, p.B, w.b, w.g), C_stager(p, p.C, w.b, w.g);
  for (int t0 = w.t_begin; t0 < w.t_end; t0 += kChunk) {
    const int count = min(kChunk, w.t_end - t0);
    const bool aligned = ((row + t0) % kChunk) == 0;
    if (w.active)
#pragma unroll
      for (int i = 0; i < NS; ++i)
        if (n0 + i < N) states[n0 + i] = h[i];
    states += N;
    float uk[kChunk], dk[kChunk], zk[kChunk], dt[kChunk], dsp[kChunk], y[kChunk];
    load8(u + t0, w.active ? count : 0, aligned, uk);  // inactive lanes: u = 0, so h stays 0
    load8(delta + t0, count, aligned, dk);
    if (z) load8(z + t0, count, aligned, zk);
    discretize(p, bias, dk, dt, dsp);
    if (!p.B_fixed) B_stager.stage(t0, count, B_tile);
    if (!p.C_fixed) C_stager.stage(t0, count, C_tile);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (k >= count) break;  // past the sequence's end (uniform across the block)
      const float x = dt[k] * uk[k] * p.b_scale;
      float Bk[NS], Ck[NS], acc = 0.f;
      state_row<NS, P>(p.B_fixed, Bf, B_tile, k, n0, Bk);
      state_row<NS, P>(p.C_fixed, Cf, C_tile, k, n0, Ck);
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        h[i] = exp2_approx(dt[k] * A2[i]) * h[i] + x * Bk[i];
        acc += h[i] * Ck[i];
      }
      y[k] = channel_sum<S>(acc) * p.c_scale + D * uk[k];
      if (z) y[k] *= zk[k] * sigmoid(zk[k]);
    }
    __syncthreads();  // the tiles are overwritten next
    if (w.active && w.slice == 0) store8(out + t0, count, aligned, y);
  }
  if (w.active)
#pragma unroll
    for (int i = 0; i < NS; ++i)
      if (n0 + i < N) p.last[srow * N + n0 + i] = h[i];
}

// Sums V values over the lanes that share this lane's slice (xor masks S, 2S, .., 16), leaving
// each lane V / (32 / S) of the sums: those of flat index offset + j, j < V / (32 / S).
template <int V, int S>
__device__ __forceinline__ int transpose_reduce(float (&v)[V], int lane) {
  int offset = 0;
#pragma unroll
  for (int m = S, half = V / 2; m < 32; m <<= 1, half /= 2) {
    const bool upper = lane & m;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const float send = upper ? v[j] : v[j + half];
      const float keep = upper ? v[j + half] : v[j];
      v[j] = keep + __shfl_xor_sync(kFull, send, m);
    }
    offset += upper ? half : 0;
  }
  return offset;
}

template <typename T, typename TB, int NS, int S>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(Params p) {
  constexpr int P = NS * S;
  constexpr int kWarps = kThreads / 32;
  constexpr int V = 2 * NS;                 // dB and dC of a step, per lane
  constexpr int kChannelLanes = 32 / S;     // lanes per warp that share a slice
  static_assert(V % kChannelLanes == 0 || kChannelLanes == 1, "NS too small for this S");
  constexpr int kKept = V / kChannelLanes > 0 ? V / kChannelLanes : 1;
  __shared__ float B_tile[kChunk * P], C_tile[kChunk * P];
  __shared__ float red[kWarps][kChunk][S][V];  // per warp: the step's dB, dC per slice
  const Place<NS, S> w(p);
  const int N = p.d_state, n0 = w.slice * NS, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row = ((int64_t)w.b * p.dim + w.d) * p.seqlen;
  const T* u = static_cast<const T*>(p.u) + row;
  const T* delta = static_cast<const T*>(p.delta) + row;
  const T* z = p.z ? static_cast<const T*>(p.z) + row : nullptr;
  const T* dout = static_cast<const T*>(p.dout) + row;
  T* du = static_cast<T*>(p.du) + row;
  T* ddelta = static_cast<T*>(p.ddelta) + row;
  T* dz = p.dz ? static_cast<T*>(p.dz) + row : nullptr;
  float A[NS], A2[NS], Bf[NS], Cf[NS], adj[NS], dA[NS], dBf[NS], dCf[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const bool ok = n0 + i < N;
    A[i] = ok ? p.A[w.d * N + n0 + i] : 0.f;
    A2[i] = A[i] * kLog2e;
    Bf[i] = (ok && p.B_fixed) ? static_cast<const float*>(p.B)[w.d * N + n0 + i] : 0.f;
    Cf[i] = (ok && p.C_fixed) ? static_cast<const float*>(p.C)[w.d * N + n0 + i] : 0.f;
    dA[i] = dBf[i] = dCf[i] = 0.f;
  }
  const int64_t srow = (int64_t)w.seq * p.dim + w.d;
  load_states<NS>(p.dlast ? p.dlast + srow * N : nullptr, n0, N, adj, (w.active && p.dlast) ? p.dlast : nullptr);
  const float D = p.D ? p.D[w.d] : 0.f, bias = p.bias ? p.bias[w.d] : 0.f;
  float dD = 0.f, dbias = 0.f;
  const float* states = p.states + (((int64_t)w.b * p.dim + w.d) * p.n_slots + w.slot) * N;
  const TileStager<TB, P> B_stager(p, p.B, w.b, w.g), C_stager(p, p.C, w.b, w.g);
  const int n_tiles = (w.t_end - w.t_begin + kChunk - 1) / kChunk;
  for (int c = n_tiles - 1; c >= 0; --c) {
    const int t0 = w.t_begin + c * kChunk, count = min(kChunk, w.t_end - t0);
    const bool aligned = ((row + t0) % kChunk) == 0;
    float uk[kChunk], dk[kChunk], zk[kChunk], gk[kChunk], dt[kChunk], dsp[kChunk];
    load8(u + t0, w.active ? count : 0, aligned, uk);
    load8(delta + t0, count, aligned, dk);
    load8(dout + t0, w.active ? count : 0, aligned, gk);  // inactive lanes: no gradient flows
    if (z) load8(z + t0, count, aligned, zk);
    discretize(p, bias, dk, dt, dsp);
    if (!p.B_fixed) B_stager.stage(t0, count, B_tile);
    if (!p.C_fixed) C_stager.stage(t0, count, C_tile);
    __syncthreads();
    // recompute the tile: hist[k] = state after step t0 + k, hist[-1] = the saved one
    float h_in[NS], hist[kChunk][NS], decay[kChunk][NS], y[kChunk];
    load_states<NS>(states + (int64_t)c * N, n0, N, h_in, w.active ? states : nullptr);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const float x = dt[k] * uk[k] * p.b_scale;
      float Bk[NS], Ck[NS], acc = 0.f;
      state_row<NS, P>(p.B_fixed, Bf, B_tile, k, n0, Bk);
      state_row<NS, P>(p.C_fixed, Cf, C_tile, k, n0, Ck);
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        decay[k][i] = exp2_approx(dt[k] * A2[i]);
        hist[k][i] = decay[k][i] * (k == 0 ? h_in[i] : hist[k - 1][i]) + x * Bk[i];
        acc += hist[k][i] * Ck[i];
      }
      y[k] = z ? channel_sum<S>(acc) * p.c_scale + D * uk[k] : 0.f;
    }
    float du_k[kChunk], dd_k[kChunk], dz_k[kChunk];
#pragma unroll
    for (int k = kChunk - 1; k >= 0; --k) {
      if (k >= count) {  // past the sequence's end (uniform across the block)
        du_k[k] = dd_k[k] = dz_k[k] = 0.f;
        continue;
      }
      float dy = gk[k];
      if (z) {
        const float sz = sigmoid(zk[k]);
        dz_k[k] = gk[k] * y[k] * sz * (1.f + zk[k] * (1.f - sz));
        dy = gk[k] * zk[k] * sz;
      }
      dD += dy * uk[k];
      const float dyc = dy * p.c_scale, dtu = dt[k] * uk[k] * p.b_scale;
      float s_decayed = 0.f, s_input = 0.f, v[V], Bk[NS], Ck[NS];
      state_row<NS, P>(p.B_fixed, Bf, B_tile, k, n0, Bk);
      state_row<NS, P>(p.C_fixed, Cf, C_tile, k, n0, Ck);
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        const float gn = adj[i] + dyc * Ck[i];
        const float prev = k == 0 ? h_in[i] : hist[k - 1][i];
        const float gah = gn * (decay[k][i] * prev);  // a_t h_{t-1} as a product (strong decay)
        dA[i] += gah * dt[k];
        s_decayed += gah * A[i];
        s_input += gn * Bk[i];
        v[i] = gn * dtu;               // dB
        v[NS + i] = dyc * hist[k][i];  // dC
        adj[i] = gn * decay[k][i];
      }
      s_decayed = channel_sum<S>(s_decayed);
      s_input = channel_sum<S>(s_input);
      du_k[k] = dy * D + s_input * p.b_scale * dt[k];
      const float d_pre = (s_decayed + s_input * p.b_scale * uk[k]) * dsp[k];
      dd_k[k] = d_pre * p.dt_scale;
      dbias += d_pre;
      if (p.B_fixed || p.C_fixed) {
#pragma unroll
        for (int i = 0; i < NS; ++i) {
          dBf[i] += v[i];
          dCf[i] += v[NS + i];
        }
      }
      if (!p.B_fixed || !p.C_fixed) {
        const int offset = transpose_reduce<V, S>(v, lane);
#pragma unroll
        for (int j = 0; j < kKept; ++j) red[warp][k][w.slice][offset + j] = v[j];
      }
    }
    if (w.active && w.slice == 0) {
      store8(du + t0, count, aligned, du_k);
      store8(ddelta + t0, count, aligned, dd_k);
      if (dz) store8(dz + t0, count, aligned, dz_k);
    }
    __syncthreads();
    if (!p.B_fixed || !p.C_fixed) {
      // the block's sums over its warps, in a fixed order, into its partial (n_cblocks, batch, G, N, L)
      for (int e = threadIdx.x; e < 2 * P * kChunk; e += kThreads) {
        const int k = e % kChunk, n = (e / kChunk) % P, which = e / (kChunk * P);
        if (k >= count || n >= N || (which == 0 ? p.B_fixed : p.C_fixed)) continue;
        float sum = 0.f;
#pragma unroll
        for (int q = 0; q < kWarps; ++q) sum += red[q][k][n / NS][which * NS + n % NS];
        float* part = which == 0 ? p.dB : p.dC;
        part[((((int64_t)w.cblock * p.batch + w.b) * p.groups + w.g) * N + n) * p.seqlen + t0 + k] = sum;
      }
      __syncthreads();
    }
  }
  if (!w.active) return;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    if (n0 + i >= N) continue;
    p.dh0[srow * N + n0 + i] = adj[i];
    p.dA[srow * N + n0 + i] = dA[i];
    if (p.B_fixed) p.dB[srow * N + n0 + i] = dBf[i];
    if (p.C_fixed) p.dC[srow * N + n0 + i] = dCf[i];
  }
  if (w.slice == 0) {
    if (p.dD) p.dD[srow] = dD;
    if (p.dbias) p.dbias[srow] = dbias;
  }
}

// Forward, time-parallel (the design csrc/README.md sketches; in progress, forward only): a warp
// is one channel; lane = slice * K + segment, K = 32 / S segments of 8 consecutive steps, so a pass
// covers K * 8 steps. Pass 1 runs each segment from zero, keeping decays and x B in registers;
// a scan over the segment lanes and the carry give each segment its incoming state; pass 2 reruns
// the segment from it for y. Saves the state every kSegmentedChunk steps.
constexpr int kSegmentedChunk = 128;
constexpr int kSegmentedStates = 8;     // states a lane, forward
constexpr int kBwdSegmentedStates = 4;  // states a lane, backward (its registers hold a pass's decays and states)
constexpr int kBwdChannelsPerWarp = 8;  // the backward's channels a warp: a block sums 4 x 8 channels' dB, dC
// slices S of `states` states a lane for d_state N: at least 2, so that a pass of 32 / S segments
// of 8 steps divides the kSegmentedChunk steps between saved states
__host__ __device__ constexpr int segmented_slices(int states, int N) {
  return next_pow2((N + states - 1) / states) < 2 ? 2 : next_pow2((N + states - 1) / states);
}

// state i's B (or C) over a lane's 8 steps: the fixed value, or its row of the variable tensor
template <bool kFixed, bool kPadded, typename TB, int NS>
__device__ __forceinline__ void steps_of_state(const float (&fixed)[NS], const TB* rows, int64_t stride, int i,
                                               bool valid, int count, bool aligned, float (&out)[kChunk]) {
  if (kFixed) {
#pragma unroll
    for (int k = 0; k < kChunk; ++k) out[k] = fixed[i];
  } else {
    load8(rows + (int64_t)i * stride, (!kPadded || valid) ? count : 0, aligned, out);
  }
}

// Inclusive scan of a segment's (decay product, state from 0) over the K segment lanes of a slice:
// lane seg ends with the composition of segments 0..seg (selects, not a predicated block).
template <int K>
__device__ __forceinline__ void segment_scan(int seg, float& prod, float& local) {
#pragma unroll
  for (int off = 1; off < K; off <<= 1) {
    const float pp = __shfl_up_sync(kFull, prod, off, K), hp = __shfl_up_sync(kFull, local, off, K);
    const bool take = seg >= off;
    local = take ? prod * hp + local : local;
    prod = take ? prod * pp : prod;
  }
}

// What a lane of the time-parallel forward works on: its channel's rows and constants
template <typename T, typename TB, int NS>
struct SegmentLane {
  int seg, slice, n0, t_end;
  int64_t row;
  const T *u, *delta, *z;
  T* out;
  const TB *B, *C;  // this lane's first state row of variable B/C
  float A2[NS], Bf[NS], Cf[NS], D, bias;
};

template <typename T, typename TB, int NS, int S, bool kPadded, bool kBFixed, bool kCFixed, bool kWhole>
__device__ __forceinline__ void segmented_pass(const Params& p, const SegmentLane<T, TB, NS>& l, int base,
                                               float (&carry)[NS]) {
  const int seg = l.seg, slice = l.slice, n0 = l.n0, t_end = l.t_end;
  const int64_t row = l.row;
  const T *u = l.u, *delta = l.delta, *z = l.z;
  T* out = l.out;
  const TB *Bv = l.B, *Cv = l.C;
  const auto &A2 = l.A2, &Bf = l.Bf, &Cf = l.Cf;
  const float D = l.D, bias = l.bias;
  constexpr int K = 32 / S;
  const int N = p.d_state;
  const int t0 = base + seg * kChunk;
  // whole, aligned passes (all but the last, when L and the start are multiples of 8) take only
  // the vector loads; without padding states (kPadded false) every state row is loaded whole
  const int count = kWhole ? kChunk : max(0, min(kChunk, t_end - t0));
  const bool aligned = kWhole || ((row + t0) % kChunk) == 0;
  // B and C rows are seqlen apart: 8-aligned like u's only when seqlen is a multiple of 8 (else a
  // vector load of a bf16 row faults; found by the emulated kernels at L = 300). Whole passes are
  // taken only where both hold.
  const bool bc_aligned = kWhole || (aligned && p.seqlen % kChunk == 0);
  float uk[kChunk], dk[kChunk], zk[kChunk], dt[kChunk], x[kChunk];
  load8(u + t0, count, aligned, uk);
  load8(delta + t0, count, aligned, dk);
  if (z) load8(z + t0, count, aligned, zk);
  // the S lanes of a segment share the per-step work: each discretizes M = 8 / S of the steps,
  // then they swap the results
  constexpr int M = kChunk / S;
  static_assert(kChunk % S == 0, "the per-step split needs S <= 8");
  {
    float mine[M], mine_dsp[M], part_delta[M];
#pragma unroll
    for (int j = 0; j < M; ++j) {  // dk[slice * M + j] with static indices (registers, not local memory)
      part_delta[j] = dk[j];
#pragma unroll
      for (int q = 1; q < S; ++q) part_delta[j] = slice == q ? dk[q * M + j] : part_delta[j];
    }
    discretize<M>(p, bias, part_delta, mine, mine_dsp);  // the forward has no use for dsp: compiled out
#pragma unroll
    for (int k = 0; k < kChunk; ++k) dt[k] = __shfl_sync(kFull, mine[k % M], (k / M) * K + seg);
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k) x[k] = dt[k] * uk[k] * p.b_scale;
  // pass 1: the segment from zero; steps past the end are the identity. The segment's decay
  // product is one exp2 of A times its summed dt, not an FMUL per element-state.
  float dt_sum = 0.f;
#pragma unroll
  for (int k = 0; k < kChunk; ++k) dt_sum += k < count ? dt[k] : 0.f;
  float decay[NS][kChunk], xb[NS][kChunk], local[NS], prod[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    float Bi[kChunk];
    steps_of_state<kBFixed, kPadded>(Bf, Bv + t0, p.seqlen, i, n0 + i < N, count, bc_aligned, Bi);
    float h = 0.f;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const bool live = k < count;
      decay[i][k] = live ? exp2_approx(dt[k] * A2[i]) : 1.f;
      xb[i][k] = live ? x[k] * Bi[k] : 0.f;
      h = decay[i][k] * h + xb[i][k];
    }
    local[i] = h;
    prod[i] = exp2_approx(dt_sum * A2[i]);
  }
  // inclusive scan of (prod, local) over the segments, then each segment's incoming state
#pragma unroll
  for (int off = 1; off < K; off <<= 1) {
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const float pp = __shfl_up_sync(kFull, prod[i], off, K), hp = __shfl_up_sync(kFull, local[i], off, K);
      const bool take = seg >= off;  // selects, not a predicated block
      const float joined = prod[i] * hp + local[i], joined_prod = prod[i] * pp;
      local[i] = take ? joined : local[i];
      prod[i] = take ? joined_prod : prod[i];
    }
  }
  float h_start[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const float pe = __shfl_up_sync(kFull, prod[i], 1, K), he = __shfl_up_sync(kFull, local[i], 1, K);
    h_start[i] = seg == 0 ? carry[i] : pe * carry[i] + he;
    carry[i] = __shfl_sync(kFull, prod[i] * carry[i] + local[i], K - 1, K);
  }
  // pass 2: y from the true incoming state
  float y[kChunk];
#pragma unroll
  for (int k = 0; k < kChunk; ++k) y[k] = 0.f;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    float Ci[kChunk];
    steps_of_state<kCFixed, kPadded>(Cf, Cv + t0, p.seqlen, i, n0 + i < N, count, bc_aligned, Ci);
    float h = h_start[i];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      h = decay[i][k] * h + xb[i][k];
      y[k] += h * Ci[k];
    }
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
#pragma unroll
    for (int m = K; m < 32; m <<= 1) y[k] += __shfl_xor_sync(kFull, y[k], m);
    y[k] = y[k] * p.c_scale + D * uk[k];
    if (z) y[k] *= zk[k] * sigmoid(zk[k]);
  }
  if (slice == 0) store8(out + t0, count, aligned, y);
}

// kPadded: d_state < NS * S; kBFixed / kCFixed: fixed (dim, N) B / C
template <typename T, typename TB, int NS, int S, bool kPadded, bool kBFixed, bool kCFixed>
__global__ void __launch_bounds__(kThreads) scan_fwd_segmented_kernel(Params p) {
  constexpr int K = 32 / S, kSpan = K * kChunk;
  static_assert(kSegmentedChunk % kSpan == 0, "a pass must not straddle a saved state");
  const int channel = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  const int seq = channel / p.dim, d = channel % p.dim;
  if (seq >= p.n_seqs) return;  // a whole warp: no shuffle partner left behind
  const int lane = threadIdx.x % 32, slice = lane / K, seg = lane % K, n0 = slice * NS, N = p.d_state;
  const int g = d / (p.dim / p.groups);
  const int b = static_cast<int>(p.seqs[seq]), t_begin = static_cast<int>(p.seqs[p.n_seqs + seq]);
  const int t_end = static_cast<int>(p.seqs[2 * p.n_seqs + seq]), slot = static_cast<int>(p.seqs[3 * p.n_seqs + seq]);
  SegmentLane<T, TB, NS> l;
  l.seg = seg;
  l.slice = slice;
  l.n0 = n0;
  l.t_end = t_end;
  l.row = ((int64_t)b * p.dim + d) * p.seqlen;
  l.u = static_cast<const T*>(p.u) + l.row;
  l.delta = static_cast<const T*>(p.delta) + l.row;
  l.z = p.z ? static_cast<const T*>(p.z) + l.row : nullptr;
  l.out = static_cast<T*>(p.out) + l.row;
  l.B = static_cast<const TB*>(p.B) + ((int64_t)(b * p.groups + g) * N + n0) * p.seqlen;
  l.C = static_cast<const TB*>(p.C) + ((int64_t)(b * p.groups + g) * N + n0) * p.seqlen;
  float carry[NS];
  const int64_t srow = (int64_t)seq * p.dim + d;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const bool ok = n0 + i < N;
    l.A2[i] = ok ? p.A[d * N + n0 + i] * kLog2e : 0.f;
    l.Bf[i] = (ok && kBFixed) ? static_cast<const float*>(p.B)[d * N + n0 + i] : 0.f;
    l.Cf[i] = (ok && kCFixed) ? static_cast<const float*>(p.C)[d * N + n0 + i] : 0.f;
    carry[i] = (ok && p.h0) ? p.h0[srow * N + n0 + i] : 0.f;
  }
  l.D = p.D ? p.D[d] : 0.f;
  l.bias = p.bias ? p.bias[d] : 0.f;
  float* states = p.states + (((int64_t)b * p.dim + d) * p.n_slots + slot) * N;
  auto save_state = [&](int base) {
    if ((base - t_begin) % kSegmentedChunk != 0) return;
    if (seg == 0)
#pragma unroll
      for (int i = 0; i < NS; ++i)
        if (n0 + i < N) states[n0 + i] = carry[i];
    states += N;
  };
  int base = t_begin;
  // whole passes of a row whose start is 8-aligned take only vector loads; the rest (the last
  // pass, or a packed sequence at an odd start) the general path, in a loop of its own
  if ((l.row + t_begin) % kChunk == 0 && p.seqlen % kChunk == 0)
    for (; base + kSpan <= t_end; base += kSpan) {
      save_state(base);
      segmented_pass<T, TB, NS, S, kPadded, kBFixed, kCFixed, true>(p, l, base, carry);
    }
  for (; base < t_end; base += kSpan) {
    save_state(base);
    segmented_pass<T, TB, NS, S, kPadded, kBFixed, kCFixed, false>(p, l, base, carry);
  }
  if (seg == 0)
#pragma unroll
    for (int i = 0; i < NS; ++i)
      if (n0 + i < N) p.last[srow * N + n0 + i] = carry[i];
}

// Backward, time-parallel: the forward's segmented design run in reverse, deterministic by design.
// A warp runs one channel at a time; lane = slice * K + segment (S slices of NS states, K = 32 / S
// segments of 8 steps: a pass covers K * 8 steps). The sequence is walked in the forward's saved
// chunks of kSegmentedChunk steps, last first, and each chunk in passes, last first. For a pass, a
// lane recomputes its segment's decays and states from the state entering the pass (the chunk's
// saved state, carried forward over the chunk's earlier passes), then runs the adjoint
// g_t = C_t dy_t + a_{t+1} g_{t+1} over its 8 steps from 0, joins the segments with a suffix scan
// of the maps X -> (prod of the segment's decays) X + (a_{t0} g_{t0}) and reruns its steps from
// its true incoming adjoint. A block's 4 warps take Q consecutive channels each of one (sequence,
// group); the channels' variable dB/dC terms of a pass are added in shared memory, warp by warp
// and channel by channel in a fixed order, and the block writes its sum as a per-block partial
// (n_cblocks, batch, G, N, L) that the caller sums in a fixed order. dA, dinitial_state (the
// adjoint carried between passes), fixed dB/dC, dD and ddelta_bias are per (sequence, channel)
// values that the lane holding them updates after each pass. No atomics: the same bits every run.
template <int K>
__device__ __forceinline__ float segment_broadcast(float x) { return __shfl_sync(kFull, x, 0, K); }

// sum over the K segment lanes of a slice (the lanes of one channel's states)
template <int K>
__device__ __forceinline__ float segment_sum(float x) {
#pragma unroll
  for (int m = 1; m < K; m <<= 1) x += __shfl_xor_sync(kFull, x, m);
  return x;
}

// sum over the S slices (the lanes of one segment's steps)
template <int K>
__device__ __forceinline__ float slice_sum(float x) {
#pragma unroll
  for (int m = K; m < 32; m <<= 1) x += __shfl_xor_sync(kFull, x, m);
  return x;
}

// One channel's rows and constants in the time-parallel backward
template <typename T, typename TB, int NS>
struct BackwardChannel {
  int64_t row, srow;  // (batch, dim) row of the activations; (sequence, dim) row of the per-channel values
  const T *u, *delta, *z, *dout;
  T *du, *ddelta, *dz;
  const TB *B, *C;  // this lane's first state row of variable B/C
  const float* saved;  // the forward's saved states of this channel and sequence
  float A[NS], A2[NS], Bf[NS], Cf[NS], D, bias;
};

// The state leaving the pass [base, base + K * 8) from the state entering it (every lane of a
// slice holds it); only pass 1 and the segment scan of the forward.
template <typename T, typename TB, int NS, int S, bool kPadded, bool kBFixed>
__device__ __forceinline__ void carry_over_pass(const Params& p, const BackwardChannel<T, TB, NS>& c, int seg,
                                                int n0, int t_end, int base, float (&carry)[NS]) {
  constexpr int K = 32 / S;
  const int N = p.d_state, t0 = base + seg * kChunk, count = max(0, min(kChunk, t_end - t0));
  const bool aligned = ((c.row + t0) % kChunk) == 0, bc_aligned = aligned && p.seqlen % kChunk == 0;
  float uk[kChunk], dk[kChunk], dt[kChunk], dsp[kChunk];
  load8(c.u + t0, count, aligned, uk);
  load8(c.delta + t0, count, aligned, dk);
  discretize(p, c.bias, dk, dt, dsp);
  float dt_sum = 0.f;
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    dt[k] = k < count ? dt[k] : 0.f;  // past the end: the identity (a = 1, x = 0)
    dt_sum += dt[k];
  }
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    float Bi[kChunk];
    steps_of_state<kBFixed, kPadded>(c.Bf, c.B + t0, p.seqlen, i, n0 + i < N, count, bc_aligned, Bi);
    float h = 0.f;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) h = exp2_approx(dt[k] * c.A2[i]) * h + dt[k] * uk[k] * p.b_scale * Bi[k];
    float prod = exp2_approx(dt_sum * c.A2[i]), local = h;
    segment_scan<K>(seg, prod, local);
    carry[i] = __shfl_sync(kFull, prod * carry[i] + local, K - 1, K);
  }
}

// One pass of one channel: the gradients of its steps (du, ddelta, dz stored; the per-channel sums
// updated by the segment-0 lanes; variable dB/dC added into this warp's slab of shared memory);
// h_in: the state entering the pass; the adjoint carried between passes lives in p.dh0.
template <typename T, typename TB, int NS, int S, bool kPadded, bool kBFixed, bool kCFixed>
__device__ __forceinline__ void backward_pass(const Params& p, const BackwardChannel<T, TB, NS>& c, int seg,
                                              int slice, int n0, int t_end, int base, const float (&h_in)[NS],
                                              float* slab_B, float* slab_C) {
  constexpr int K = 32 / S, kSpan = K * kChunk;
  const int N = p.d_state, t0 = base + seg * kChunk, count = max(0, min(kChunk, t_end - t0));
  const bool aligned = ((c.row + t0) % kChunk) == 0, bc_aligned = aligned && p.seqlen % kChunk == 0;
  float uk[kChunk], dk[kChunk], zk[kChunk], gk[kChunk], dt[kChunk], dsp[kChunk];
  load8(c.u + t0, count, aligned, uk);
  load8(c.delta + t0, count, aligned, dk);
  load8(c.dout + t0, count, aligned, gk);
  if (c.z) load8(c.z + t0, count, aligned, zk);
  discretize(p, c.bias, dk, dt, dsp);
  float dt_sum = 0.f;
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    dt[k] = k < count ? dt[k] : 0.f;  // past the end: the identity (a = 1, x = 0, no gradient)
    dt_sum += dt[k];
  }
  // the pass's states again: each segment from 0, the scan over segments, then from its true start
  float decay[NS][kChunk], hist[NS][kChunk], h_start[NS], y[kChunk];
#pragma unroll
  for (int k = 0; k < kChunk; ++k) y[k] = 0.f;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    float Bi[kChunk], Ci[kChunk];
    steps_of_state<kBFixed, kPadded>(c.Bf, c.B + t0, p.seqlen, i, n0 + i < N, count, bc_aligned, Bi);
    float h = 0.f;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      decay[i][k] = exp2_approx(dt[k] * c.A2[i]);
      h = decay[i][k] * h + dt[k] * uk[k] * p.b_scale * Bi[k];
    }
    float prod = exp2_approx(dt_sum * c.A2[i]), local = h;
    segment_scan<K>(seg, prod, local);
    const float pe = __shfl_up_sync(kFull, prod, 1, K), he = __shfl_up_sync(kFull, local, 1, K);
    h_start[i] = seg == 0 ? h_in[i] : pe * h_in[i] + he;
    steps_of_state<kCFixed, kPadded>(c.Cf, c.C + t0, p.seqlen, i, n0 + i < N, count, bc_aligned, Ci);
    h = h_start[i];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      h = decay[i][k] * h + dt[k] * uk[k] * p.b_scale * Bi[k];
      hist[i][k] = h;
      y[k] += h * Ci[k];
    }
  }
  // out = y * silu(z): dz, and dy = d out / d y
  float dy[kChunk], dz[kChunk];
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    dy[k] = gk[k];
    if (c.z) {
      const float yk = slice_sum<K>(y[k]) * p.c_scale + c.D * uk[k], sz = sigmoid(zk[k]);
      dz[k] = gk[k] * yk * sz * (1.f + zk[k] * (1.f - sz));
      dy[k] = gk[k] * zk[k] * sz;
    }
  }
  // the adjoint, state by state
  float s_decayed[kChunk], s_input[kChunk], dA_sum[NS], dB_sum[NS], dC_sum[NS];
#pragma unroll
  for (int k = 0; k < kChunk; ++k) s_decayed[k] = s_input[k] = 0.f;
  const int64_t carried = c.srow * N + n0;  // this lane's states in the per-channel values
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    float Bi[kChunk], Ci[kChunk];
    steps_of_state<kBFixed, kPadded>(c.Bf, c.B + t0, p.seqlen, i, n0 + i < N, count, bc_aligned, Bi);
    steps_of_state<kCFixed, kPadded>(c.Cf, c.C + t0, p.seqlen, i, n0 + i < N, count, bc_aligned, Ci);
    // the segment's map from its incoming adjoint X (dL/dh at its last step from later steps)
    // to the previous segment's: X -> prod * X + a_{t0} g_{t0}, g from X = 0
    float g = 0.f;
#pragma unroll
    for (int k = kChunk - 1; k >= 0; --k) g = Ci[k] * dy[k] * p.c_scale + (k < kChunk - 1 ? decay[i][k + 1] * g : 0.f);
    float P = exp2_approx(dt_sum * c.A2[i]), L = decay[i][0] * g;
#pragma unroll
    for (int off = 1; off < K; off <<= 1) {  // suffix composition over this and the later segments
      const float pn = __shfl_down_sync(kFull, P, off, K), ln = __shfl_down_sync(kFull, L, off, K);
      const bool take = seg + off < K;
      L = take ? P * ln + L : L;
      P = take ? P * pn : P;
    }
    const bool valid = n0 + i < N;
    const float from_later = segment_broadcast<K>(seg == 0 && valid ? p.dh0[carried + i] : 0.f);
    const float pn = __shfl_down_sync(kFull, P, 1, K), ln = __shfl_down_sync(kFull, L, 1, K);
    float X = seg == K - 1 ? from_later : pn * from_later + ln;
    const float to_earlier = segment_broadcast<K>(P * from_later + L);
    // the segment's steps again from its true incoming adjoint
    float dA_i = 0.f, dB_i = 0.f, dC_i = 0.f;
    g = X;
#pragma unroll
    for (int k = kChunk - 1; k >= 0; --k) {
      const float dyc = dy[k] * p.c_scale, dtu = dt[k] * uk[k] * p.b_scale;
      g = Ci[k] * dyc + (k < kChunk - 1 ? decay[i][k + 1] * g : X);
      const float prev = k == 0 ? h_start[i] : hist[i][k - 1];
      const float gah = g * (decay[i][k] * prev);  // a_t h_{t-1} as a product (strong decay)
      dA_i += gah * dt[k];
      s_decayed[k] += gah * c.A[i];
      s_input[k] += g * Bi[k];
      const float dB_term = g * dtu, dC_term = dyc * hist[i][k];
      if (kBFixed) {
        dB_i += dB_term;
      } else if (valid) {
        slab_B[(n0 + i) * kSpan + seg * kChunk + k] += dB_term;
      }
      if (kCFixed) {
        dC_i += dC_term;
      } else if (valid) {
        slab_C[(n0 + i) * kSpan + seg * kChunk + k] += dC_term;
      }
    }
    dA_sum[i] = segment_sum<K>(dA_i);
    dB_sum[i] = kBFixed ? segment_sum<K>(dB_i) : 0.f;
    dC_sum[i] = kCFixed ? segment_sum<K>(dC_i) : 0.f;
    if (seg == 0 && valid) p.dh0[carried + i] = to_earlier;
  }
  if (seg == 0) {
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      if (n0 + i >= N) continue;
      p.dA[carried + i] += dA_sum[i];
      if (kBFixed) p.dB[carried + i] += dB_sum[i];
      if (kCFixed) p.dC[carried + i] += dC_sum[i];
    }
  }
  // du, ddelta (and the sums over states they need), dD, ddelta_bias
  float du_k[kChunk], dd_k[kChunk], dD = 0.f, dbias = 0.f;
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    const float sd = slice_sum<K>(s_decayed[k]), si = slice_sum<K>(s_input[k]);
    du_k[k] = dy[k] * c.D + si * p.b_scale * dt[k];
    const float d_pre = k < count ? (sd + si * p.b_scale * uk[k]) * dsp[k] : 0.f;
    dd_k[k] = d_pre * p.dt_scale;
    dbias += d_pre;
    dD += dy[k] * uk[k];
  }
  dD = segment_sum<K>(dD);
  dbias = segment_sum<K>(dbias);
  if (slice == 0) {
    store8(c.du + t0, count, aligned, du_k);
    store8(c.ddelta + t0, count, aligned, dd_k);
    if (c.dz) store8(c.dz + t0, count, aligned, dz);
    if (seg == 0) {
      if (p.dD) p.dD[c.srow] += dD;
      if (p.dbias) p.dbias[c.srow] += dbias;
    }
  }
}

// kPadded: d_state < NS * S; kBFixed / kCFixed: fixed (dim, N) B / C; Q channels per warp.
template <typename T, typename TB, int NS, int S, bool kPadded, bool kBFixed, bool kCFixed, int Q>
__global__ void __launch_bounds__(kThreads) scan_bwd_segmented_kernel(Params p) {
  constexpr int K = 32 / S, kSpan = K * kChunk, kWarps = kThreads / 32, P = NS * S;
  constexpr int kPasses = kSegmentedChunk / kSpan;
  static_assert(kSegmentedChunk % kSpan == 0, "a pass must not straddle a saved state");
  __shared__ float slabs[kWarps][2][P * kSpan];  // per warp: its channels' dB, dC of the pass (state, step)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, slice = lane / K, seg = lane % K, n0 = slice * NS;
  const int N = p.d_state, dpg = p.dim / p.groups;
  const int cblock = blockIdx.x % p.n_cblocks, g = (blockIdx.x / p.n_cblocks) % p.groups;
  const int seq = blockIdx.x / (p.n_cblocks * p.groups);
  const int b = static_cast<int>(p.seqs[seq]), t_begin = static_cast<int>(p.seqs[p.n_seqs + seq]);
  const int t_end = static_cast<int>(p.seqs[2 * p.n_seqs + seq]), slot = static_cast<int>(p.seqs[3 * p.n_seqs + seq]);
  float* slab_B = slabs[warp][0];
  float* slab_C = slabs[warp][1];
  auto channel = [&](int q, BackwardChannel<T, TB, NS>& c) {  // false: past the group's last channel
    const int in_group = (cblock * kWarps + warp) * Q + q;
    if (in_group >= dpg) return false;
    const int d = g * dpg + in_group;
    c.row = ((int64_t)b * p.dim + d) * p.seqlen;
    c.srow = (int64_t)seq * p.dim + d;
    c.u = static_cast<const T*>(p.u) + c.row;
    c.delta = static_cast<const T*>(p.delta) + c.row;
    c.z = p.z ? static_cast<const T*>(p.z) + c.row : nullptr;
    c.dout = static_cast<const T*>(p.dout) + c.row;
    c.du = static_cast<T*>(p.du) + c.row;
    c.ddelta = static_cast<T*>(p.ddelta) + c.row;
    c.dz = p.dz ? static_cast<T*>(p.dz) + c.row : nullptr;
    c.B = static_cast<const TB*>(p.B) + ((int64_t)(b * p.groups + g) * N + n0) * p.seqlen;
    c.C = static_cast<const TB*>(p.C) + ((int64_t)(b * p.groups + g) * N + n0) * p.seqlen;
    c.saved = p.states + (((int64_t)b * p.dim + d) * p.n_slots + slot) * N;
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const bool ok = n0 + i < N;
      c.A[i] = ok ? p.A[d * N + n0 + i] : 0.f;
      c.A2[i] = c.A[i] * kLog2e;
      c.Bf[i] = (ok && kBFixed) ? static_cast<const float*>(p.B)[d * N + n0 + i] : 0.f;
      c.Cf[i] = (ok && kCFixed) ? static_cast<const float*>(p.C)[d * N + n0 + i] : 0.f;
    }
    c.D = p.D ? p.D[d] : 0.f;
    c.bias = p.bias ? p.bias[d] : 0.f;
    return true;
  };
  // the per-channel values start: the adjoint from last_state's gradient, the sums at 0
  for (int q = 0; q < Q; ++q) {
    BackwardChannel<T, TB, NS> c;
    if (!channel(q, c) || seg != 0) continue;
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      if (n0 + i >= N) continue;
      p.dh0[c.srow * N + n0 + i] = p.dlast ? p.dlast[c.srow * N + n0 + i] : 0.f;
      p.dA[c.srow * N + n0 + i] = 0.f;
      if (kBFixed) p.dB[c.srow * N + n0 + i] = 0.f;
      if (kCFixed) p.dC[c.srow * N + n0 + i] = 0.f;
    }
    if (slice == 0) {
      if (p.dD) p.dD[c.srow] = 0.f;
      if (p.dbias) p.dbias[c.srow] = 0.f;
    }
  }
  const int n_chunks = (t_end - t_begin + kSegmentedChunk - 1) / kSegmentedChunk;
  for (int chunk = n_chunks - 1; chunk >= 0; --chunk) {
    for (int pass = kPasses - 1; pass >= 0; --pass) {
      const int base = t_begin + chunk * kSegmentedChunk + pass * kSpan;
      if (base >= t_end) continue;  // uniform across the block
      for (int e = lane; e < P * kSpan; e += 32) slab_B[e] = slab_C[e] = 0.f;  // this warp's own slab
      for (int q = 0; q < Q; ++q) {
        BackwardChannel<T, TB, NS> c;
        if (!channel(q, c)) continue;  // uniform across the warp
        float h[NS];
#pragma unroll
        for (int i = 0; i < NS; ++i) h[i] = n0 + i < N ? c.saved[(int64_t)chunk * N + n0 + i] : 0.f;
        for (int earlier = 0; earlier < pass; ++earlier)  // the chunk's earlier passes, forward
          carry_over_pass<T, TB, NS, S, kPadded, kBFixed>(p, c, seg, n0, t_end,
                                                          t_begin + chunk * kSegmentedChunk + earlier * kSpan, h);
        backward_pass<T, TB, NS, S, kPadded, kBFixed, kCFixed>(p, c, seg, slice, n0, t_end, base, h, slab_B,
                                                              slab_C);
      }
      __syncthreads();
      if (!kBFixed || !kCFixed) {
        // the block's sum over its warps, in a fixed order, into its partial (n_cblocks, batch, G, N, L)
        for (int e = threadIdx.x; e < 2 * N * kSpan; e += kThreads) {
          const int which = e / (N * kSpan), n = (e / kSpan) % N, k = e % kSpan, t = base + k;
          if (t >= t_end || (which == 0 ? kBFixed : kCFixed)) continue;
          float sum = 0.f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) sum += slabs[w][which][n * kSpan + k];
          float* part = which == 0 ? p.dB : p.dC;
          part[((((int64_t)cblock * p.batch + b) * p.groups + g) * N + n) * p.seqlen + t] = sum;
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace cuda
}  // namespace ssm_kernels
