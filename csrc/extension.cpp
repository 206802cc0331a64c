// ssm_kernels._C: the optional compiled extension (built only with SSM_KERNELS_BUILD_EXT=1).
//
// The Python side (ssm_kernels/ops/selective_scan/compiled.py) allocates every output and lays
// the inputs out as csrc/cpu/scan_args.h says; these functions check that layout, fill the
// buffers and return nothing. The CPU kernels run one task per (sequence, channel) forward and
// per (sequence, group, channel block) backward, in parallel over torch's intra-op threads.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/scan_args.h"
#ifdef SSM_KERNELS_WITH_CUDA
#include "cuda/scan_cuda.h"
#endif

namespace ssm_kernels {
namespace {

using cpu::ScanArgs;
using opt_tensor = c10::optional<at::Tensor>;

// -- instruction set of the CPU kernels -----------------------------------------------------

enum class Isa { generic, avx2, avx512 };

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma");
  if (isa == Isa::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  if (isa != Isa::generic) return false;
#endif
  return true;
}

Isa best_isa() { return cpu_has(Isa::avx512) ? Isa::avx512 : cpu_has(Isa::avx2) ? Isa::avx2 : Isa::generic; }
Isa current_isa = best_isa();

const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "generic"; }

std::string get_cpu_isa() { return isa_name(current_isa); }

void set_cpu_isa(const std::string& name) {
  for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512}) {
    if (name == isa_name(isa)) {
      TORCH_CHECK(cpu_has(isa), "set_cpu_isa: this CPU lacks ", name);
      current_isa = isa;
      return;
    }
  }
  TORCH_CHECK(false, "set_cpu_isa: unknown instruction set '", name, "'; expected generic, avx2 or avx512");
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512})
    if (cpu_has(isa)) names.push_back(isa_name(isa));
  return names;
}

template <typename R>
using Task = void (*)(const ScanArgs<R>&, int64_t, R*);

template <typename R>
Task<R> forward_task() {
  switch (current_isa) {
    case Isa::avx512: return static_cast<Task<R>>(cpu::forward_avx512);
    case Isa::avx2: return static_cast<Task<R>>(cpu::forward_avx2);
    default: return static_cast<Task<R>>(cpu::forward_generic);
  }
}

template <typename R>
Task<R> backward_task() {
  switch (current_isa) {
    case Isa::avx512: return static_cast<Task<R>>(cpu::backward_avx512);
    case Isa::avx2: return static_cast<Task<R>>(cpu::backward_avx2);
    default: return static_cast<Task<R>>(cpu::backward_generic);
  }
}

// -- layout checks: the Python side prepares it; a mismatch is a bug there, never a crash here --

void expect(const at::Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().vec() == shape, name, ": expected shape ", at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

template <typename R>
const R* in(const opt_tensor& t, const char* name, std::vector<int64_t> shape) {
  if (!t.has_value()) return nullptr;
  expect(*t, name, c10::CppTypeToScalarType<R>::value, shape);
  return t->data_ptr<R>();
}

template <typename R>
R* out(const opt_tensor& t, const char* name, std::vector<int64_t> shape) {
  return const_cast<R*>(in<R>(t, name, shape));
}

struct Common {
  at::Tensor u, delta, A, B, C, seqs, states;
  opt_tensor D, z, bias;
  int64_t groups, chunk, d_state;
  bool softplus;
  double dt_scale, b_scale, c_scale;
};

template <typename R>
ScanArgs<R> common_args(const Common& c) {
  ScanArgs<R> a{};
  a.batch = c.u.size(0);
  a.dim = c.u.size(1);
  a.seqlen = c.u.size(2);
  a.d_state = c.d_state;
  a.d_pad = c.A.size(1);
  a.groups = c.groups;
  a.chunk = c.chunk;
  TORCH_CHECK(c.chunk >= 1 && a.d_pad % (64 / sizeof(R)) == 0 && a.d_pad >= a.d_state && a.groups >= 1 &&
                  a.dim % a.groups == 0, "selective scan (cpp): bad sizes");
  const std::vector<int64_t> act{a.batch, a.dim, a.seqlen};
  a.u = in<R>(c.u, "u", act);
  a.delta = in<R>(c.delta, "delta", act);
  a.z = in<R>(c.z, "z", act);
  a.A = in<R>(c.A, "A", {a.dim, a.d_pad});
  a.B_fixed = c.B.dim() == 2;
  a.C_fixed = c.C.dim() == 2;
  const std::vector<int64_t> fixed{a.dim, a.d_pad}, variable{a.batch, a.groups, a.seqlen, a.d_pad};
  a.B = in<R>(c.B, "B", a.B_fixed ? fixed : variable);
  a.C = in<R>(c.C, "C", a.C_fixed ? fixed : variable);
  a.D = in<R>(c.D, "D", {a.dim});
  a.bias = in<R>(c.bias, "delta_bias", {a.dim});
  TORCH_CHECK(c.seqs.dim() == 2 && c.seqs.size(0) == 4, "seqs: expected (4, n_seqs)");
  expect(c.seqs, "seqs", at::kLong, {4, c.seqs.size(1)});
  const int64_t* s = c.seqs.data_ptr<int64_t>();
  const int64_t n = c.seqs.size(1);
  a.seqs = {n, s, s + n, s + 2 * n, s + 3 * n};
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(a.seqs.batch[i] >= 0 && a.seqs.batch[i] < a.batch && 0 <= a.seqs.start[i] &&
                    a.seqs.start[i] <= a.seqs.end[i] && a.seqs.end[i] <= a.seqlen && a.seqs.slot[i] >= 0,
                "seqs: entry ", i, " out of range");
  a.n_slots = c.states.size(2);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(a.seqs.slot[i] + (a.seqs.end[i] - a.seqs.start[i] + a.chunk - 1) / a.chunk <= a.n_slots,
                "states: too few slots for sequence ", i);
  a.states = out<R>(c.states, "states", {a.batch, a.dim, a.n_slots, a.d_state});
  a.softplus = c.softplus;
  a.dt_scale = static_cast<R>(c.dt_scale);
  a.b_scale = static_cast<R>(c.b_scale);
  a.c_scale = static_cast<R>(c.c_scale);
  return a;
}

template <typename R>
void run_tasks(const ScanArgs<R>& a, int64_t n_tasks, Task<R> task) {
  const int64_t scratch = cpu::scratch_size(a.chunk, a.d_pad);
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<R> buffer(scratch);
    for (int64_t i = begin; i < end; ++i) task(a, i, buffer.data());
  });
}

