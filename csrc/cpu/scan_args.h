// Arguments of the CPU selective-scan kernels: plain pointers and sizes, no torch types, so the
// per-ISA translation units (scan_cpu_*.cpp) include no torch header and cannot clash with it.
//
// Layout (prepared by ssm_kernels/ops/selective_scan/compiled.py):
//   u, delta, z, out, dout, du, ddelta, dz: (batch, dim, L), contiguous, in R
//   A: (dim, P); fixed B/C: (dim, P); variable B/C: (batch, G, L, P), the state axis last and
//   zero-padded from N to P (a multiple of the vector width) so every state loop is whole vectors
//   D, bias: (dim,); h0, last, dh0, dlast: (n_seqs, dim, N); states: (batch, dim, n_slots, N)
// A "sequence" is a run [start, end) of one batch row whose state starts at h0[s] (or 0) and ends
// in last[s]; its c-th saved state goes to slot slot[s] + c. Without cu_seqlens there is one per
// batch row (start 0, end L, slot 0); with it, one per packed sequence, all in row 0.
#pragma once
#include <cstdint>

namespace ssm_kernels {
namespace cpu {

struct Sequences {
  int64_t count;
  const int64_t* batch;
  const int64_t* start;
  const int64_t* end;
  const int64_t* slot;
};

template <typename R>
struct ScanArgs {
  int64_t batch, dim, seqlen, d_state, d_pad, groups, chunk, n_slots;
  Sequences seqs;
  bool softplus, B_fixed, C_fixed;
  R dt_scale, b_scale, c_scale;
  const R *u, *delta, *z, *A, *B, *C, *D, *bias, *h0;  // z, D, bias, h0 may be null
  R *states;
  // forward
  R *out, *last;
  // backward
  const R *dout, *dlast;  // dlast may be null
  R *du, *ddelta, *dz;
  // partial sums, reduced in a fixed order by the caller: per (sequence, channel) for dA, dD,
  // dbias and fixed dB/dC, (n_seqs, dim, P) or (n_seqs, dim); per channel block for variable
  // dB/dC, (n_blocks, batch, G, L, P)
  R *dA, *dB, *dC, *dD, *dbias, *dh0;
  int64_t block;  // channels per backward task (variable B/C); n_blocks = ceil(dim / G / block)
};

// Scratch floats a task needs (the backward keeps a chunk's states, decays and steps).
inline int64_t scratch_size(int64_t chunk, int64_t d_pad) { return (2 * chunk + 6) * d_pad + 4 * chunk + 64; }

// One entry per instruction set; defined in scan_cpu_<isa>.cpp.
#define SSMK_DECLARE_ISA(isa)                                                               \
  void forward_##isa(const ScanArgs<float>& a, int64_t task, float* scratch);               \
  void forward_##isa(const ScanArgs<double>& a, int64_t task, double* scratch);             \
  void backward_##isa(const ScanArgs<float>& a, int64_t task, float* scratch);              \
  void backward_##isa(const ScanArgs<double>& a, int64_t task, double* scratch);
SSMK_DECLARE_ISA(generic)
SSMK_DECLARE_ISA(avx2)
SSMK_DECLARE_ISA(avx512)
#undef SSMK_DECLARE_ISA

}  // namespace cpu
}  // namespace ssm_kernels
