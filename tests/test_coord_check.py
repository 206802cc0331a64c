"""The coordinate check: mup_ssm's acceptance at the CLI's default settings (widths 8x apart, three
seeds), a baseline that it tells apart, and the command line on tiny sizes."""

import json

import pytest

from ssm_kernels import __main__ as cli
from ssm_kernels.mup import coord_check as cc

TINY = ["--widths", "16", "32", "--fixed", "4", "--steps", "1", "--seeds", "0"]


@pytest.fixture(scope="module")
def mup_ssm_results():
    return {(o, s): cc.coord_check("mup_ssm", o, s) for o in ("adam", "sgd") for s in ("d_inner", "d_state")}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("sweep", ["d_inner", "d_state"])
def test_mup_ssm_is_flat(mup_ssm_results, optimizer, sweep):
    result = mup_ssm_results[optimizer, sweep]
    assert result["widths"][-1] / result["widths"][0] >= 8 and len(result["seeds"]) >= 3
    assert len(result["slopes"]["x"]) == 3  # every SSM layer of the 3-layer model
    failed = {q: result["slopes"][q] for q, ok in cc.acceptance(result).items() if not ok}
    assert not failed, failed
    assert result["mean_slopes"]["x"] == pytest.approx(sum(result["slopes"]["x"].values()) / 3)


def test_sp_with_adam_is_told_apart(mup_ssm_results):
    """SP's updates grow with N_u where mup_ssm's are flat."""
    sp = cc.coord_check("sp", "adam", "d_inner")
    mup_ssm = mup_ssm_results["adam", "d_inner"]
    for q in ("dx", "dy"):
        assert abs(mup_ssm["mean_slopes"][q]) <= cc.FLAT
        assert sp["mean_slopes"][q] > 0.3


def test_fit_slope():
    assert cc.fit_slope([1, 2, 4, 8], [3, 3 * 2 ** 0.5, 6, 6 * 2 ** 0.5]) == pytest.approx(0.5)
    assert cc.fit_slope([16, 32], [1.0, 1.0]) == pytest.approx(0.0)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    path, png = tmp_path / "cc.json", tmp_path / "cc.png"
    assert cli.main(["coord-check", "--param", "mup", "--optimizer", "sgd", "--sweep", "d_state", *TINY,
                     "--json", str(path), "--plot", str(png)]) == 0
    result = json.loads(path.read_text())
    assert (result["parameterization"], result["optimizer"], result["sweep"], result["widths"]) == \
        ("mup", "sgd", "d_state", [16, 32])
    assert set(result["rms"]) == {"x", "y", "dx", "dy"}
    layers = result["rms"]["x"]
    assert sorted(layers) == [f"backbone.layers.{i}.mixer" for i in range(3)]
    assert all(len(v) == 2 and all(x > 0 for x in v) for q in result["rms"].values() for v in q.values())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "slopes" in capsys.readouterr().out


def test_cli_table_covers_every_preset_optimizer_and_sweep(tmp_path, capsys):
    md = tmp_path / "table.md"
    assert cli.main(["coord-check", "--table", *TINY, "--table-out", str(md)]) == 0
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ") and "preset" not in line]
    assert len(rows) == 20
    assert {tuple(c.strip() for c in row.split("|")[1:4]) for row in rows} == \
        {(p, o, s) for p in ("sp", "mup", "spectral", "mup_ssm", "mup_ssm_asymptotic") for o in ("adam", "sgd")
         for s in ("d_inner", "d_state")}
    assert "Settings:" in md.read_text() and "| mup_ssm |" in capsys.readouterr().out


def test_cli_refuses_bad_settings():
    with pytest.raises(ValueError, match="widths"):
        cc.coord_check("sp", "adam", "d_inner", widths=[15, 32], fixed=4, steps=1, seeds=[0])
    with pytest.raises(SystemExit):
        cli.main(["coord-check", "--param", "ntk"])
