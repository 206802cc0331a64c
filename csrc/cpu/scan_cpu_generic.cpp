// The CPU selective scan compiled for one instruction set (generic); the extension picks the widest
// one the CPU has at run time (extension.cpp). Only <cmath>/<cstdint> come before the pragma.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "scan_args.h"

// the baseline of the target (SSE2 on x86-64): runs anywhere
#include "scan_cpu_impl.h"

namespace ssm_kernels {
namespace cpu {
SSMK_DEFINE_ISA(generic)
}  // namespace cpu
}  // namespace ssm_kernels
