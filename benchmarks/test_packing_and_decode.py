"""Packed variable-length training (cu_seqlens) against padding, and decoding tokens/s.

Packing: 8 sequences, lengths log-uniform from 16 to --bench-seqlen (2048 on CUDA), the scan's
forward + backward at the first --bench-widths d_inner; "packed" and "padded" share a group, so
pytest-benchmark's table shows their ratio. Decode: one MambaLM token (2 layers) per round at
d_model = d_inner / 2 for each width, `tokens_per_s` in extra_info.
"""

import torch

from ssm_kernels.bench import device_name
from ssm_kernels.bench.packing import decode_step, log_uniform_lengths, packing_step
from ssm_kernels.bench.workload import synchronized
from ssm_kernels.testing import DTYPES


def _time(benchmark, bench_settings, step):
    results = [step()]  # untimed first call (Triton compiles here); its results must be finite
    outputs = results[0] if isinstance(results[0], tuple) else (results[0],)
    assert all(torch.isfinite(t).all() for t in outputs)
    benchmark.pedantic(step, rounds=bench_settings["rounds"], warmup_rounds=bench_settings["warmup"], iterations=1)
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def test_packing(benchmark, bench_settings, backend, layout):
    device, seqlen = bench_settings["device"], bench_settings["seqlen"]
    lengths = log_uniform_lengths(8, min(16, seqlen), seqlen)
    d_inner = bench_settings["widths"][0]
    step = synchronized(packing_step(lengths, d_inner, bench_settings["d_state"], DTYPES[bench_settings["dtype"]],
                                     device, backend, layout), device)
    benchmark.group = f"packing d_inner={d_inner}"
    tokens = sum(lengths) if layout == "packed" else len(lengths) * max(lengths)
    benchmark.extra_info.update(backend=backend, layout=layout, lengths=lengths, d_inner=d_inner,
                                d_state=bench_settings["d_state"], dtype=bench_settings["dtype"],
                                device=device_name(device), tokens_computed=tokens, tokens_real=sum(lengths))
    median = _time(benchmark, bench_settings, step)
    if median is not None:
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["real_tokens_per_s"] = sum(lengths) / median


def test_decode(benchmark, bench_settings, backend, decode_width):
    device = bench_settings["device"]
    d_model = max(1, decode_width // 2)
    step = synchronized(decode_step(d_model, 2, bench_settings["batch"], DTYPES[bench_settings["dtype"]], device,
                                    backend), device)
    benchmark.group = "decode"
    benchmark.extra_info.update(backend=backend, d_model=d_model, n_layer=2, batch=bench_settings["batch"],
                                dtype=bench_settings["dtype"], device=device_name(device))
    median = _time(benchmark, bench_settings, step)
    if median is not None:
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["tokens_per_s"] = bench_settings["batch"] / median
