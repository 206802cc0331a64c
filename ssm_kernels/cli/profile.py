"""`python -m ssm_kernels profile`: one selective-scan configuration, usually at large width.

Warm-up steps (Triton compiles in the first), timed steps (median time and achieved bandwidth
against the minimal bytes of bench.workload.bytes_moved), then one step under torch.profiler:
the top kernels (CUDA) or ops (CPU) by self time, the peak memory of that step, and optionally a
Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev).
"""

import statistics
import time
import warnings

import torch

from ..bench.workload import (BENCH_BACKENDS, MULTIPLIER_MODES, Workload, bytes_moved, device_name,
                              peak_allocated_bytes, peak_bandwidth_gbps, scan_step, synchronized, trace_events)
from ..ops.selective_scan.backends import default_backend
from .args import check_backends, check_output_path, default_device, device, nonnegative_int, positive_int
from .check import IO_DTYPE_NAMES

HELP = "one configuration under torch.profiler"

# b * d_inner * L * N above which a CPU run is slow (the "torch" backend takes about a second
# per 2**25 such elements for forward and backward on 2 cores).
CPU_LARGE = 2**26


def add_arguments(parser):
    parser.add_argument("--d-inner", type=positive_int, default=16384)
    parser.add_argument("--seqlen", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--d-state", type=positive_int, default=16)
    parser.add_argument("--dtype", choices=IO_DTYPE_NAMES, help="default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--backward", action="store_true", help="profile forward+backward (default: forward)")
    parser.add_argument("--trace", metavar="PATH", help="write a Chrome trace of the profiled step")
    parser.add_argument("--backend", choices=BENCH_BACKENDS,
                        help="default triton on CUDA; on the CPU cpp when built, else torch (triton there needs "
                        "TRITON_INTERPRET=1)")
    parser.add_argument("--multipliers", choices=MULTIPLIER_MODES, default="fused")
    parser.add_argument("--device", type=device, help="default cuda when available, else cpu")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps (median reported)")


def run(parser, args) -> int:
    dev = default_device(args.device)
    check_backends(parser, "--backend", [args.backend] if args.backend else None, dev)
    if args.backend == "mamba_ssm" and dev.type != "cuda":
        parser.error("--backend mamba_ssm: its CUDA kernel needs a CUDA device")
    check_output_path(parser, "--trace", args.trace)
    dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    profile(args.d_inner, args.seqlen, args.batch, dtype=dtype, d_state=args.d_state, backward=args.backward,
            trace=args.trace, backend=args.backend, device=dev, multipliers=args.multipliers, warmup=args.warmup,
            steps=args.steps)
    return 0

def _progress(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def profile(d_inner, seqlen, batch, dtype="bf16", d_state=16, backward=False, trace=None, backend=None,
            device=None, multipliers="fused", warmup=2, steps=3, row_limit=12, print_fn=print):
    """Runs the profile and prints the report; returns its numbers as a dict."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = backend or default_backend(device)
    w = Workload(batch=batch, d_inner=d_inner, seqlen=seqlen, d_state=d_state, dtype=dtype, device=str(device))
    mode = "fwdbwd" if backward else "fwd"
    elements = batch * d_inner * seqlen * d_state
    if device.type != "cuda" and elements > CPU_LARGE:
        warnings.warn(f"batch*d_inner*seqlen*d_state = {elements:.3g} is large for the CPU: each step may take "
                      "minutes; pass smaller --d-inner/--seqlen for a quick look", stacklevel=2)
    name = device_name(device)
    print_fn(f"profile: {mode} of the selective scan on {device} ({name}), backend {backend}, multipliers "
             f"{multipliers}; batch {batch}, d_inner {d_inner}, L {seqlen}, N {d_state}, {dtype}")
    step = synchronized(scan_step(w, backend, multipliers, mode), device)

    times = []
    with _progress(warmup + steps + 1, "warm-up, timed and profiled steps") as bar:
        for _ in range(warmup):
            step()
            bar.update()
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            bar.update()

        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            step()
        bar.update()
    events = trace_events(prof, trace)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = peak_allocated_bytes(events)

    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print_fn(f"top {'kernels' if device.type == 'cuda' else 'ops'} by self time in the profiled step:")
    print_fn(prof.key_averages().table(sort_by=sort_by, row_limit=row_limit))

    median_s = statistics.median(times) if times else float("nan")
    moved = bytes_moved(mode, w)
    gbps = moved / median_s / 1e9
    roof = peak_bandwidth_gbps(name)
    print_fn(f"median step {median_s * 1e3:.3f} ms over {steps} timed steps (wall clock"
             f"{', synchronized' if device.type == 'cuda' else ''})")
    print_fn(f"achieved bandwidth {gbps:.4g} GB/s for the {moved / 1e6:.4g} MB the {mode} must move"
             + (f" ({100 * gbps / roof:.1f}% of the {roof:g} GB/s peak)" if roof else ""))
    print_fn(f"peak memory of the profiled step {peak / 2**20:.1f} MiB")
    if trace:
        print_fn(f"wrote Chrome trace {trace}")
    return dict(workload=w.as_dict(), backend=backend, mode=mode, multipliers=multipliers, median_ms=median_s * 1e3,
                gbps=gbps, bytes=moved, peak_mem_bytes=peak, trace=trace)
