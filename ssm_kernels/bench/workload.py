"""One selective-scan workload: its inputs, the step to time, the bytes it must move, its peak memory.

A step is what a Mamba layer runs: u, delta, z (batch, d_inner, L), variable B and C
(batch, N, L), D, delta_bias, S4D-real A, delta_softplus=True. Three ways of applying the
width multipliers dt_scale, b_scale, c_scale are compared:
  "fused"    passed to our kernel, applied inside the recurrence;
  "separate" delta, B and C multiplied by ordinary tensor ops, then the scan with multipliers 1
             (what Falcon-H1's `mup_vector` does);
  "none"     no multipliers.
"""

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ..ops.selective_scan import selective_scan_fn
from ..ops.selective_scan.backends import CHUNKED_BACKENDS, available_backends
from ..testing import DTYPES, MULTIPLIERS, mamba_like_inputs

# what a benchmark can time: our chunked backends (one source: the registry) and mamba_ssm's CUDA scan
BENCH_BACKENDS = CHUNKED_BACKENDS + ("mamba_ssm",)
MODES = ("fwd", "bwd", "fwdbwd")
MULTIPLIER_MODES = ("fused", "separate", "none")

# Peak HBM bandwidth in GB/s (vendor data sheets), matched against torch.cuda.get_device_name:
# the roofline of a memory-bound op. First match wins, so the more specific names come first.
PEAK_BANDWIDTH_GBPS = (
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),     # SXM5, HBM3
    ("H200", 4800.0),
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),     # 40 GB
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
)


def _mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as scan
    except Exception:  # not installed, or its CUDA extension does not load here
        return None
    return scan


def bench_backends(device: torch.device):
    """Our backends that run on `device` (the registry's available_backends), plus mamba_ssm on CUDA
    when importable."""
    backends = available_backends(device)
    if device.type == "cuda" and _mamba_ssm_scan() is not None:
        backends.append("mamba_ssm")
    return backends


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


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_bandwidth_gbps(name: str) -> Optional[float]:
    """The device's peak memory bandwidth in GB/s, or None when it is not in the table (CPUs)."""
    for key, gbps in PEAK_BANDWIDTH_GBPS:
        if key in name:
            return gbps
    return None


@dataclass(frozen=True)
class Workload:
    batch: int
    d_inner: int
    seqlen: int
    d_state: int = 16
    dtype: str = "bf16"
    device: str = "cuda"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    def inputs(self, seed=0):
        return mamba_like_inputs(self.batch, self.d_inner, self.seqlen, self.d_state, self.torch_dtype,
                           torch.device(self.device), seed=seed)

    def as_dict(self):
        return asdict(self)


def bytes_moved(mode: str, w: Workload) -> int:
    """The bytes the op must move through memory at the least, each tensor read or written once.

    With s = element size, X = batch*d_inner*L (u, delta, z, out and their grads) and
    S = batch*N*L (B or C; G = 1 group):
      fwd:    reads u, delta, z, B, C, writes out                    ->  4*X*s + 2*S*s
      bwd:    reads dout, u, delta, z, B, C, writes du, ddelta, dz,
              dB, dC                                                 ->  7*X*s + 4*S*s
      fwdbwd: both                                                   -> 11*X*s + 6*S*s
    The (d_inner, N) and (d_inner,) parameters and the saved chunk states are left out: they are
    small against X, and the states are our design's choice, not what the op must move. Every
    backend and multiplier mode is measured against the same count, so GB/s compares times.
    """
    s = torch.empty((), dtype=w.torch_dtype).element_size()
    X = w.batch * w.d_inner * w.seqlen
    S = w.batch * w.d_state * w.seqlen
    per_mode = {"fwd": 4 * X + 2 * S, "bwd": 7 * X + 4 * S, "fwdbwd": 11 * X + 6 * S}
    if mode not in per_mode:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return per_mode[mode] * s


def _scan(backend: str, multipliers: str):
    """f(u, delta, A, B, C, D, z, delta_bias) -> out for one backend and multiplier mode."""
    if multipliers not in MULTIPLIER_MODES:
        raise ValueError(f"multipliers: expected one of {MULTIPLIER_MODES}, got {multipliers!r}")
    if backend == "mamba_ssm":
        if multipliers == "fused":
            raise ValueError("multipliers: mamba_ssm's selective_scan_fn has no fused multipliers")
        scan = _mamba_ssm_scan()
        if scan is None:
            raise ValueError("backend: mamba_ssm is not importable here")
    elif backend in CHUNKED_BACKENDS:
        def scan(*args, **kwargs):
            return selective_scan_fn(*args, backend=backend, **kwargs)
    else:
        raise ValueError(f"backend: expected one of {BENCH_BACKENDS}, got {backend!r}")

    def run(u, delta, A, B, C, D, z, delta_bias):
        if multipliers == "fused":
            return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, **MULTIPLIERS)
        if multipliers == "separate":
            delta = delta * MULTIPLIERS["dt_scale"]
            B = B * MULTIPLIERS["b_scale"]
            C = C * MULTIPLIERS["c_scale"]
        return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    return run


def scan_step(w: Workload, backend: str, multipliers: str, mode: str) -> Callable[[], object]:
    """A callable running one step of `mode` on fresh random inputs of workload w.

    "fwd" is a training forward (inputs require grad, so whatever the backward needs is saved);
    "bwd" runs the forward once here and each call back-propagates through it again
    (retain_graph); "fwdbwd" does both. The callable does not synchronize.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    run = _scan(backend, multipliers)
    inputs = {name: t.requires_grad_() for name, t in w.inputs().items()}
    leaves = list(inputs.values())
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(w.batch, w.d_inner, w.seqlen, generator=g).to(w.device, w.torch_dtype)

    if mode == "fwd":
        return lambda: run(**inputs)
    if mode == "bwd":
        out = run(**inputs)
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return lambda: torch.autograd.grad(run(**inputs), leaves, dout)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn followed by a device synchronize, so wall-clock timers see the GPU work finish."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result
    return call


def peak_memory_bytes(fn: Callable[[], object], device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before it.

    CUDA: torch.cuda's caching-allocator statistics. CPU: the allocator events torch.profiler
    records with profile_memory=True (its Chrome trace carries the running total). Memory that
    Triton's interpreter holds in NumPy arrays is not a torch allocation and is not counted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return peak_allocated_bytes(trace_events(prof))


def trace_events(prof, path=None):
    """The Chrome-trace events of a finished torch.profiler run, written to path when given (a
    profiler exports its trace only once, so one call serves the file and the events)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = path or os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def peak_allocated_bytes(events, device_type: int = 0) -> int:
    """Largest running sum of the allocator events ('[memory]'; device type 0 = CPU) in time order.

    Each event's 'Bytes' is positive for an allocation and negative for a free. ('Total
    Allocated' is not used: it carries over between profiling sessions.)"""
    memory = [e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == device_type]
    live = peak = 0
    for event in sorted(memory, key=lambda e: e["ts"]):
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak
