"""`python -m ssm_kernels lr-sweep` on tiny sizes: the report, resuming from the JSON, the plot."""

import json

import pytest

from ssm_kernels import __main__ as cli
from ssm_kernels.cli import lr_sweep

TINY = ["--widths", "16", "32", "--lrs", "0.001", "0.004", "--seeds", "0", "1", "--steps", "2", "--batch", "2",
        "--seqlen", "16", "--eval-batches", "1", "--workers", "1"]


def test_sweep_reports_resumes_and_plots(tmp_path, monkeypatch, capsys):
    path, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert cli.main(["lr-sweep", *TINY, "--json", str(path), "--plot", str(png)]) == 0
    result = json.loads(path.read_text())
    assert len(result["runs"]) == 2 * 2 * 2 * 2  # presets x widths x lrs x seeds
    assert all(r["eval_loss"] > 0 for r in result["runs"])
    for preset in ("sp", "mup_ssm"):
        rep = result["report"][preset]
        assert set(rep["widths"]) == {"16", "32"} and rep["drift_steps"] in (0, 1)
        for row in rep["widths"].values():
            assert row["best_loss"] == min(row["loss_by_lr"].values())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "best lr drifts" in capsys.readouterr().out
    # Resuming: nothing left to run, the same report.
    monkeypatch.setattr(lr_sweep, "train_one", lambda *a, **k: pytest.fail("a finished run was run again"))
    assert cli.main(["lr-sweep", *TINY, "--json", str(path)]) == 0
    assert json.loads(path.read_text())["report"] == result["report"]
    # --report-only on a sweep asked with one more seed: runs nothing, reports the complete seeds,
    # leaves the JSON as it was, writes the tables
    before, md = path.read_text(), tmp_path / "tables.md"
    argv = ["lr-sweep", *TINY, "--seeds", "0", "1", "2", "--json", str(path), "--report-only",
            "--markdown", str(md)]
    assert cli.main(argv) == 0
    assert path.read_text() == before
    assert "| 32 | 2 |" in md.read_text() and "### mup_ssm" in md.read_text()
    with pytest.raises(SystemExit):
        cli.main(["lr-sweep", *TINY, "--report-only"])


def test_report_best_lr_drift_and_seed_agreement():
    runs = [dict(preset="sp", d_model=w, lr=lr, seed=s, eval_loss=loss)
            for w, best in ((16, 0.01), (64, 0.04)) for lr in (0.01, 0.02, 0.04) for s in (0, 1)
            for loss in [1.0 + abs(lr - best) + (0.001 if s else 0.0)]]
    rep = lr_sweep.report(runs, ["sp"], [16, 64], [0.01, 0.02, 0.04], [0, 1])["sp"]
    assert rep["widths"][16]["best_lr"] == 0.01 and rep["widths"][64]["best_lr"] == 0.04
    assert rep["drift_steps"] == pytest.approx(2.0)  # a factor 4 on a grid of factor 2
    assert all(row["seeds_agree"] for row in rep["widths"].values())


@pytest.mark.parametrize("argv,flag", [
    (["--lrs", "0.01"], "--lrs"), (["--lrs", "0.01", "0.01"], "--lrs"), (["--widths", "0"], "--widths"),
    (["--steps", "0"], "--steps"), (["--seqlen", "1"], "--seqlen"), (["--lrs", "nan", "1"], "--lrs"),
    (["--json", "/no/such/folder/s.json"], "--json")])
def test_bad_sweep_arguments_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lr-sweep", *argv])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_resuming_with_other_settings_is_refused(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(dict(optimizer="adam", settings=dict(steps=999), runs=[])))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lr-sweep", *TINY, "--json", str(path)])
    assert exit_info.value.code == 2 and "other settings" in capsys.readouterr().err


def test_drift_counts_steps_of_the_grid_given_even_when_uneven():
    """--lrs 0.001 0.002 0.1: a best lr moving 0.002 -> 0.1 is one step of that grid (it used to be
    read as 5.64 steps of the first two values' ratio)."""
    lrs = [0.001, 0.002, 0.1]
    runs = [dict(preset="sp", d_model=w, lr=lr, seed=0, eval_loss=1.0 + (lr != best))
            for w, best in ((16, 0.002), (64, 0.1)) for lr in lrs]
    assert lr_sweep.report(runs, ["sp"], [16, 64], lrs, [0])["sp"]["drift_steps"] == 1


@pytest.mark.slow  # worker processes
def test_workers_give_the_runs_one_process_gives(tmp_path):
    """Two spawned workers of one thread each: the same held-out losses, bitwise, as the runs in
    this process (on one thread), and a JSON that holds every run once."""
    args = ["--presets", "sp", "--widths", "16", "--lrs", "0.001", "0.004", "--seeds", "0", "1", "--steps", "2",
            "--batch", "2", "--seqlen", "16", "--eval-batches", "1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert cli.main(["lr-sweep", *args, "--workers", "1", "--json", str(one)]) == 0
    assert cli.main(["lr-sweep", *args, "--workers", "2", "--json", str(two)]) == 0
    losses = [{lr_sweep._key(r): r["eval_loss"] for r in json.loads(p.read_text())["runs"]} for p in (one, two)]
    assert len(losses[1]) == len(json.loads(two.read_text())["runs"]) == 4 and losses[0] == losses[1]


def test_report_transfer_regret_stability_and_partial_seeds(tmp_path):
    """Loss at the lr best at the smallest width, its regret, the largest stable lr (every seed
    below the byte-frequency loss), the seeds' spread; a width with an incomplete seed uses
    the complete ones; the markdown names each figure."""
    lrs = [0.01, 0.02, 0.04, 0.08]
    losses = {16: {0.01: 2.0, 0.02: 1.5, 0.04: 1.8, 0.08: 9.0},  # best 0.02; 0.08 diverges
              64: {0.01: 1.9, 0.02: 1.3, 0.04: 1.2, 0.08: 1.6}}  # best 0.04, all stable
    runs = [dict(preset="sp", d_model=w, lr=lr, seed=s, eval_loss=losses[w][lr] + 0.01 * s)
            for w in losses for lr in lrs for s in (0, 1)]
    runs.append(dict(preset="sp", d_model=64, lr=0.01, seed=2, eval_loss=1.0))  # seed 2 incomplete: ignored
    rep = lr_sweep.report(runs, ["sp"], [16, 64], lrs, [0, 1, 2])["sp"]
    small, wide = rep["widths"][16], rep["widths"][64]
    assert small["seeds"] == wide["seeds"] == [0, 1]
    assert small["largest_stable_lr"] == 0.04 and wide["largest_stable_lr"] == 0.08
    assert wide["transferred_lr"] == 0.02 and wide["transferred_loss"] == pytest.approx(1.305)
    assert wide["transfer_regret"] == pytest.approx(1.305 / 1.205 - 1) and small["transfer_regret"] == 0.0
    assert wide["best_loss_spread"] == pytest.approx([1.2, 1.21]) and rep["drift_steps"] == 1
    text = lr_sweep.markdown([dict(optimizer="adam", runs=runs, report={"sp": rep},
                                   settings=dict(n_layer=2, d_state=16, base_d_model=16, steps=300, batch=16,
                                                 seqlen=128, eval_batches=8))])
    assert "| 64 | 2 | 0.04 | 1.2050 (1.2000 - 1.2100) | yes | 1.3050 (lr 0.02) | 8.3 % | ≥ 0.08 |" in text
    assert 2.5 < lr_sweep.unigram_loss() < 4.0
