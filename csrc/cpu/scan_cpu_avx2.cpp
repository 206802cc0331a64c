// The CPU selective scan compiled for one instruction set (avx2); the extension picks the widest
// one the CPU has at run time (extension.cpp). Only <cmath>/<cstdint> come before the pragma.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "scan_args.h"

#if defined(__x86_64__) || defined(__i386__)  // elsewhere this copy is the generic one, never picked
#pragma GCC target("avx2,fma")
#endif
#include "scan_cpu_impl.h"

namespace ssm_kernels {
namespace cpu {
SSMK_DEFINE_ISA(avx2)
}  // namespace cpu
}  // namespace ssm_kernels
