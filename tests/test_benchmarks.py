"""`pytest benchmarks/` in its quick form, the bytes model, peak memory, and the plot command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssm_kernels.bench import Workload, bytes_moved, peak_bandwidth_gbps, peak_memory_bytes, scan_step
from ssm_kernels.bench import __main__ as bench_cli
from ssm_kernels.bench.plot import load_results

ROOT = Path(__file__).resolve().parents[1]
SPAWNS = pytest.mark.slow  # runs pytest on benchmarks/ in a process (directly or through results_file)
EXTRA_INFO = {"d_inner", "seqlen", "batch", "d_state", "dtype", "backend", "mode", "multipliers", "device", "gbps",
              "peak_mem_bytes"}
TINY = ["--bench-seqlen", "33", "--bench-batch", "2", "--bench-d-state", "4", "--bench-rounds", "2",
        "--bench-warmup", "1"]


def run_benchmarks(*args):
    """pytest on benchmarks/ (or the file given first) with these options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSM_BENCH_")}
    target = [] if args and args[0].startswith("benchmarks/") else ["benchmarks"]
    result = subprocess.run([sys.executable, "-m", "pytest", *target, "-q", "-p", "no:cacheprovider", *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results.json"
    run_benchmarks("benchmarks/test_scan_throughput.py", *TINY, "--bench-widths", "8,16", "--bench-backends", "torch",
                   f"--benchmark-json={path}")
    return path


@SPAWNS
def test_benchmarks_cover_the_grid_with_extra_info(results_file):
    benches = json.loads(results_file.read_text())["benchmarks"]
    seen = {(b["extra_info"]["mode"], b["extra_info"]["multipliers"], b["extra_info"]["d_inner"]) for b in benches}
    assert seen == {(m, k, w) for m in ("fwd", "bwd", "fwdbwd") for k in ("fused", "separate", "none")
                    for w in (8, 16)}
    for b in benches:
        info = b["extra_info"]
        assert EXTRA_INFO <= set(info), EXTRA_INFO - set(info)
        assert (info["seqlen"], info["batch"], info["d_state"], info["dtype"], info["backend"], info["device"]) == \
            (33, 2, 4, "fp32", "torch", "cpu")
        w = Workload(info["batch"], info["d_inner"], info["seqlen"], info["d_state"], info["dtype"], "cpu")
        assert info["gbps"] == pytest.approx(bytes_moved(info["mode"], w) / b["stats"]["median"] / 1e9)
        assert info["peak_mem_bytes"] > 0
        assert b["stats"]["rounds"] == 2


@SPAWNS
def test_benchmarks_run_the_triton_kernels_under_the_interpreter(tmp_path):
    path = tmp_path / "triton.json"
    run_benchmarks("benchmarks/test_scan_throughput.py", "--bench-seqlen", "5", "--bench-d-state", "4", "--bench-widths", "8", "--bench-rounds", "1",
                   "--bench-warmup", "0", "--bench-backends", "triton", "--bench-modes", "fwdbwd",
                   "--bench-multipliers", "fused", f"--benchmark-json={path}")
    [bench] = json.loads(path.read_text())["benchmarks"]
    assert bench["extra_info"]["backend"] == "triton" and bench["extra_info"]["gbps"] > 0


@SPAWNS
def test_benchmarks_run_with_benchmark_disable():
    result = run_benchmarks(*TINY, "--bench-widths", "8", "--benchmark-disable", "--bench-modes", "bwd",
                            "--bench-backends", "torch")
    # 3 scan multiplier modes, packed and padded, one decode width, transformers unpatched and patched
    assert "8 passed" in result.stdout


def test_bytes_moved_counts_every_tensor_the_op_reads_and_writes_once():
    w = Workload(batch=3, d_inner=10, seqlen=7, d_state=5, dtype="bf16", device="cpu")
    x = w.inputs()
    big = [x["u"], x["delta"], x["z"], x["B"], x["C"]]  # the (d_inner, N) and (d_inner,) parameters are left out
    reads = sum(t.numel() * t.element_size() for t in big)
    out = x["u"].numel() * x["u"].element_size()  # out, and dout in the backward
    grads = reads                                  # du, ddelta, dz, dB, dC
    assert bytes_moved("fwd", w) == reads + out
    assert bytes_moved("bwd", w) == out + reads + grads
    assert bytes_moved("fwdbwd", w) == bytes_moved("fwd", w) + bytes_moved("bwd", w)
    with pytest.raises(ValueError, match="mode"):
        bytes_moved("forward", w)


def test_peak_memory_on_the_cpu_sees_the_largest_live_set():
    mib = 2**20

    def two_in_turn():
        a = torch.empty(mib, dtype=torch.uint8)
        del a
        b = torch.empty(3 * mib, dtype=torch.uint8)
        del b

    def two_at_once():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(3 * mib, dtype=torch.uint8)
        return a, b
    assert 3 * mib <= peak_memory_bytes(two_in_turn, "cpu") < 3 * mib + 4096
    assert 4 * mib <= peak_memory_bytes(two_at_once, "cpu") < 4 * mib + 4096


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwdbwd"])
def test_fused_and_separate_steps_compute_the_same_gradients(mode):
    w = Workload(batch=2, d_inner=6, seqlen=9, d_state=3, dtype="fp32", device="cpu")
    fused, separate = scan_step(w, "torch", "fused", mode)(), scan_step(w, "torch", "separate", mode)()
    none = scan_step(w, "torch", "none", mode)()
    fused, separate, none = (r if isinstance(r, tuple) else (r,) for r in (fused, separate, none))
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    assert not all(torch.allclose(a, c) for a, c in zip(fused, none))  # the multipliers change something


def test_roofline_table():
    assert peak_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert peak_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert peak_bandwidth_gbps("cpu") is None


@SPAWNS
def test_plot_writes_a_png(results_file, tmp_path, capsys):
    png = tmp_path / "plot.png"
    assert bench_cli.main(["plot", str(results_file), "-o", str(png), "--table"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    assert len([line for line in table if line.split()[:1] in (["fwd"], ["bwd"], ["fwdbwd"])]) == 18


@SPAWNS
def test_plot_draws_the_roofline_of_a_known_device(results_file, tmp_path, monkeypatch):
    data = json.loads(results_file.read_text())
    for b in data["benchmarks"]:
        b["extra_info"].update(device="NVIDIA H100 80GB HBM3", peak_bandwidth_gbps=3350.0)
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(data))
    import matplotlib.axes
    drawn = []
    real = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y=0, *a, **k: drawn.append(y) or
                        real(self, y, *a, **k))
    assert bench_cli.main(["plot", str(path), "-o", str(tmp_path / "h100.png")]) == 0
    assert drawn == [3350.0] * 3  # one roofline per mode panel


def test_plot_refuses_a_file_without_timings(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": [{"extra_info": {"d_inner": 8, "mode": "fwd", "gbps": None},
                                                "stats": None}]}))
    with pytest.raises(ValueError, match="no timed"):
        load_results(path)
    assert bench_cli.main(["plot", str(path), "-o", str(tmp_path / "x.png")]) == 2
    assert "no timed" in capsys.readouterr().err


@SPAWNS
def test_packing_and_decode_benchmarks(tmp_path):
    path = tmp_path / "packing.json"
    run_benchmarks("benchmarks/test_packing_and_decode.py", *TINY, "--bench-widths", "8", "--bench-backends",
                   "torch", f"--benchmark-json={path}")
    benches = {b["name"]: b["extra_info"] for b in json.loads(path.read_text())["benchmarks"]}
    packed, padded = benches["test_packing[packed-torch]"], benches["test_packing[padded-torch]"]
    assert packed["tokens_real"] == padded["tokens_real"] == sum(packed["lengths"])
    assert padded["tokens_computed"] == 8 * max(packed["lengths"]) >= packed["tokens_computed"]
    assert benches["test_decode[decode-torch-d8]"]["tokens_per_s"] > 0
