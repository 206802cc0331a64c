"""Inputs, runner and comparison shared by the selective-scan tests."""

import pytest
import torch

from ssm_kernels.check import TOLERANCE, relative_error
from ssm_kernels.ops.selective_scan.compiled import extension_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The compiled CPU kernels (csrc/), when the extension is built; tests/test_compiled.py fails
# when it is not, unless SSM_KERNELS_NO_EXT=1 says that is intended.
CPP_REASON = extension_unavailable_reason() if DEVICE.type == "cpu" else "the cpp backend runs on CPU tensors"
NEEDS_EXTENSION = pytest.mark.skipif(CPP_REASON is not None, reason=str(CPP_REASON))
CPP = pytest.param("cpp", marks=NEEDS_EXTENSION)


def cpp_case(*values):
    """A parametrize case ("cpp", *values), skipped where the extension is not built."""
    return pytest.param("cpp", *values, marks=NEEDS_EXTENSION)


SCAN_BACKENDS = ["torch", "triton", CPP]  # every chunked backend the tests run on this machine
ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# TOLERANCE: max |actual - reference| / max |reference| per dtype of the backend's inputs; the
# reference is the float64 sequential scan on the same (rounded) inputs.


def make_inputs(batch=2, dim=4, seqlen=37, d_state=4, *, B="grouped", C="grouped", groups=2, D=True, z=True,
                bias=True, initial_state=True, seed=0, big_delta=False):
    """float64 master copies on the CPU. B/C kind: "fixed" (dim, N), "variable" (batch, N, L)
    or "grouped" (batch, groups, N, L). Values are random and never all zero."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def state_matrix(kind):
        if kind == "fixed":
            return randn(dim, d_state)
        if kind == "variable":
            return randn(batch, d_state, seqlen)
        return randn(batch, groups, d_state, seqlen)

    delta = 0.5 * rand(batch, dim, seqlen) + 0.05
    if big_delta:  # some pre-activations beyond softplus' threshold of 20
        delta[..., ::3] += 25.0
    return dict(
        u=randn(batch, dim, seqlen), delta=delta,
        A=-(0.1 + 1.5 * rand(dim, d_state)),
        B=state_matrix(B), C=state_matrix(C),
        D=randn(dim) if D else None, z=randn(batch, dim, seqlen) if z else None,
        delta_bias=0.5 * randn(dim) if bias else None,
        initial_state=randn(batch, dim, d_state) if initial_state else None,
    )


def as_leaves(master, dtype, device=DEVICE):
    """Leaf tensors as a user would pass them: activations and variable B/C in `dtype`, the
    parameters A, D, delta_bias, fixed B/C and initial_state in float32 (float64 stays float64)."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {}
    for name, t in master.items():
        if t is None:
            continue
        is_param = name in ("A", "D", "delta_bias", "initial_state") or (name in ("B", "C") and t.dim() == 2)
        leaves[name] = t.to(device=device, dtype=param_dtype if is_param else dtype).requires_grad_()
    return leaves


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
