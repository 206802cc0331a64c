"""`python -m ssm_kernels train`: one process, torchrun with DDP + context parallelism, bad input."""

import os
import shutil
import subprocess
import sys

import pytest

from ssm_kernels.__main__ import main

TINY = ["--steps", "2", "--seqlen", "24", "--batch", "2", "--d-model", "16", "--d-state", "4"]


def test_one_process_trains(capsys):
    assert main(["train", *TINY]) == 0
    assert "loss" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
@pytest.mark.slow  # torchrun: processes
def test_torchrun_ddp_with_context_parallel():
    """2 processes: DDP over both and a 2-way context-parallel group of its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "ssm_kernels", "train", "--cp", "2", *TINY], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 data-parallel replica(s) x 2-way context parallel" in run.stdout
    assert "loss" in run.stdout


@pytest.mark.parametrize("args, message", [
    (["--cp", "2"], "does not divide the world size 1"),
    (["--seqlen", "1"], "--seqlen: must be at least 2"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--lr", "nan"], "--lr: must be a positive number"),
])
def test_bad_input_exits_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
