"""`python -m ssm_kernels check`: every available backend against the float64 reference.

For a few widths d_inner it runs the forward and backward of each backend on the current
device, compares out and every gradient with the sequential reference computed in float64 on
the same inputs, and times forward and forward+backward.
"""

import torch

from ..bench.workload import median_ms
from ..ops.selective_scan import selective_scan_fn, selective_scan_ref
from ..ops.selective_scan.backends import CHUNKED_BACKENDS, available_backends
from ..testing import DTYPES, MULTIPLIERS, TOLERANCE, mamba_like_inputs, relative_error
from .args import check_backends, default_device, device, positive_int

HELP = "backends against the float64 reference (default)"
IO_DTYPE_NAMES = tuple(name for name in DTYPES if name != "fp64")  # what the kernels take


def add_arguments(parser):
    parser.add_argument("--widths", type=positive_int, nargs="+", help="d_inner values (default: 64 256 1024 on the "
                        "CPU, 768 1536 3072 on CUDA)")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seqlen", type=positive_int, default=256)
    parser.add_argument("--d-state", type=positive_int, default=16)
    parser.add_argument("--dtype", choices=IO_DTYPE_NAMES, help="default fp32 on the CPU, bf16 on CUDA")
    parser.add_argument("--backends", nargs="+", choices=CHUNKED_BACKENDS,
                        help="default: torch, plus triton on CUDA or under TRITON_INTERPRET=1")
    parser.add_argument("--device", type=device, help="default cuda when available, else cpu")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions (median reported)")


def run(parser, args) -> int:
    dev = default_device(args.device)
    check_backends(parser, "--backends", args.backends, dev)
    on_gpu = dev.type == "cuda"
    widths = args.widths or ([768, 1536, 3072] if on_gpu else [64, 256, 1024])
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    ok = check(widths, batch=args.batch, seqlen=args.seqlen, d_state=args.d_state, dtype=dtype, device=dev,
               backends=args.backends, repeats=args.repeats)
    return 0 if ok else 1


def _forward_backward(inputs, backend, grad_out, grad_last, backward=True):
    """out, last_state and every input's gradient on `backend`; None: the sequential reference."""
    leaves = {n: t.detach().requires_grad_(backward) for n, t in inputs.items()}
    fn = selective_scan_ref if backend is None else selective_scan_fn
    out, last = fn(*leaves.values(), delta_softplus=True, return_last_state=True, backend=backend, **MULTIPLIERS)
    if not backward:
        return out, last, {}
    grads = torch.autograd.grad([out, last], list(leaves.values()), [grad_out.to(out), grad_last.to(last)])
    return out, last, dict(zip(leaves, grads))


def check(widths, *, batch, seqlen, d_state, dtype, device, backends=None, repeats=3, print_fn=print):
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
        inputs = mamba_like_inputs(batch, dim, seqlen, d_state, dtype, device)
        g = torch.Generator().manual_seed(1)
        grad_out = torch.randn(batch, dim, seqlen, generator=g).to(device, dtype)
        grad_last = torch.randn(batch, dim, d_state, generator=g).to(device)
        ref_inputs = {n: t.double() for n, t in inputs.items()}
        ref_out, ref_last, ref_grads = _forward_backward(ref_inputs, None, grad_out.double(), grad_last.double())
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
