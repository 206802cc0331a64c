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

from .bench.workload import (Workload, bytes_moved, device_name, peak_allocated_bytes,
                             peak_bandwidth_gbps, scan_step, synchronized, trace_events)
from .ops.selective_scan.backends import default_backend

# b * d_inner * L * N above which a CPU run is slow (the "torch" backend takes about a second
# per 2**25 such elements for forward and backward on 2 cores).
CPU_LARGE = 2**26


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
