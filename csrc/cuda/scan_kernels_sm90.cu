// One CUDA kernel instantiated alone, for the static model (benchmarks/tools/compile_for_gpu.py --cuda):
// nvcc -cubin -DSSMK_BACKWARD=0|1 [-DSSMK_SEGMENTED=1: the time-parallel forward,
// -DSSMK_BACKWARD_SEGMENTED=1: the time-parallel backward] -DSSMK_T=__nv_bfloat16|__half|float -DSSMK_N=16
#include "scan_kernels.cuh"

#ifndef SSMK_T
#define SSMK_T __nv_bfloat16
#endif
#ifndef SSMK_NS
#define SSMK_NS 8
#endif
#ifndef SSMK_N
#define SSMK_N 16
#endif

namespace ssm_kernels {
namespace cuda {
#if SSMK_BACKWARD_SEGMENTED
constexpr int kS = segmented_slices(kBwdSegmentedStates, SSMK_N);
template __global__ void scan_bwd_segmented_kernel<SSMK_T, SSMK_T, kBwdSegmentedStates, kS,
                                                   (SSMK_N != kBwdSegmentedStates * kS), false, false,
                                                   kBwdChannelsPerWarp>(Params);
#elif SSMK_BACKWARD
template __global__ void scan_bwd_kernel<SSMK_T, SSMK_T, 4, bwd_slices(SSMK_N)>(Params);
#elif SSMK_SEGMENTED
template __global__ void scan_fwd_segmented_kernel<SSMK_T, SSMK_T, SSMK_NS, (SSMK_N + SSMK_NS - 1) / SSMK_NS, (SSMK_N % SSMK_NS != 0), false, false>(Params);
#else
template __global__ void scan_fwd_kernel<SSMK_T, SSMK_T, 8, fwd_slices(SSMK_N)>(Params);
#endif
}  // namespace cuda
}  // namespace ssm_kernels
