"""Inputs, runner and comparison shared by the selective-scan tests."""

import pytest
import torch

from ssm_kernels.ops.selective_scan.backends import BACKENDS, CHUNKED_BACKENDS
from ssm_kernels.ops.selective_scan.compiled import extension_unavailable_reason
from ssm_kernels.testing import TOLERANCE, relative_error
from ssm_kernels.testing import as_leaves as _as_leaves
from ssm_kernels.testing import scan_inputs as make_inputs  # noqa: F401 (the tests import it from here)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The compiled CPU kernels (csrc/), when the extension is built; tests/test_compiled.py fails
# when it is not, unless SSM_KERNELS_NO_EXT=1 says that is intended.
CPP_REASON = extension_unavailable_reason() if DEVICE.type == "cpu" else "the cpp backend runs on CPU tensors"
NEEDS_EXTENSION = pytest.mark.skipif(CPP_REASON is not None, reason=str(CPP_REASON))
CPP = pytest.param("cpp", marks=NEEDS_EXTENSION)


def cpp_case(*values):
    """A parametrize case ("cpp", *values), skipped where the extension is not built."""
    return pytest.param("cpp", *values, marks=NEEDS_EXTENSION)


# The Triton kernels run through the interpreter on a machine without a GPU: marked slow (the quick
# loop, `pytest -m "not slow"`, leaves their cases out).
SLOW = pytest.mark.slow


def triton_case(*values):
    """A parametrize case ("triton", *values), marked slow."""
    return pytest.param("triton", *values, marks=SLOW)


def _backend_case(name):
    """A backend of the registry as a parametrize case, skipped (with the reason) where it cannot run;
    the Triton one marked slow."""
    reason = BACKENDS[name].unavailable_reason(DEVICE)
    marks = [SLOW] if name == "triton" else []
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"{name}: {reason}"))
    return pytest.param(name, marks=marks)


SCAN_BACKENDS = [_backend_case(name) for name in CHUNKED_BACKENDS]  # every chunked backend of the registry
ALL_BACKENDS = [_backend_case(name) for name in BACKENDS]  # and the reference
ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# TOLERANCE: max |actual - reference| / max |reference| per dtype of the backend's inputs; the
# reference is the float64 sequential scan on the same (rounded) inputs.


def as_leaves(master, dtype, device=DEVICE):
    return _as_leaves(master, dtype, device)


def run_scan(fn, leaves, *, delta_dmajor=False, cotangent_seed=1, cotangent_dtype=None, **kwargs):
    """Calls fn and backpropagates random cotangents from out (and last_state).

    delta_dmajor passes delta as the (batch, dim, L) view of a (dim, batch, L) buffer that
    mamba_inner_fn builds. The cotangents are rounded to cotangent_dtype (default out's dtype)
    so a float64 reference can see the same values as a low-precision run.
    Returns (out, last_state or None, {name: grad})."""
    args = dict(leaves)
    delta_base = None
    if delta_dmajor:
        delta_base = leaves["delta"].detach().permute(1, 0, 2).contiguous().requires_grad_()
        args["delta"] = delta_base.permute(1, 0, 2)
        assert args["delta"].stride(-1) == 1 and not args["delta"].is_contiguous()
    initial_state = args.pop("initial_state", None)
    result = fn(*(args.get(n) for n in ARG_NAMES[:8]), initial_state=initial_state, **kwargs)
    out, last = result if kwargs.get("return_last_state") else (result, None)
    g = torch.Generator().manual_seed(cotangent_seed)
    rounding = cotangent_dtype or out.dtype
    state_rounding = torch.float64 if rounding == torch.float64 else torch.float32

    def cotangent(t, dtype):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype).to(t)
    loss = (out * cotangent(out, rounding)).sum()
    if last is not None:
        loss = loss + (last * cotangent(last, state_rounding)).sum()
    wrt = {n: (delta_base if n == "delta" and delta_base is not None else t) for n, t in leaves.items()}
    grads = dict(zip(wrt, torch.autograd.grad(loss, list(wrt.values()))))
    if delta_base is not None:
        grads["delta"] = grads["delta"].permute(1, 0, 2)
    return out, last, grads


def assert_matches(name, actual, expected, dtype):
    err = relative_error(actual, expected)
    assert err <= TOLERANCE[dtype], (f"{name}: relative error {err:.3g} > {TOLERANCE[dtype]:.3g} for {dtype}"
                                     " (inf: NaN or inf in the result, e.g. an element never written)")


def check_against_reference(backend, master, dtype, *, delta_dmajor=False, **kwargs):
    """Runs `backend` on inputs of `dtype` and the float64 reference on the same values;
    compares out, last_state and the gradient of every input."""
    from ssm_kernels import selective_scan_fn, selective_scan_ref
    leaves = as_leaves(master, dtype)
    out, last, grads = run_scan(selective_scan_fn, leaves, backend=backend, delta_dmajor=delta_dmajor,
                                cotangent_dtype=dtype, **kwargs)
    ref_leaves = {n: t.detach().double().cpu().requires_grad_() for n, t in leaves.items()}
    ref_out, ref_last, ref_grads = run_scan(selective_scan_ref, ref_leaves, cotangent_dtype=dtype, **kwargs)
    assert out.dtype == leaves["u"].dtype and out.shape == ref_out.shape
    assert_matches("out", out, ref_out, dtype)
    if kwargs.get("return_last_state"):
        assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches("last_state", last, ref_last, dtype)
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype, name
        assert_matches(f"d{name}", grad, ref_grads[name], dtype)
