"""The compiled extension (csrc/, the "cpp" backend): built where the README's test command
builds it, correct in every instruction set it was compiled for, deterministic across thread
counts, and never a silent fallback."""

import os

import pytest
import torch

from scan_cases import CPP_REASON, NEEDS_EXTENSION, as_leaves, assert_matches, check_against_reference, make_inputs
from scan_cases import run_scan
from ssm_kernels import selective_scan_fn
from ssm_kernels.ops.selective_scan import compiled
from ssm_kernels.ops.selective_scan.backends import default_backend, resolve_backend

FULL = dict(delta_softplus=True, return_last_state=True, dt_scale=0.7, b_scale=1.3, c_scale=0.6)


def test_extension_is_built():
    """README's test command builds csrc/ (SSM_KERNELS_BUILD_EXT=1) before running the tests; set
    SSM_KERNELS_NO_EXT=1 to run them on purpose without it."""
    if os.environ.get("SSM_KERNELS_NO_EXT", "0") not in ("", "0"):
        pytest.skip("SSM_KERNELS_NO_EXT is set")
    assert compiled.extension_unavailable_reason() is None, compiled.extension_unavailable_reason()


@NEEDS_EXTENSION
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bc", ["grouped", "fixed"])
def test_every_instruction_set(dtype, bc):
    """Each ISA's copy of the kernels (generic, avx2, avx512: those this CPU runs) against the
    float64 reference; N = 19 is not a whole vector, so the padding lanes are exercised."""
    from ssm_kernels import _C
    before = _C.cpu_isa()
    try:
        for isa in _C.cpu_isas():
            _C.set_cpu_isa(isa)
            check_against_reference("cpp", make_inputs(dim=6, groups=3, seqlen=131, d_state=19, B=bc, C=bc, seed=4),
                                    dtype, **FULL)
    finally:
        _C.set_cpu_isa(before)


@NEEDS_EXTENSION
def test_unknown_or_missing_instruction_set_is_refused():
    from ssm_kernels import _C
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        _C.set_cpu_isa("sse9")


@NEEDS_EXTENSION
@pytest.mark.parametrize("bc", ["grouped", "fixed"])
def test_bitwise_the_same_for_any_thread_count(bc):
    """Partial sums are per task and reduced in a fixed order: 1 and 2 threads give the same bits."""
    leaves = as_leaves(make_inputs(dim=20, groups=2, seqlen=150, d_state=16, B=bc, C=bc, seed=6), torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(run_scan(selective_scan_fn, leaves, backend="cpp", **FULL))
    finally:
        torch.set_num_threads(threads)
    (out1, last1, g1), (out2, last2, g2) = runs
    assert torch.equal(out1, out2) and torch.equal(last1, last2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@NEEDS_EXTENSION
def test_strided_inputs():
    """Views the Python side must lay out: time-reversed u, a transposed delta, B/C with a stride
    along time, a non-contiguous A; the same results as contiguous copies."""
    leaves = as_leaves(make_inputs(seqlen=40, B="variable", C="variable", seed=2), torch.float32)
    strided = {n: t.detach().clone() for n, t in leaves.items()}
    strided["u"] = strided["u"].flip(-1).contiguous().flip(-1)  # negative stride
    strided["delta"] = strided["delta"].transpose(0, 2).contiguous().transpose(0, 2)
    strided["B"] = torch.repeat_interleave(strided["B"], 2, dim=-1)[..., ::2]
    strided["A"] = strided["A"].t().contiguous().t()
    assert not strided["delta"].is_contiguous() and not strided["B"].is_contiguous()
    plain = selective_scan_fn(*(leaves[n].detach() for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                              initial_state=leaves["initial_state"].detach(), backend="cpp", **FULL)
    views = selective_scan_fn(*(strided[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                              initial_state=strided["initial_state"], backend="cpp", **FULL)
    assert torch.equal(plain[0], views[0]) and torch.equal(plain[1], views[1])


@NEEDS_EXTENSION
def test_cpp_is_the_cpu_default_and_refuses_other_devices():
    assert default_backend(torch.device("cpu")) == "cpp"
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_backend("cpp", torch.empty(1, 1, 1, device="meta"))


def test_without_the_extension_cpp_is_refused_and_the_default_is_torch(monkeypatch):
    """Asked for by name, a missing extension is an error that says how to build it; only the
    default moves to the "torch" backend."""
    monkeypatch.setattr(compiled, "_extension", lambda: (None, ImportError("no module named ssm_kernels._C")))
    u = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="SSM_KERNELS_BUILD_EXT=1"):
        resolve_backend("cpp", u)
    monkeypatch.setenv("SSM_KERNELS_BACKEND", "cpp")
    with pytest.raises(ValueError, match="SSM_KERNELS_BACKEND: the 'cpp' backend needs the compiled extension"):
        resolve_backend(None, u)
    monkeypatch.delenv("SSM_KERNELS_BACKEND")
    assert resolve_backend(None, u) == "torch"


@NEEDS_EXTENSION
def test_long_sequence_many_chunks_low_precision():
    """bfloat16 activations over 40 saved chunks, odd length, every gradient."""
    check_against_reference("cpp", make_inputs(batch=1, dim=3, groups=3, seqlen=2561, d_state=5, seed=11), torch.bfloat16,
                            **FULL)


@pytest.mark.skipif(CPP_REASON is not None, reason=str(CPP_REASON))
def test_matches_the_torch_backend_closely():
    """The two CPU backends agree far inside the float32 tolerance (the same algorithm)."""
    leaves = as_leaves(make_inputs(seqlen=100, seed=12), torch.float32)
    a = run_scan(selective_scan_fn, leaves, backend="cpp", **FULL)
    b = run_scan(selective_scan_fn, leaves, backend="torch", **FULL)
    assert_matches("out", a[0], b[0], torch.float32)
    for name in a[2]:
        assert_matches(f"d{name}", a[2][name], b[2][name], torch.float32)


@NEEDS_EXTENSION
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_state", [5, 16])
def test_an_infinite_delta_gives_no_nan_from_the_padding_lanes(dtype, d_state):
    """N = 5 pads to whole vectors with A = 0 there; delta = +inf (softplus on) made dt * A =
    inf * 0 = NaN in the padded decays and ddelta NaN at that step. The gradients now equal the
    "torch" backend's, also at that step, and are finite where its are."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, 3, generator=g, dtype=dtype)
    delta = torch.rand(1, 2, 3, generator=g, dtype=dtype)
    delta[0, 0, 1] = float("inf")
    A = -torch.rand(2, d_state, generator=g, dtype=torch.float32) - 0.1
    B, C = (torch.randn(1, d_state, 3, generator=g, dtype=dtype) for _ in range(2))
    grads = {}
    for backend in ("cpp", "torch"):
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C)]
        out = selective_scan_fn(*leaves, delta_softplus=True, backend=backend)
        out[0, 0, 0].backward()
        grads[backend] = [t.grad for t in leaves]
    for name, got, expected in zip(("u", "delta", "A", "B", "C"), grads["cpp"], grads["torch"]):
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), name
        torch.testing.assert_close(got, expected, equal_nan=True, msg=name)
    assert grads["cpp"][1][0, 0, 1] == 0.0  # the step with delta = inf (NaN before)
