"""Options and the grid of `pytest benchmarks/`.

Each option can also be set by an environment variable (the option wins), e.g.
SSM_BENCH_WIDTHS="768 3072" pytest benchmarks/. Defaults depend on the device: the full grid on
CUDA, a quick one on the CPU (Triton only when TRITON_INTERPRET=1 is set).
"""

import os

import pytest
import torch

from ssm_kernels.bench import MODES, MULTIPLIER_MODES, bench_backends

CUDA_DEFAULTS = dict(widths="768 1536 3072 6144 12288", seqlen="2048", batch="4", d_state="16", dtype="bf16",
                     rounds="20", warmup="3")
# About a minute on 2 cores (torch backend only).
CPU_DEFAULTS = dict(widths="64 256 1024", seqlen="256", batch="2", d_state="16", dtype="fp32", rounds="5",
                    warmup="3")

OPTIONS = {  # name: help
    "widths": "d_inner values",
    "seqlen": "sequence length L",
    "batch": "batch size",
    "d_state": "state size N",
    "dtype": "fp32, fp16 or bf16",
    "backends": "subset of triton, torch, cpp, mamba_ssm (default: those available here)",
    "modes": f"subset of {' '.join(MODES)}",
    "multipliers": f"subset of {' '.join(MULTIPLIER_MODES)}",
    "rounds": "timed rounds per benchmark",
    "warmup": "untimed warm-up rounds per benchmark",
    "device": "cuda or cpu (default: cuda when available)",
}


def pytest_addoption(parser):
    group = parser.getgroup("ssm_kernels benchmarks")
    for name, help in OPTIONS.items():
        env = "SSM_BENCH_" + name.upper()
        group.addoption("--bench-" + name.replace("_", "-"), dest="bench_" + name, default=None,
                        help=f"{help} (space- or comma-separated; env {env})")


def bench_option(config, name):
    """The option's value, else its environment variable, else the device's default; a list of strings."""
    value = config.getoption("bench_" + name) or os.environ.get("SSM_BENCH_" + name.upper())
    if value is None and name not in ("backends", "modes", "multipliers", "device"):
        on_gpu = bench_device(config).type == "cuda"
        value = (CUDA_DEFAULTS if on_gpu else CPU_DEFAULTS)[name]
    return None if value is None else value.replace(",", " ").split()


def bench_device(config):
    value = config.getoption("bench_device") or os.environ.get("SSM_BENCH_DEVICE")
    return torch.device(value or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = bench_device(config)
    ours = [b for b in bench_option(config, "backends") or bench_backends(device) if b != "mamba_ssm"]
    if "layout" in metafunc.fixturenames:  # packing: our backends (mamba_ssm has no cu_seqlens) x layouts
        metafunc.parametrize("backend,layout", [(b, lay) for b in ours for lay in ("packed", "padded")],
                             ids=[f"{lay}-{b}" for b in ours for lay in ("packed", "padded")])
        return
    if "decode_width" in metafunc.fixturenames:
        widths = list(map(int, bench_option(config, "widths")))
        metafunc.parametrize("backend,decode_width", [(b, w) for b in ours for w in widths],
                             ids=[f"decode-{b}-d{w}" for b in ours for w in widths])
        return
    if "mode" not in metafunc.fixturenames:
        return
    backends = bench_option(config, "backends") or bench_backends(device)
    modes = bench_option(config, "modes") or list(MODES)
    multipliers = bench_option(config, "multipliers") or list(MULTIPLIER_MODES)
    cases, ids = [], []
    for backend in backends:
        for multiplier_mode in multipliers:
            if backend == "mamba_ssm" and multiplier_mode == "fused":
                continue  # mamba_ssm's kernel has no multipliers to fuse
            for mode in modes:
                for width in map(int, bench_option(config, "widths")):
                    cases.append((backend, multiplier_mode, mode, width))
                    ids.append(f"{mode}-{backend}-{multiplier_mode}-d{width}")
    metafunc.parametrize("backend,multipliers,mode,d_inner", cases, ids=ids)


@pytest.fixture(scope="session")
def bench_settings(request):
    """Device, shape and round counts shared by every benchmark of the run."""
    config = request.config
    return dict(device=bench_device(config), widths=list(map(int, bench_option(config, "widths"))),
                batch=int(bench_option(config, "batch")[0]),
                seqlen=int(bench_option(config, "seqlen")[0]), d_state=int(bench_option(config, "d_state")[0]),
                dtype=bench_option(config, "dtype")[0], rounds=int(bench_option(config, "rounds")[0]),
                warmup=int(bench_option(config, "warmup")[0]))
