"""Throughput of the selective scan across widths: backends x multiplier modes x fwd/bwd/fwdbwd."""

import torch

from ssm_kernels.bench import Workload, bytes_moved, device_name, peak_bandwidth_gbps, peak_memory_bytes, scan_step
from ssm_kernels.bench.workload import synchronized


def test_scan(benchmark, bench_settings, backend, multipliers, mode, d_inner):
    device = bench_settings["device"]
    w = Workload(batch=bench_settings["batch"], d_inner=d_inner, seqlen=bench_settings["seqlen"],
                 d_state=bench_settings["d_state"], dtype=bench_settings["dtype"], device=str(device))
    step = synchronized(scan_step(w, backend, multipliers, mode), device)
    name = device_name(device)
    benchmark.group = f"{mode} d_inner={d_inner}"
    benchmark.extra_info.update(w.as_dict(), backend=backend, mode=mode, multipliers=multipliers, device=name,
                                bytes=bytes_moved(mode, w), peak_bandwidth_gbps=peak_bandwidth_gbps(name))
    # Peak memory from one untimed call (also the first warm-up: Triton compiles here), whose
    # results must be finite: a broken step is not worth timing.
    results = []
    benchmark.extra_info["peak_mem_bytes"] = peak_memory_bytes(lambda: results.append(step()), device)
    outputs = results[0] if isinstance(results[0], tuple) else (results[0],)
    assert all(torch.isfinite(t).all() for t in outputs if t is not None)
    # Warm-up rounds are excluded from the statistics; on CUDA every round ends in a synchronize.
    benchmark.pedantic(step, rounds=bench_settings["rounds"], warmup_rounds=bench_settings["warmup"], iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median_s = stats.stats.median
        benchmark.extra_info["median_ms"] = median_s * 1e3
        benchmark.extra_info["gbps"] = bytes_moved(mode, w) / median_s / 1e9
        benchmark.extra_info["elements_per_s"] = w.batch * w.d_inner * w.seqlen / median_s
    else:
        benchmark.extra_info["gbps"] = None
