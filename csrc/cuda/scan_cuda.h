// The CUDA half of ssm_kernels._C (csrc/cuda/scan_cuda.cu), as extension.cpp binds it: the
// time-parallel kernels run into preallocated buffers on the stream given (a cudaStream_t as an
// integer). The argument names are ssm_kernels/ops/selective_scan/cuda_ext.py's keywords.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace ssm_kernels {
namespace cuda {

using opt_tensor = std::optional<at::Tensor>;

void forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
             const at::Tensor& C, const at::Tensor& seqs, const at::Tensor& states, const opt_tensor& D,
             const opt_tensor& z, const opt_tensor& delta_bias, const opt_tensor& initial_state, int64_t groups,
             bool softplus, double dt_scale, double b_scale, double c_scale, const at::Tensor& out,
             const at::Tensor& last_state, int64_t stream);

void backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const at::Tensor& seqs, const at::Tensor& states, const opt_tensor& D,
              const opt_tensor& z, const opt_tensor& delta_bias, int64_t groups, bool softplus, double dt_scale,
              double b_scale, double c_scale, const at::Tensor& dout, const opt_tensor& dlast_state,
              const at::Tensor& du, const at::Tensor& ddelta, const opt_tensor& dz, const at::Tensor& dA,
              const at::Tensor& dB, const at::Tensor& dC, const opt_tensor& dD, const opt_tensor& ddelta_bias,
              const at::Tensor& dinitial_state, int64_t stream);

}  // namespace cuda
}  // namespace ssm_kernels
