// The CUDA kernels of scan_kernels.cuh compiled for the CPU through emulate.h, behind a C ABI that
// tests/cuda_emulated.py loads with ctypes: the kernels' results checked against the float64
// reference on a machine without a GPU. Built by the tests (g++ -std=c++20 -O1 -shared), never
// part of the extension. The dispatch (launch.h) is the CUDA extension's own.
#define SSMK_EMULATE 1
#include "launch.h"

namespace ssm_kernels {
namespace cuda {
namespace {

struct EmulatedLaunch {
  template <typename Kernel>
  static void run(Kernel kernel, unsigned grid, const Params& p) {
    emulate::launch(kernel, grid, kThreads, p);
  }
};

}  // namespace
}  // namespace cuda
}  // namespace ssm_kernels

using ssm_kernels::cuda::EmulatedLaunch;
using ssm_kernels::cuda::Params;
using ssm_kernels::cuda::with_dtype;

// Each returns 0, or a nonzero code for a configuration these kernels do not take (launch.h).
extern "C" {
int ssmk_emulated_forward(const Params* p, int dtype) {
  return with_dtype<EmulatedLaunch, ssm_kernels::cuda::Forward>(dtype, *p);
}
int ssmk_emulated_backward(const Params* p, int dtype) {
  return with_dtype<EmulatedLaunch, ssm_kernels::cuda::Backward>(dtype, *p);
}
int ssmk_emulated_forward_segmented(const Params* p, int dtype) {
  return with_dtype<EmulatedLaunch, ssm_kernels::cuda::SegmentedForward>(dtype, *p);
}
int ssmk_emulated_backward_segmented(const Params* p, int dtype) {
  return with_dtype<EmulatedLaunch, ssm_kernels::cuda::SegmentedBackward>(dtype, *p);
}
int ssmk_params_size() { return static_cast<int>(sizeof(Params)); }
void ssmk_emulate_reverse_blocks(int on) { ssm_kernels::cuda::emulate::reverse_blocks = on != 0; }
}
