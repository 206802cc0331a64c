// The CUDA built-ins that csrc/cuda/scan_kernels.cuh uses, for the CPU (SSMK_EMULATE): the kernels
// compile with g++ and run here, each thread of a block an OS thread, so that their results can be
// checked against the float64 reference on a machine without a GPU (tests/test_cuda_emulated.py).
//
// Semantics kept: a block's threads run concurrently (blocks one after another); __syncthreads
// waits for the block's threads that have not exited; a warp's shuffles exchange values between
// its 32 threads in lockstep (every lane of the warp must take part, as the kernels' full masks
// require); __shared__ variables are shared by the block's threads. Not kept: speed (a shuffle
// is two barrier waits), the GPU's approximate exp2/division (exact ones instead), and anything
// about memory ordering beyond what the barriers give.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
// a __shared__ array is a static local of the kernel: one copy, shared by the threads of the block
// that runs (blocks run one at a time)
#define __shared__ static

namespace ssm_kernels {
namespace cuda {
namespace emulate {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct Warp {
  std::barrier<> sync{32};
  float slots[32];
};

struct Block {
  std::unique_ptr<std::barrier<>> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};
inline thread_local Block* current_block = nullptr;
inline bool reverse_blocks = false;  // run the grid's blocks last first (a scheduler's other order)

inline void syncthreads() { current_block->sync->arrive_and_wait(); }

// the value that lane `from` of this lane's warp holds; every lane of the warp calls it together
inline float exchange(float value, int from) {
  Warp& w = *current_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  w.slots[lane] = value;
  w.sync.arrive_and_wait();
  const float got = w.slots[from];
  w.sync.arrive_and_wait();
  return got;
}

// Runs kernel(args) over the grid, block after block (in order, or last first); each block's
// threads as OS threads.
template <typename Kernel, typename Args>
void launch(Kernel kernel, unsigned grid, unsigned threads, const Args& args) {
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{threads, 1, 1};
  for (unsigned i = 0; i < grid; ++i) {
    const unsigned b = reverse_blocks ? grid - 1 - i : i;
    Block block;
    block.sync = std::make_unique<std::barrier<>>(threads);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) block.warps.push_back(std::make_unique<Warp>());
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        threadIdx = dim3{t, 0, 0};
        blockIdx = dim3{b, 0, 0};
        current_block = &block;
        kernel(args);
        // an exited thread no longer counts at __syncthreads nor in its warp's exchanges
        block.sync->arrive_and_drop();
        block.warps[t / 32]->sync.arrive_and_drop();
      });
    for (auto& th : pool) th.join();
  }
}

}  // namespace emulate

using emulate::blockDim;
using emulate::blockIdx;
using emulate::dim3;
using emulate::gridDim;
using emulate::threadIdx;

inline void __syncthreads() { emulate::syncthreads(); }

// width: lanes are grouped by `width` (a power of two <= 32), as CUDA's shuffles do
inline float __shfl_sync(unsigned, float v, int src, int width = 32) {
  const int lane = threadIdx.x % 32, base = lane & ~(width - 1);
  return emulate::exchange(v, base + (src % width));
}
inline float __shfl_up_sync(unsigned, float v, unsigned delta, int width = 32) {
  const int lane = threadIdx.x % 32, base = lane & ~(width - 1), pos = lane - base;
  return emulate::exchange(v, pos >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
inline float __shfl_down_sync(unsigned, float v, unsigned delta, int width = 32) {
  const int lane = threadIdx.x % 32, base = lane & ~(width - 1), pos = lane - base;
  return emulate::exchange(v, pos + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane);
}
inline float __shfl_xor_sync(unsigned, float v, int mask, int width = 32) {
  const int lane = threadIdx.x % 32, base = lane & ~(width - 1);
  const int other = lane ^ mask;
  return emulate::exchange(v, (other & ~(width - 1)) == base ? other : lane);
}

inline float __fdividef(float a, float b) { return a / b; }
using std::max;
using std::min;

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// 16-bit floats: storage and round-to-nearest-even conversions (what cuda_fp16.h / cuda_bf16.h do)
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFF + ((u >> 16) & 1);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1F, man = h.bits & 0x3FF;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    f = man ? NAN : INFINITY;
  } else {
    f = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  // through float -> double -> the nearest half, by scaling into the 10-bit mantissa
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const float a = std::fabs(f);
  if (std::isnan(f)) return __half{static_cast<uint16_t>(sign | 0x7E00)};
  if (a >= 65520.f) return __half{static_cast<uint16_t>(sign | 0x7C00)};  // rounds to inf
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const int exp = std::max(e - 1, -14);  // subnormals share 2^-14's scale
  const double q = std::nearbyint(static_cast<double>(a) * std::ldexp(1.0, 10 - exp));  // ties to even
  uint32_t bits;
  if (q >= 2048.0) {  // rounded up into the next binade
    bits = static_cast<uint32_t>(exp + 1 + 15) << 10;
  } else if (q >= 1024.0) {
    bits = (static_cast<uint32_t>(exp + 15) << 10) | (static_cast<uint32_t>(q) - 1024);
  } else {  // subnormal (exp == -14)
    bits = static_cast<uint32_t>(q);
  }
  return __half{static_cast<uint16_t>(sign | bits)};
}

}  // namespace cuda
}  // namespace ssm_kernels
