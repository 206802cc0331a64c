// The CUDA kernels of scan_kernels.cuh compiled for the CPU through emulate.h, behind a C ABI that
// tests/cuda_emulated.py loads with ctypes: the kernels' results checked against the float64
// reference on a machine without a GPU. Built by the tests (g++ -std=c++20 -O1 -shared), never
// part of the extension. The grids and template choices here are the ones a CUDA launcher makes.
#define SSMK_EMULATE 1
#include "scan_kernels.cuh"

namespace ssm_kernels {
namespace cuda {
namespace {

enum DType { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

template <template <typename> class Run>
int with_dtype(int dtype, const Params& p) {
  switch (dtype) {
    case kFloat: return Run<float>::go(p);
    case kHalf: return Run<__half>::go(p);
    case kBFloat16: return Run<__nv_bfloat16>::go(p);
  }
  return 1;
}

// the blocks of the time-sequential kernels: (sequence, group, channel block)
template <int S>
unsigned sequential_grid(const Params& p) {
  return p.n_seqs * p.groups * channel_blocks(p.dim / p.groups, S);
}

// Run<T, S>::go(p) for the runtime number of slices, one of the S the kernel is instantiated for
template <template <typename, int> class Run, typename T, int S, int... More>
int with_slices(int slices, const Params& p) {
  if (slices == S) return Run<T, S>::go(p);
  if constexpr (sizeof...(More) > 0) {
    return with_slices<Run, T, More...>(slices, p);
  } else {
    return 2;  // a d_state these kernels do not take
  }
}

template <typename T, int S>
struct ForwardWith {
  static int go(const Params& p) {
    emulate::launch(scan_fwd_kernel<T, T, 8, S>, sequential_grid<S>(p), kThreads, p);
    return 0;
  }
};

template <typename T>
struct Forward {
  static int go(const Params& p) { return with_slices<ForwardWith, T, 1, 2, 4, 8, 16>(fwd_slices(p.d_state), p); }
};

template <typename T, int S>
struct BackwardWith {
  static int go(const Params& p) {
    if (p.n_cblocks != channel_blocks(p.dim / p.groups, S)) return 3;  // the partials' layout
    emulate::launch(scan_bwd_kernel<T, T, 4, S>, sequential_grid<S>(p), kThreads, p);
    return 0;
  }
};

template <typename T>
struct Backward {
  static int go(const Params& p) { return with_slices<BackwardWith, T, 4, 8, 16, 32>(bwd_slices(p.d_state), p); }
};

// The time-parallel forward (a warp per channel), padded where d_state < 8 S

template <typename T, int S, bool kPadded>
void segmented_launch(const Params& p) {
  const unsigned grid = (p.n_seqs * p.dim + kThreads / 32 - 1) / (kThreads / 32);
  if (p.B_fixed && p.C_fixed) {
    emulate::launch(scan_fwd_segmented_kernel<T, T, kSegmentedStates, S, kPadded, true, true>, grid, kThreads, p);
  } else if (p.B_fixed) {
    emulate::launch(scan_fwd_segmented_kernel<T, T, kSegmentedStates, S, kPadded, true, false>, grid, kThreads, p);
  } else if (p.C_fixed) {
    emulate::launch(scan_fwd_segmented_kernel<T, T, kSegmentedStates, S, kPadded, false, true>, grid, kThreads, p);
  } else {
    emulate::launch(scan_fwd_segmented_kernel<T, T, kSegmentedStates, S, kPadded, false, false>, grid, kThreads, p);
  }
}

template <typename T, int S>
struct SegmentedWith {
  static int go(const Params& p) {
    if (p.d_state == kSegmentedStates * S) {
      segmented_launch<T, S, false>(p);
    } else {
      segmented_launch<T, S, true>(p);
    }
    return 0;
  }
};

// The time-parallel backward, padded where d_state < 4 S

template <typename T, int S, bool kPadded, bool kBFixed, bool kCFixed>
void backward_segmented_launch(const Params& p) {
  const unsigned grid = p.n_seqs * p.groups * p.n_cblocks;
  emulate::launch(
      scan_bwd_segmented_kernel<T, T, kBwdSegmentedStates, S, kPadded, kBFixed, kCFixed, kBwdChannelsPerWarp>, grid,
      kThreads, p);
}

template <typename T, int S>
struct BackwardSegmentedWith {
  template <bool kPadded>
  static void fixed_flags(const Params& p) {
    if (p.B_fixed && p.C_fixed) {
      backward_segmented_launch<T, S, kPadded, true, true>(p);
    } else if (p.B_fixed) {
      backward_segmented_launch<T, S, kPadded, true, false>(p);
    } else if (p.C_fixed) {
      backward_segmented_launch<T, S, kPadded, false, true>(p);
    } else {
      backward_segmented_launch<T, S, kPadded, false, false>(p);
    }
  }
  static int go(const Params& p) {
    const int channels = kThreads / 32 * kBwdChannelsPerWarp;
    if (p.n_cblocks != (p.dim / p.groups + channels - 1) / channels) return 3;  // the partials' layout
    if (p.d_state == kBwdSegmentedStates * S) {
      fixed_flags<false>(p);
    } else {
      fixed_flags<true>(p);
    }
    return 0;
  }
};

template <typename T>
struct BackwardSegmented {
  static int go(const Params& p) {
    return with_slices<BackwardSegmentedWith, T, 2, 4, 8, 16>(segmented_slices(kBwdSegmentedStates, p.d_state), p);
  }
};

template <typename T>
struct Segmented {
  static int go(const Params& p) {
    return with_slices<SegmentedWith, T, 2, 4, 8>(segmented_slices(kSegmentedStates, p.d_state), p);
  }
};

}  // namespace
}  // namespace cuda
}  // namespace ssm_kernels

using ssm_kernels::cuda::Params;

// Each returns 0, or a nonzero code for a configuration these kernels do not take.
extern "C" {
int ssmk_emulated_forward(const Params* p, int dtype) {
  return ssm_kernels::cuda::with_dtype<ssm_kernels::cuda::Forward>(dtype, *p);
}
int ssmk_emulated_forward_segmented(const Params* p, int dtype) {
  return ssm_kernels::cuda::with_dtype<ssm_kernels::cuda::Segmented>(dtype, *p);
}
int ssmk_emulated_backward_segmented(const Params* p, int dtype) {
  return ssm_kernels::cuda::with_dtype<ssm_kernels::cuda::BackwardSegmented>(dtype, *p);
}
int ssmk_emulated_backward(const Params* p, int dtype) {
  return ssm_kernels::cuda::with_dtype<ssm_kernels::cuda::Backward>(dtype, *p);
}
int ssmk_params_size() { return static_cast<int>(sizeof(Params)); }
void ssmk_emulate_reverse_blocks(int on) { ssm_kernels::cuda::emulate::reverse_blocks = on != 0; }
}
