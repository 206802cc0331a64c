"""benchmarks/gpu_session.py: its --dry-run runs every step on the CPU (so the script a GPU
session depends on cannot rot), and its report puts the right model figure beside each time."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_session  # noqa: E402


@pytest.mark.slow  # processes
def test_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_session.py"), "--dry-run",
                             "--out", str(tmp_path), "--revision", "test"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "gpu_session.json") as f:
        session = json.load(f)
    assert list(session["steps"]) == list(gpu_session.STEPS)
    assert all(step["status"] == "ok" for step in session["steps"].values()), session["steps"]
    assert session["steps"]["environment"]["revision"] == "test"
    assert session["steps"]["floors"]["copy"]["gbps"] > 0 and session["steps"]["floors"]["exp2"]["exp2_per_s"] > 0
    backends = {(r["backend"], r["mode"]) for r in session["rows"]}
    assert {("triton", m) for m in ("fwd", "bwd", "fwdbwd")} <= backends
    assert all(r["measured_ms"] > 0 for r in session["rows"])
    assert (tmp_path / "gpu_session.png").stat().st_size > 0
    report = (tmp_path / "gpu_session.md").read_text()
    assert "| triton | fused | fwd |" in report
    assert "test_packing[packed-triton]" in report and "test_decode[decode-triton-d4]" in report


def _bench_row(backend, mode, d_inner, median_ms=1.0):
    return dict(extra_info=dict(backend=backend, multipliers="fused", mode=mode, d_inner=d_inner, seqlen=2048,
                                batch=4, d_state=16, dtype="bf16", device="H100", median_ms=median_ms, gbps=1.0))


def test_report_puts_the_static_model_beside_each_time():
    with open(gpu_session.STATIC_MODEL) as f:
        model = json.load(f)
    at_2048 = next(r for r in model if r["cfg"]["dim"] == 2048 and not r["cfg"]["fixed_bc"])
    rows = gpu_session.measured_beside_model(
        [_bench_row("triton", "fwdbwd", 2048, median_ms=2.0), _bench_row("mamba_ssm", "bwd", 2048),
         _bench_row("torch", "fwd", 2048), _bench_row("triton", "fwd", 999)], model)
    ours = at_2048["ours"]
    assert abs(rows[0]["model_lower_bound_ms"] * 1e3 - ours["fwd"]["lower_bound_us"] - ours["bwd"]["lower_bound_us"]) < 1e-6
    assert abs(rows[0]["measured_over_latency_aware"] * rows[0]["model_latency_aware_ms"] - 2.0) < 1e-9
    assert abs(rows[1]["model_latency_aware_ms"] * 1e3 - at_2048["mamba"]["bwd"]["latency_aware_us"]) < 1e-6
    assert rows[2]["model_lower_bound_ms"] is None  # no model of the "torch" backend
    assert rows[3]["model_lower_bound_ms"] is None  # a width the model was not run at


@pytest.mark.slow  # a process
def test_a_step_that_would_not_fit_the_budget_is_skipped_and_the_report_still_written(tmp_path):
    start = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_session.py"), "--dry-run",
                             "--budget", "25", "--steps", "environment", "kernels", "floors", "report",
                             "--out", str(tmp_path), "--revision", "test"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "gpu_session.json") as f:
        steps = json.load(f)["steps"]
    assert steps["environment"]["status"] == "ok" and steps["report"]["status"] == "ok"
    assert steps["kernels"]["status"] == "skipped" and steps["floors"]["status"] == "skipped"
    assert (tmp_path / "gpu_session.md").exists()
    assert time.time() - start < 25 + 30  # the interpreter's start-up aside, it kept to the budget


@pytest.mark.slow  # a process
def test_a_command_past_its_time_is_stopped_and_recorded():
    record = gpu_session.run_command([sys.executable, "-c", "import time; print('begun', flush=True); time.sleep(30)"],
                                     timeout=2)
    assert record["returncode"] == "timeout" and record["seconds"] < 15 and "begun" in record["output_tail"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("dtype", sorted(gpu_session.MAMBA_DTYPES))
def test_mamba_ssm_entries_not_built_compile_and_leave_out_the_built_ones(tmp_path, dtype):
    source = gpu_session.mamba_stub_source(dtype)
    (tmp_path / "stub.cpp").write_text(source)
    subprocess.run(["g++", "-std=c++17", "-c", str(tmp_path / "stub.cpp"), "-o", str(tmp_path / "stub.o")], check=True)
    symbols = subprocess.run(["nm", "-C", str(tmp_path / "stub.o")], capture_output=True, text=True).stdout
    built = gpu_session.MAMBA_DTYPES[dtype][1]
    defined = [line for line in symbols.splitlines() if " T " in line and "selective_scan_" in line]
    assert len(defined) == 9  # 12 entries of the binding, 3 compiled: fwd (both weights) and bwd real
    assert not any(f"fwd_cuda<{built}," in line for line in defined)
    assert not any(f"bwd_cuda<{built}, float>" in line for line in defined)
    assert any(f"bwd_cuda<{built}, c10::complex<float> >" in line for line in defined)