template <typename R>
void forward_impl(const Common& c, const opt_tensor& h0, const at::Tensor& out_, const at::Tensor& last) {
  ScanArgs<R> a = common_args<R>(c);
  const int64_t S = a.seqs.count;
  a.h0 = in<R>(h0, "initial_state", {S, a.dim, a.d_state});
  a.out = out<R>(out_, "out", {a.batch, a.dim, a.seqlen});
  a.last = out<R>(last, "last_state", {S, a.dim, a.d_state});
  run_tasks(a, S * a.dim, forward_task<R>());
}

template <typename R>
void backward_impl(const Common& c, const at::Tensor& dout, const opt_tensor& dlast, int64_t block,
                   const at::Tensor& du, const at::Tensor& ddelta, const opt_tensor& dz, const at::Tensor& dA,
                   const at::Tensor& dB, const at::Tensor& dC, const opt_tensor& dD, const opt_tensor& dbias,
                   const at::Tensor& dh0) {
  ScanArgs<R> a = common_args<R>(c);
  const int64_t S = a.seqs.count, dpg = a.dim / a.groups;
  TORCH_CHECK(block >= 1, "block: must be at least 1");
  const int64_t n_blocks = (dpg + block - 1) / block;
  a.block = block;
  const std::vector<int64_t> act{a.batch, a.dim, a.seqlen}, per_channel{S, a.dim, a.d_pad};
  const std::vector<int64_t> variable{n_blocks, a.batch, a.groups, a.seqlen, a.d_pad};
  a.dout = in<R>(dout, "dout", act);
  a.dlast = in<R>(dlast, "dlast_state", {S, a.dim, a.d_state});
  a.du = out<R>(du, "du", act);
  a.ddelta = out<R>(ddelta, "ddelta", act);
  TORCH_CHECK(dz.has_value() == (a.z != nullptr), "dz: given exactly when z is");
  TORCH_CHECK(dD.has_value() == (a.D != nullptr) && dbias.has_value() == (a.bias != nullptr),
              "dD, ddelta_bias: given exactly when D, delta_bias are");
  a.dz = out<R>(dz, "dz", act);
  a.dA = out<R>(dA, "dA", per_channel);
  a.dB = out<R>(dB, "dB", a.B_fixed ? per_channel : variable);
  a.dC = out<R>(dC, "dC", a.C_fixed ? per_channel : variable);
  a.dD = out<R>(dD, "dD", {S, a.dim});
  a.dbias = out<R>(dbias, "ddelta_bias", {S, a.dim});
  a.dh0 = out<R>(dh0, "dinitial_state", {S, a.dim, a.d_state});
  run_tasks(a, S * a.groups * n_blocks, backward_task<R>());
}

