"""Every user mistake on the command lines ends before any work with argparse's usage, a message
naming the flag and exit status 2, never a traceback; the modules and multipliers name the
argument they refuse."""

import json

import numpy as np
import pytest
import torch

from scan_cases import CPP_REASON
from ssm_kernels import __main__ as cli
from ssm_kernels import selective_scan_fn
from ssm_kernels.bench import __main__ as bench_cli
from ssm_kernels.modules import Mamba, MambaLM
from ssm_kernels.mup import Parameterization

BAD = [  # (argv, the flag the message must name)
    (["check", "--repeats", "0"], "--repeats"),
    (["check", "--batch", "-1"], "--batch"),
    (["check", "--seqlen", "0"], "--seqlen"),
    (["check", "--widths", "0"], "--widths"),
    (["check", "--widths", "64", "x"], "--widths"),
    (["check", "--d-state", "0"], "--d-state"),
    (["check", "--device", "bogus"], "--device"),
    (["check", "--device", "cuda:99"], "--device"),
    (["check", "--backends", "triton"], "--backends"),
    (["profile", "--d-inner", "0"], "--d-inner"),
    (["profile", "--seqlen", "-3"], "--seqlen"),
    (["profile", "--steps", "0"], "--steps"),
    (["profile", "--warmup", "-1"], "--warmup"),
    (["profile", "--trace", "/no/such/folder/trace.json"], "--trace"),
    (["profile", "--backend", "mamba_ssm", "--device", "cpu"], "--backend"),
    (["profile", "--device", "tpu"], "--device"),
    (["coord-check", "--widths", "16"], "--widths"),
    (["coord-check", "--widths", "16", "16"], "--widths"),
    (["coord-check", "--widths", "15", "33"], "--widths"),
    (["coord-check", "--widths", "0", "16"], "--widths"),
    (["coord-check", "--sweep", "d_state", "--fixed", "7"], "--fixed"),
    (["coord-check", "--fixed", "0"], "--fixed"),
    (["coord-check", "--dt-min", "0"], "--dt-min"),
    (["coord-check", "--dt-min", "1", "--dt-max", "0.1"], "--dt-min"),
    (["coord-check", "--lr", "nan"], "--lr"),
    (["coord-check", "--lr", "-1"], "--lr"),
    (["coord-check", "--steps", "0"], "--steps"),
    (["coord-check", "--seeds", "-1"], "--seeds"),
    (["coord-check", "--json", "/no/such/folder/cc.json"], "--json"),
    (["coord-check", "--plot", "/no/such/folder/cc.png"], "--plot"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--weight-decay", "nan"], "--weight-decay"),
    (["train", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "--seqlen", "10000000"], "--seqlen"),
    (["train", "--backend", "triton"], "--backend"),
    (["lr-sweep", "--seqlen", "600000"], "--seqlen"),
    (["lr-sweep", "--json", "/proc/x.json"], "--json"),
    (["lr-sweep", "--plot", "/proc/x.png"], "--plot"),
    (["lr-sweep", "--plot", "sweep.xyz"], "--plot"),
    (["coord-check", "--plot", "cc.xyz"], "--plot"),
]
if CPP_REASON is not None:
    BAD.append((["check", "--backends", "cpp"], "--backends"))
    BAD.append((["train", "--backend", "cpp"], "--backend"))


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_cli_refuses_bad_arguments_with_status_2(argv, flag, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a user's CPU machine: triton there is refused
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert flag in err and "Traceback" not in err, err


BAD_RESULTS = {
    "a list": [],
    "not json": "{",
    "no backend": {"benchmarks": [{"name": "b", "extra_info": {"d_inner": 8, "mode": "fwd", "gbps": 1.0,
                                                               "multipliers": "fused"}}]},
    "zero median": {"benchmarks": [{"name": "b", "stats": {"median": 0.0},
                                    "extra_info": {"d_inner": 8, "mode": "fwd", "bytes": 10, "backend": "torch",
                                                   "multipliers": "fused"}}]},
    "unknown mode": {"benchmarks": [{"name": "b", "extra_info": {"d_inner": 8, "mode": "sideways", "gbps": 1.0,
                                                                 "backend": "torch", "multipliers": "fused"}}]},
}


@pytest.mark.parametrize("kind", list(BAD_RESULTS))
def test_bench_plot_refuses_a_file_that_is_not_a_results_file(kind, tmp_path, capsys):
    path = tmp_path / "results.json"
    content = BAD_RESULTS[kind]
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert bench_cli.main(["plot", str(path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_bench_plot_refuses_a_missing_output_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["plot", str(tmp_path / "r.json"), "-o", "/no/such/folder/x.png"])
    assert exit_info.value.code == 2 and "--output" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    (dict(dt_rank=0), "dt_rank"), (dict(expand=0.01), "expand"), (dict(d_state=0), "d_state"),
    (dict(d_conv=0), "d_conv"), (dict(dt_min=0.1, dt_max=0.01), "dt_min")])
def test_mamba_refuses_impossible_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba(16, **kwargs)


def test_mamba_lm_refuses_impossible_sizes_and_a_one_token_loss():
    with pytest.raises(ValueError, match="n_layer"):
        MambaLM(16, 0, 32)
    with pytest.raises(ValueError, match="L >= 2"):
        MambaLM(16, 1, 32, d_state=4).loss(torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("base", [None, 0, 2.5, True])
def test_parameterization_refuses_a_bad_base_shape(base):
    with pytest.raises(ValueError, match="base_d_inner"):
        Parameterization("mup_ssm", "adam", base_d_inner=base, base_d_state=16)


def test_multipliers_take_numpy_numbers_and_refuse_overflow():
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 2, 5, generator=g), torch.randn(1, 2, 5, generator=g)
    A, B, C = -torch.rand(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    expected = selective_scan_fn(u, delta, A, B, C, backend="torch", b_scale=2.0, dt_scale=3.0)
    for b_scale, dt_scale in ((np.float32(2.0), np.int64(3)), (np.float64(2.0), 3)):
        got = selective_scan_fn(u, delta, A, B, C, backend="torch", b_scale=b_scale, dt_scale=dt_scale)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="b_scale: must be finite"):
        selective_scan_fn(u, delta, A, B, C, backend="torch", b_scale=10 ** 400)
    with pytest.raises(TypeError, match="c_scale"):
        selective_scan_fn(u, delta, A, B, C, backend="torch", c_scale=np.bool_(True))


def test_lr_sweep_seqlen_longer_than_the_held_out_text_is_refused(capsys):
    from ssm_kernels.cli.lr_sweep import _texts
    held_out = len(_texts()[1])
    for batch in ("1", "2"):  # batch 1 used to evaluate silently on a shorter text, batch 2 to fail after training
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["lr-sweep", "--seqlen", str(held_out), "--batch", batch, "--widths", "8", "--steps", "1"])
        assert exit_info.value.code == 2 and "--seqlen" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["[]", "null", '{"optimizer": "adam"}', "{", "RUNS WITHOUT EVAL_LOSS"])
