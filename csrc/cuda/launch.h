// Which instantiation of the kernels of scan_kernels.cuh a call takes and on what grid: one place
// for the CUDA extension (scan_cuda.cu, Launch = a <<<>>> launch on the caller's stream) and for
// the CPU emulation the tests run (emulated.cpp, Launch = emulate::launch), so that the emulated
// runs test the same dispatch. Launch::run(kernel, grid, params) launches kThreads a block.
// Every function returns 0, or a nonzero code for a configuration the kernels do not take.
#pragma once
#include "scan_kernels.cuh"

namespace ssm_kernels {
namespace cuda {

enum DType { kFloat = 0, kHalf = 1, kBFloat16 = 2 };  // the activations' dtype (and variable B/C's)
enum Refusal { kOk = 0, kBadDType = 1, kBadDState = 2, kBadPartials = 3 };

template <class Launch, template <class, typename> class Run>
int with_dtype(int dtype, const Params& p) {
  switch (dtype) {
    case kFloat: return Run<Launch, float>::go(p);
    case kHalf: return Run<Launch, __half>::go(p);
    case kBFloat16: return Run<Launch, __nv_bfloat16>::go(p);
  }
  return kBadDType;
}

// Run<Launch, T, S>::go(p) for the runtime number of slices, one of the S instantiated
template <class Launch, template <class, typename, int> class Run, typename T, int S, int... More>
int with_slices(int slices, const Params& p) {
  if (slices == S) return Run<Launch, T, S>::go(p);
  if constexpr (sizeof...(More) > 0) {
    return with_slices<Launch, Run, T, More...>(slices, p);
  } else {
    return kBadDState;
  }
}

// -- the time-sequential kernels: blocks of (sequence, group, channel block) ----------------------

template <int S>
unsigned sequential_grid(const Params& p) {
  return p.n_seqs * p.groups * channel_blocks(p.dim / p.groups, S);
}

template <class Launch, typename T, int S>
struct ForwardWith {
  static int go(const Params& p) {
    Launch::run(scan_fwd_kernel<T, T, 8, S>, sequential_grid<S>(p), p);
    return kOk;
  }
};

template <class Launch, typename T>
struct Forward {
  static int go(const Params& p) {
    return with_slices<Launch, ForwardWith, T, 1, 2, 4, 8, 16>(fwd_slices(p.d_state), p);
  }
};

template <class Launch, typename T, int S>
struct BackwardWith {
  static int go(const Params& p) {
    if (p.n_cblocks != channel_blocks(p.dim / p.groups, S)) return kBadPartials;
    Launch::run(scan_bwd_kernel<T, T, 4, S>, sequential_grid<S>(p), p);
    return kOk;
  }
};

template <class Launch, typename T>
struct Backward {
  static int go(const Params& p) {
    return with_slices<Launch, BackwardWith, T, 4, 8, 16, 32>(bwd_slices(p.d_state), p);
  }
};

// -- the time-parallel kernels: fixed/variable B and C and padded states as template cases -------

// kernel_for<Kernel>::with<kBFixed, kCFixed>() picks the instantiation of the runtime flags
template <class Launch, class Pick>
int with_fixed_flags(const Params& p, unsigned grid) {
  if (p.B_fixed && p.C_fixed) {
    Launch::run(Pick::template kernel<true, true>(), grid, p);
  } else if (p.B_fixed) {
    Launch::run(Pick::template kernel<true, false>(), grid, p);
  } else if (p.C_fixed) {
    Launch::run(Pick::template kernel<false, true>(), grid, p);
  } else {
    Launch::run(Pick::template kernel<false, false>(), grid, p);
  }
  return kOk;
}

template <typename T, int S, bool kPadded>
struct SegmentedForwardKernel {
  template <bool kBFixed, bool kCFixed>
  static auto kernel() { return scan_fwd_segmented_kernel<T, T, kSegmentedStates, S, kPadded, kBFixed, kCFixed>; }
};

template <class Launch, typename T, int S>
struct SegmentedForwardWith {
  static int go(const Params& p) {
    const unsigned grid = (p.n_seqs * p.dim + kThreads / 32 - 1) / (kThreads / 32);  // a warp per channel
    return p.d_state == kSegmentedStates * S ? with_fixed_flags<Launch, SegmentedForwardKernel<T, S, false>>(p, grid)
                                             : with_fixed_flags<Launch, SegmentedForwardKernel<T, S, true>>(p, grid);
  }
};

template <class Launch, typename T>
struct SegmentedForward {
  static int go(const Params& p) {
    return with_slices<Launch, SegmentedForwardWith, T, 2, 4, 8>(segmented_slices(kSegmentedStates, p.d_state), p);
  }
};

template <typename T, int S, bool kPadded>
struct SegmentedBackwardKernel {
  template <bool kBFixed, bool kCFixed>
  static auto kernel() {
    return scan_bwd_segmented_kernel<T, T, kBwdSegmentedStates, S, kPadded, kBFixed, kCFixed, kBwdChannelsPerWarp>;
  }
};

// channel blocks per group of the time-parallel backward (the variable dB/dC partials)
inline int segmented_backward_blocks(const Params& p) {
  constexpr int channels = kThreads / 32 * kBwdChannelsPerWarp;
  return (p.dim / p.groups + channels - 1) / channels;
}

template <class Launch, typename T, int S>
struct SegmentedBackwardWith {
  static int go(const Params& p) {
    if (p.n_cblocks != segmented_backward_blocks(p)) return kBadPartials;
    const unsigned grid = p.n_seqs * p.groups * p.n_cblocks;
    return p.d_state == kBwdSegmentedStates * S
               ? with_fixed_flags<Launch, SegmentedBackwardKernel<T, S, false>>(p, grid)
               : with_fixed_flags<Launch, SegmentedBackwardKernel<T, S, true>>(p, grid);
  }
};

template <class Launch, typename T>
struct SegmentedBackward {
  static int go(const Params& p) {
    return with_slices<Launch, SegmentedBackwardWith, T, 2, 4, 8, 16>(
        segmented_slices(kBwdSegmentedStates, p.d_state), p);
  }
};

}  // namespace cuda
}  // namespace ssm_kernels
