"""Benchmark and profiling support: workloads, the bytes model, timing, peak memory, plots.

`benchmarks/` (pytest-benchmark) and `python -m ssm_kernels profile` both build their
selective-scan calls from `workload.py`; `python -m ssm_kernels.bench plot` draws a results file.
"""

from .workload import (BENCH_BACKENDS, MODES, MULTIPLIER_MODES, Workload, bench_backends, bytes_moved,
                       device_name, peak_bandwidth_gbps, peak_memory_bytes, scan_step)

__all__ = ["BENCH_BACKENDS", "MODES", "MULTIPLIER_MODES", "Workload", "bench_backends", "bytes_moved",
           "device_name", "peak_bandwidth_gbps", "peak_memory_bytes", "scan_step"]
