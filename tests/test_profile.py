"""`python -m ssm_kernels profile` on tiny sizes."""

import json
import warnings

import pytest
import torch

from scan_cases import CPP
from ssm_kernels import __main__ as cli
from ssm_kernels.cli import profile as profile_module
from ssm_kernels.ops.selective_scan.backends import default_backend

TINY = ["--d-inner", "8", "--seqlen", "21", "--batch", "2", "--d-state", "4", "--warmup", "1", "--steps", "2"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow), CPP])
def test_profile_reports_kernels_bandwidth_memory_and_writes_a_trace(backend, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert cli.main(["profile", *TINY, "--backward", "--backend", backend, "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "fwdbwd of the selective scan" in out and f"backend {backend}" in out
    assert "ssm_kernels::selective_scan_bwd" in out  # the op shows in the table of top ops
    assert "achieved bandwidth" in out and "peak memory" in out
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "ssm_kernels::selective_scan_fwd" for e in events)


def test_profile_returns_its_numbers():
    result = profile_module.profile(8, 21, 2, "fp32", d_state=4, warmup=0, steps=1, print_fn=lambda *a: None)
    assert result["mode"] == "fwd" and result["backend"] == default_backend(torch.device("cpu"))
    assert result["gbps"] > 0 and result["peak_mem_bytes"] > 0 and result["median_ms"] > 0


def test_profile_warns_about_large_sizes_on_the_cpu(monkeypatch):
    monkeypatch.setattr(profile_module, "CPU_LARGE", 100)
    with pytest.warns(UserWarning, match="large for the CPU"):
        profile_module.profile(8, 21, 2, "fp32", d_state=4, warmup=0, steps=1, print_fn=lambda *a: None)
    monkeypatch.setattr(profile_module, "CPU_LARGE", 10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profile_module.profile(8, 21, 2, "fp32", d_state=4, warmup=0, steps=1, print_fn=lambda *a: None)


def test_profile_refuses_bad_step_counts():
    with pytest.raises(SystemExit):
        cli.main(["profile", *TINY, "--steps", "0"])
