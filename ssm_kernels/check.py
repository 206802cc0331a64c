"""`python -m ssm_kernels check`: every available backend against the float64 reference.

For a few widths d_inner it runs the forward and backward of each backend on the current
device, compares out and every gradient with the sequential reference computed in float64 on
the same inputs, and times forward and forward+backward.
"""

import statistics
import time

import torch

from .ops.selective_scan import selective_scan_fn, selective_scan_ref
from .ops.selective_scan.backends import available_backends

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


def make_inputs(batch, dim, seqlen, d_state, dtype, device, seed=0):
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


def _forward_backward(inputs, backend, grad_out, grad_last, backward=True):
    leaves = {n: t.detach().requires_grad_(backward) for n, t in inputs.items()}
    fn = selective_scan_ref if backend == "ref" else selective_scan_fn
    out, last = fn(*leaves.values(), delta_softplus=True, return_last_state=True, backend=backend, **MULTIPLIERS)
    if not backward:
        return out, last, {}
    grads = torch.autograd.grad([out, last], list(leaves.values()), [grad_out.to(out), grad_last.to(last)])
    return out, last, dict(zip(leaves, grads))


def median_ms(fn, device, repeats):
    """Median wall time of fn() in ms after one warm-up call (synchronized on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check(widths, batch, seqlen, d_state, dtype, device, backends=None, repeats=3, print_fn=print):
    """Prints one row per (width, backend); returns True when every error is within TOLERANCE."""
    backends = backends or available_backends(device)
    tol = TOLERANCE[dtype]
    print_fn(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
             f"torch {torch.__version__}; batch {batch}, L {seqlen}, N {d_state}, {dtype}; multipliers {MULTIPLIERS}")
    if "triton" in backends and device.type != "cuda":
        print_fn("triton runs under TRITON_INTERPRET=1 on the CPU: its times say nothing about GPU speed")
    print_fn(f"error = max |x - ref| / max |ref| against the float64 sequential reference; tolerance {tol:g}")
    header = f"{'backend':<8} {'d_inner':>7} {'err out':>9} {'err grads':>9} {'fwd ms':>9} {'fwd+bwd ms':>10}  check"
    print_fn(header)
    print_fn("-" * len(header))
    all_ok = True
    for dim in widths:
        inputs = make_inputs(batch, dim, seqlen, d_state, dtype, device)
        g = torch.Generator().manual_seed(1)
        grad_out = torch.randn(batch, dim, seqlen, generator=g).to(device, dtype)
        grad_last = torch.randn(batch, dim, d_state, generator=g).to(device)
        ref_inputs = {n: t.double() for n, t in inputs.items()}
        ref_out, ref_last, ref_grads = _forward_backward(ref_inputs, "ref", grad_out.double(), grad_last.double())
        for backend in backends:
            out, last, grads = _forward_backward(inputs, backend, grad_out, grad_last)
            err_out = max(relative_error(out, ref_out), relative_error(last, ref_last))
            err_grads = max(relative_error(grads[n], ref_grads[n]) for n in grads)
            fwd = median_ms(lambda: _forward_backward(inputs, backend, grad_out, grad_last, backward=False),
                           device, repeats)
            fwdbwd = median_ms(lambda: _forward_backward(inputs, backend, grad_out, grad_last), device, repeats)
            ok = err_out <= tol and err_grads <= tol
            all_ok &= ok
            print_fn(f"{backend:<8} {dim:>7} {err_out:>9.2e} {err_grads:>9.2e} {fwd:>9.2f} {fwdbwd:>10.2f}  "
                     f"{'ok' if ok else 'FAIL'}")
    return all_ok
