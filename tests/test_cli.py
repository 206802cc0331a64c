"""The main job, `python -m ssm_kernels`, on tiny sizes."""

import subprocess
import sys

import pytest

from ssm_kernels import __main__ as cli
from ssm_kernels.cli import check as check_module

TINY = ["--widths", "6", "--seqlen", "20", "--d-state", "4", "--repeats", "1"]


@pytest.mark.slow  # the Triton kernels under the interpreter
def test_check_prints_a_row_per_backend_and_width(capsys):
    assert cli.main(TINY + ["--widths", "4", "6"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = [r for r in rows if len(r) > 1 and r[0] in ("torch", "triton") and r[1].isdigit()]
    assert [(r[0], r[1]) for r in table] == [("torch", "4"), ("triton", "4"), ("torch", "6"), ("triton", "6")]
    assert all(r[-1] == "ok" for r in table)


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    real = check_module.selective_scan_fn

    def off_by_a_little(*args, **kwargs):
        out, last = real(*args, **kwargs)
        return out * 1.001, last
    monkeypatch.setattr(check_module, "selective_scan_fn", off_by_a_little)
    assert cli.main(TINY + ["--backends", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow  # a process
def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ssm_kernels", *TINY, "--backends", "torch"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "ok" in result.stdout
