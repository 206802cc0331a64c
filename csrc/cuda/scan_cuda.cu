// The CUDA half of ssm_kernels._C (built with SSM_KERNELS_BUILD_EXT=1 where nvcc and a CUDA build
// of torch are present): cuda_forward and cuda_backward run the time-parallel kernels of
// scan_kernels.cuh into buffers that ssm_kernels/ops/selective_scan/cuda_ext.py allocates, on the
// stream it passes. Only ATen and the CUDA runtime are included, so that this file compiles (-c)
// against the headers of a CPU build of torch too: CI checks it that way.
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "launch.h"
#include "scan_cuda.h"

namespace ssm_kernels {
namespace cuda {
namespace {

struct CudaLaunch {
  static thread_local cudaStream_t stream;
  template <typename Kernel>
  static void run(Kernel kernel, unsigned grid, const Params& p) {
    if (grid > 0) kernel<<<grid, kThreads, 0, stream>>>(p);
  }
};
thread_local cudaStream_t CudaLaunch::stream = nullptr;

void expect(const at::Tensor& t, const char* name, const at::Tensor& like, at::ScalarType dtype,
            std::vector<int64_t> shape) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected a tensor on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().vec() == shape, name, ": expected shape ", at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

const void* in(const opt_tensor& t, const char* name, const at::Tensor& like, at::ScalarType dtype,
               std::vector<int64_t> shape) {
  if (!t.has_value()) return nullptr;
  expect(*t, name, like, dtype, shape);
  return t->data_ptr();
}

int dtype_code(at::ScalarType t) {
  if (t == at::kFloat) return kFloat;
  if (t == at::kHalf) return kHalf;
  TORCH_CHECK(t == at::kBFloat16, "u: the CUDA kernels take float32, float16 or bfloat16, got ", t);
  return kBFloat16;
}

// The inputs every call shares, checked against u's shape, dtype and device.
Params common(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const at::Tensor& seqs, const at::Tensor& states, const opt_tensor& D,
              const opt_tensor& z, const opt_tensor& delta_bias, int64_t groups, bool softplus, double dt_scale,
              double b_scale, double c_scale) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3, "u: expected a (batch, dim, L) CUDA tensor");
  Params p{};
  p.batch = static_cast<int>(u.size(0));
  p.dim = static_cast<int>(u.size(1));
  p.seqlen = static_cast<int>(u.size(2));
  TORCH_CHECK(A.dim() == 2, "A: expected (dim, N)");
  p.d_state = static_cast<int>(A.size(1));
  p.groups = static_cast<int>(groups);
  TORCH_CHECK(p.groups >= 1 && p.dim % p.groups == 0, "groups: must divide dim");
  const auto act = u.scalar_type();
  const std::vector<int64_t> rows{p.batch, p.dim, p.seqlen};
  p.u = in(u, "u", u, act, rows);
  p.delta = in(delta, "delta", u, act, rows);
  p.z = in(z, "z", u, act, rows);
  p.A = static_cast<const float*>(in(A, "A", u, at::kFloat, {p.dim, p.d_state}));
  p.B_fixed = B.dim() == 2;
  p.C_fixed = C.dim() == 2;
  const std::vector<int64_t> fixed{p.dim, p.d_state}, variable{p.batch, p.groups, p.d_state, p.seqlen};
  p.B = in(B, "B", u, p.B_fixed ? at::kFloat : act, p.B_fixed ? fixed : variable);
  p.C = in(C, "C", u, p.C_fixed ? at::kFloat : act, p.C_fixed ? fixed : variable);
  p.D = static_cast<const float*>(in(D, "D", u, at::kFloat, {p.dim}));
  p.bias = static_cast<const float*>(in(delta_bias, "delta_bias", u, at::kFloat, {p.dim}));
  TORCH_CHECK(seqs.dim() == 2 && seqs.size(0) == 4, "seqs: expected (4, n_seqs)");
  expect(seqs, "seqs", u, at::kLong, {4, seqs.size(1)});
  p.n_seqs = static_cast<int>(seqs.size(1));
  p.seqs = seqs.data_ptr<int64_t>();
  TORCH_CHECK(states.dim() == 4, "states: expected (batch, dim, slots, N)");
  p.n_slots = static_cast<int>(states.size(2));
  expect(states, "states", u, at::kFloat, {p.batch, p.dim, p.n_slots, p.d_state});
  p.states = states.data_ptr<float>();
  p.softplus = softplus;
  p.dt_scale = static_cast<float>(dt_scale);
  p.b_scale = static_cast<float>(b_scale);
  p.c_scale = static_cast<float>(c_scale);
  return p;
}

void finish(int refused, const char* what) {
  TORCH_CHECK(refused == kOk, what, ": the CUDA kernels do not take this configuration (code ", refused,
              "; d_state up to 64)");
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

}  // namespace

void forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
             const at::Tensor& C, const at::Tensor& seqs, const at::Tensor& states, const opt_tensor& D,
             const opt_tensor& z, const opt_tensor& delta_bias, const opt_tensor& initial_state, int64_t groups,
             bool softplus, double dt_scale, double b_scale, double c_scale, const at::Tensor& out,
             const at::Tensor& last_state, int64_t stream) {
  Params p = common(u, delta, A, B, C, seqs, states, D, z, delta_bias, groups, softplus, dt_scale, b_scale, c_scale);
  const std::vector<int64_t> per_seq{p.n_seqs, p.dim, p.d_state};
  p.h0 = static_cast<const float*>(in(initial_state, "initial_state", u, at::kFloat, per_seq));
  expect(out, "out", u, u.scalar_type(), {p.batch, p.dim, p.seqlen});
  expect(last_state, "last_state", u, at::kFloat, per_seq);
  p.out = out.data_ptr();
  p.last = last_state.data_ptr<float>();
  CudaLaunch::stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream));
  finish(with_dtype<CudaLaunch, SegmentedForward>(dtype_code(u.scalar_type()), p), "cuda_forward");
}

void backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const at::Tensor& seqs, const at::Tensor& states, const opt_tensor& D,
              const opt_tensor& z, const opt_tensor& delta_bias, int64_t groups, bool softplus, double dt_scale,
              double b_scale, double c_scale, const at::Tensor& dout, const opt_tensor& dlast_state,
              const at::Tensor& du, const at::Tensor& ddelta, const opt_tensor& dz, const at::Tensor& dA,
              const at::Tensor& dB, const at::Tensor& dC, const opt_tensor& dD, const opt_tensor& ddelta_bias,
              const at::Tensor& dinitial_state, int64_t stream) {
  Params p = common(u, delta, A, B, C, seqs, states, D, z, delta_bias, groups, softplus, dt_scale, b_scale, c_scale);
  p.n_cblocks = segmented_backward_blocks(p);
  const auto act = u.scalar_type();
  const std::vector<int64_t> rows{p.batch, p.dim, p.seqlen}, per_seq{p.n_seqs, p.dim, p.d_state};
  const std::vector<int64_t> partials{p.n_cblocks, p.batch, p.groups, p.d_state, p.seqlen};
  p.dout = in(dout, "dout", u, act, rows);
  p.dlast = static_cast<const float*>(in(dlast_state, "dlast_state", u, at::kFloat, per_seq));
  TORCH_CHECK(dz.has_value() == (p.z != nullptr), "dz: given exactly when z is");
  TORCH_CHECK(dD.has_value() == (p.D != nullptr) && ddelta_bias.has_value() == (p.bias != nullptr),
              "dD, ddelta_bias: given exactly when D, delta_bias are");
  p.du = const_cast<void*>(in(du, "du", u, act, rows));
  p.ddelta = const_cast<void*>(in(ddelta, "ddelta", u, act, rows));
  p.dz = const_cast<void*>(in(dz, "dz", u, act, rows));
  auto out_f32 = [&](const opt_tensor& t, const char* name, std::vector<int64_t> shape) {
    return static_cast<float*>(const_cast<void*>(in(t, name, u, at::kFloat, shape)));
  };
  p.dA = out_f32(dA, "dA", per_seq);
  p.dB = out_f32(dB, "dB", p.B_fixed ? per_seq : partials);
  p.dC = out_f32(dC, "dC", p.C_fixed ? per_seq : partials);
  p.dD = out_f32(dD, "dD", {p.n_seqs, p.dim});
  p.dbias = out_f32(ddelta_bias, "ddelta_bias", {p.n_seqs, p.dim});
  p.dh0 = out_f32(dinitial_state, "dinitial_state", per_seq);
  CudaLaunch::stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream));
  finish(with_dtype<CudaLaunch, SegmentedBackward>(dtype_code(act), p), "cuda_backward");
}

}  // namespace cuda
}  // namespace ssm_kernels
