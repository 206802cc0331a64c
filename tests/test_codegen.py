"""The Triton kernels compile for Hopper (sm_90) in every shipped configuration, without a GPU,
exactly as the JIT would compile them, and ptxas spills no register; so do the CUDA kernels of
csrc/cuda/ with nvcc, where it is installed."""

import json
import os
import re
import subprocess
import sys

import shutil

import pytest

HERE = os.path.dirname(__file__)


def _nvidia_backend_available():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton build has no NVIDIA backend")
@pytest.mark.slow  # a process compiling every kernel
def test_every_shipped_configuration_compiles_for_sm90_without_spills(tmp_path):
    tool = os.path.join(HERE, "..", "benchmarks", "tools", "compile_for_gpu.py")
    result = subprocess.run([sys.executable, tool, "--shipped", "--arch", "90",
                             "--out", str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.load(open(os.path.join(root, f))) for root, _, files in os.walk(tmp_path)
               for f in files if f.endswith(".json")]
    kinds = {(r["kernel"], r["dtype"], r["fixed_bc"], r["d_state"], r["seqlen"]) for r in records}
    assert len(kinds) >= 12, sorted(kinds)  # forward and backward of every configuration
    for r in records:
        # spilled registers live in the stack frame (ptxas' LOCAL counts only local arrays)
        local, stack = (int(re.search(rf"{key}:(\d+)", r["res_usage"]).group(1)) for key in ("LOCAL", "STACK"))
        assert local == 0 and stack == 0, f"{r['kernel']} spills ({r['res_usage']}) at {r}"
        assert r["ctas"] > 0 and r["es_total"] > 0 and r["hbm_bytes"] > 0


def _nvcc():
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
@pytest.mark.slow  # a process running nvcc
def test_cuda_kernels_compile_for_sm90_without_spills(tmp_path):
    tool = os.path.join(HERE, "..", "benchmarks", "tools", "compile_for_gpu.py")
    result = subprocess.run([sys.executable, tool, "--cuda", "--nvcc", _nvcc(), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.load(open(tmp_path / f)) for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert {r["kernel"] for r in records} == {"cuda_scan_fwd", "cuda_scan_bwd", "cuda_scan_fwd_segmented",
                                            "cuda_scan_bwd_segmented"}
    for r in records:
        local, stack = (int(re.search(rf"{key}:(\d+)", r["res_usage"]).group(1)) for key in ("LOCAL", "STACK"))
        assert local == 0 and stack == 0, f"{r['kernel']} spills ({r['res_usage']})"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
@pytest.mark.slow  # a process running nvcc
def test_the_cuda_binding_compiles_against_this_torch(tmp_path):
    """csrc/cuda/scan_cuda.cu (the binding and every kernel instantiation it launches) compiles with
    nvcc against the installed torch's headers, a CPU build's included (compile only: linking needs a
    CUDA build of torch). PTX without optimization: this checks the code, not its speed."""
    import torch
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    source = os.path.join(HERE, "..", "csrc", "cuda", "scan_cuda.cu")
    result = subprocess.run([_nvcc(), "-std=c++20", "-c", "-O0", "-Xcicc", "-O0", "--expt-relaxed-constexpr",
                             "-gencode=arch=compute_90,code=compute_90", "-I", include, "-I",
                             os.path.dirname(source), source, "-o", str(tmp_path / "scan_cuda.o")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "scan_cuda.o").stat().st_size > 0
