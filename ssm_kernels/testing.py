"""What tests, the `check` command and the benchmarks share: tolerances, the error measure,
random inputs, and the multipliers that make a scan's width multipliers differ from 1."""

import torch

# Max |x - ref| / max |ref| allowed per input dtype; the tests use the same table.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# Multipliers of a model 4x wider than its base under muP-SSM-like scaling: not 1, so the check
# covers them.
MULTIPLIERS = dict(dt_scale=0.5, b_scale=2.0, c_scale=0.25)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64; inf when actual has NaN or inf."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


def mamba_like_inputs(batch, dim, seqlen, d_state, dtype, device, seed=0):
    """A Mamba-like call: variable B and C (batch, N, L), D, z, delta_bias, S4D-real A."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)
    return dict(
        u=randn(batch, dim, seqlen).to(device, dtype), delta=(0.5 * randn(batch, dim, seqlen)).to(device, dtype),
        A=-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1).to(device),
        B=randn(batch, d_state, seqlen).to(device, dtype), C=randn(batch, d_state, seqlen).to(device, dtype),
        D=randn(dim).to(device), z=randn(batch, dim, seqlen).to(device, dtype),
        delta_bias=(randn(dim) - 4.0).to(device),
    )


def scan_inputs(batch=2, dim=4, seqlen=37, d_state=4, *, B="grouped", C="grouped", groups=2, D=True, z=True,
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


def as_leaves(master, dtype, device):
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