bool is_double(const at::Tensor& u) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "u: the CPU kernels take float32 or float64 (the Python side converts other dtypes)");
  return u.scalar_type() == at::kDouble;
}

void cpu_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const opt_tensor& D, const opt_tensor& z, const opt_tensor& delta_bias,
                 const opt_tensor& initial_state, const at::Tensor& seqs, int64_t groups, int64_t chunk,
                 bool softplus, double dt_scale, double b_scale, double c_scale, const at::Tensor& out,
                 const at::Tensor& last_state, const at::Tensor& states) {
  const Common c{u, delta, A, B, C, seqs, states, D, z, delta_bias, groups, chunk, last_state.size(2), softplus,
                 dt_scale, b_scale, c_scale};
  if (is_double(u))
    forward_impl<double>(c, initial_state, out, last_state);
  else
    forward_impl<float>(c, initial_state, out, last_state);
}

void cpu_backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const opt_tensor& D, const opt_tensor& z, const opt_tensor& delta_bias,
                  const at::Tensor& seqs, int64_t groups, int64_t chunk, bool softplus, double dt_scale,
                  double b_scale, double c_scale, const at::Tensor& states, const at::Tensor& dout,
                  const opt_tensor& dlast_state, int64_t block, const at::Tensor& du, const at::Tensor& ddelta,
                  const opt_tensor& dz, const at::Tensor& dA, const at::Tensor& dB, const at::Tensor& dC,
                  const opt_tensor& dD, const opt_tensor& ddelta_bias, const at::Tensor& dinitial_state) {
  const Common c{u, delta, A, B, C, seqs, states, D, z, delta_bias, groups, chunk, states.size(3), softplus,
                 dt_scale, b_scale, c_scale};
  if (is_double(u))
    backward_impl<double>(c, dout, dlast_state, block, du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinitial_state);
  else
    backward_impl<float>(c, dout, dlast_state, block, du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinitial_state);
}

}  // namespace

}  // namespace ssm_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace ssm_kernels;
  m.doc() = "ssm_kernels' compiled selective-scan kernels (csrc/)";
  m.def("cpu_forward", &cpu_forward, "CPU selective-scan forward into preallocated buffers", py::kw_only(),
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("initial_state"), py::arg("seqs"), py::arg("groups"), py::arg("chunk"),
        py::arg("softplus"), py::arg("dt_scale"), py::arg("b_scale"), py::arg("c_scale"), py::arg("out"),
        py::arg("last_state"), py::arg("states"));
  m.def("cpu_backward", &cpu_backward, "CPU selective-scan backward into preallocated buffers", py::kw_only(),
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("seqs"), py::arg("groups"), py::arg("chunk"), py::arg("softplus"),
        py::arg("dt_scale"), py::arg("b_scale"), py::arg("c_scale"), py::arg("states"), py::arg("dout"),
        py::arg("dlast_state"), py::arg("block"), py::arg("du"), py::arg("ddelta"), py::arg("dz"), py::arg("dA"),
        py::arg("dB"), py::arg("dC"), py::arg("dD"), py::arg("ddelta_bias"), py::arg("dinitial_state"));
  m.def("cpu_isa", &get_cpu_isa, "the instruction set the CPU kernels run with");
  m.def("cpu_isas", &cpu_isas, "the instruction sets this CPU can run");
  m.def("set_cpu_isa", &set_cpu_isa, "run the CPU kernels with this instruction set (tests)");
#ifdef SSM_KERNELS_WITH_CUDA
  // the argument names are ssm_kernels/ops/selective_scan/cuda_ext.py's keywords
  m.def("cuda_forward", &cuda::forward, "time-parallel CUDA forward into preallocated buffers", py::kw_only(),
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("seqs"), py::arg("states"),
        py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("initial_state"), py::arg("groups"),
        py::arg("softplus"), py::arg("dt_scale"), py::arg("b_scale"), py::arg("c_scale"), py::arg("out"),
        py::arg("last_state"), py::arg("stream"));
  m.def("cuda_backward", &cuda::backward, "time-parallel CUDA backward into preallocated buffers", py::kw_only(),
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("seqs"), py::arg("states"),
        py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("groups"), py::arg("softplus"),
        py::arg("dt_scale"), py::arg("b_scale"), py::arg("c_scale"), py::arg("dout"), py::arg("dlast_state"),
        py::arg("du"), py::arg("ddelta"), py::arg("dz"), py::arg("dA"), py::arg("dB"), py::arg("dC"), py::arg("dD"),
        py::arg("ddelta_bias"), py::arg("dinitial_state"), py::arg("stream"));
#endif
}