def test_lr_sweep_refuses_a_json_it_cannot_resume_from_before_any_run(content, tmp_path, capsys, monkeypatch):
    from ssm_kernels.cli import lr_sweep
    argv = ["lr-sweep", "--widths", "8", "--lrs", "0.01", "0.02", "--seeds", "0", "--steps", "1", "--batch", "1",
            "--seqlen", "8", "--n-layer", "1", "--d-state", "2", "--eval-batches", "1", "--presets", "sp"]
    path = tmp_path / "sweep.json"
    if content == "RUNS WITHOUT EVAL_LOSS":
        settings = dict(steps=1, batch=1, seqlen=8, n_layer=1, d_state=2, base_d_model=8, eval_batches=1)
        content = json.dumps(dict(optimizer="adam", settings=settings,
                                  runs=[dict(preset="sp", d_model=8, lr=0.01, seed=0)]))
    path.write_text(content)
    monkeypatch.setattr(lr_sweep, "train_one", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--json", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--json" in err and "Traceback" not in err, err


def test_plot_flags_without_matplotlib_are_refused_before_any_work(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    for argv in (["lr-sweep", "--plot", "x.png"], ["coord-check", "--plot", "x.png"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "matplotlib" in err, err


def test_train_refuses_the_cpp_backend_where_it_is_not_built(monkeypatch, capsys):
    """The check runs before the model is built (it used to fail after), also where the extension
    is built: here its absence is simulated."""
    from ssm_kernels.ops.selective_scan import compiled
    monkeypatch.setattr(compiled, "extension_unavailable_reason", lambda: "the extension is not built (simulated)")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--backend", "cpp"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--backend cpp" in err and "simulated" in err, err
