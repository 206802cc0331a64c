"""Coordinate check: how the SSM state x, the SSM output y and their changes during training scale
with N_u (d_inner) or N_x (d_state) under a parameterization.

For each width and seed: a fresh 3-layer MambaLM (untied readout) is parameterized, trained for a
few steps on one fixed batch of tokens, and for every Mamba layer the per-coordinate RMS
sqrt(mean(t^2)) of x (the last state, (batch, d_inner, N)), y, dx = x_T - x_0 and dy = y_T - y_0
(same batch, before and after training) is recorded. y is the state readout
y_t[i] = sum_n C_t[n] x_t[i, n] (batch, d_inner, L): without the skip term D u and the z gate,
which are not part of the recurrence and would hide it (with D = 1, D u dominates y).
The slope of log2 RMS against log2 width, fitted by least squares to the geometric mean over
seeds, says how each quantity scales: 0 is width-independent.
"""

import json
import math
from typing import Dict, List, Optional, Sequence

import torch

from ..modules import MambaLM
from ..modules.mamba import SelectiveScan
from .parameterization import Parameterization
from .presets import OPTIMIZERS, PRESETS

QUANTITIES = ("x", "y", "dx", "dy")
SWEEPS = ("d_inner", "d_state")
# Defaults: widths span 8x; under a minute per sweep on 2 CPU cores.
DEFAULTS = dict(d_inner=dict(widths=(64, 128, 256, 512), fixed=16),
                d_state=dict(widths=(16, 32, 64, 128), fixed=128))
DEFAULT_LR = dict(adam=3e-3, sgd=0.3)
EXPAND = 2  # d_model = d_inner / EXPAND in the measured models


def sweep_settings(sweep: str, widths: Optional[Sequence[int]], fixed: Optional[int]):
    """(widths, fixed) with the defaults filled in; ValueError naming the setting when a sweep cannot
    be built as asked."""
    if sweep not in SWEEPS:
        raise ValueError(f"sweep: expected one of {SWEEPS}, got {sweep!r}")
    widths = list(DEFAULTS[sweep]["widths"] if widths is None else widths)
    fixed = DEFAULTS[sweep]["fixed"] if fixed is None else fixed
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in list(widths) + [fixed]):
        raise ValueError(f"widths, fixed: positive integers, got widths {list(widths)}, fixed {fixed}")
    if len(widths) < 2 or len(set(widths)) != len(widths):
        raise ValueError(f"widths: need at least two distinct widths, got {list(widths)}")
    d_inners = widths if sweep == "d_inner" else [fixed]
    if any(w % EXPAND for w in d_inners):
        what = "widths" if sweep == "d_inner" else "fixed"
        raise ValueError(f"{what}: d_inner must be a multiple of {EXPAND} (d_model = d_inner / {EXPAND}), "
                         f"got {list(d_inners)}")
    return widths, fixed


class Recorder:
    """Forward hooks on every SelectiveScan: (y, last state) of its last call, y recomputed
    without D and z (the same scan and multipliers, measurement only)."""

    def __init__(self, model):
        self.outputs: Dict[str, tuple] = {}
        self.handles = [module.register_forward_hook(self._hook(name.rpartition(".scan")[0] or name))
                        for name, module in model.named_modules() if isinstance(module, SelectiveScan)]

    def _hook(self, name):
        def hook(module, args, output):
            u, delta, A, B, C, D, z, delta_bias, *rest = args  # rest: cu_seqlens, when passed
            with torch.no_grad():
                y, _ = module.forward(u, delta, A, B, C, None, None, delta_bias, *rest)  # not __call__: no hook
            self.outputs[name] = (y.detach().double(), output[1].detach().double().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


def measure(preset: str, optimizer: str, d_inner: int, d_state: int, base_d_inner: int, base_d_state: int,
            seed: int, steps: int = 4, lr: Optional[float] = None, n_layer: int = 3, vocab: int = 1024,
            batch: int = 8, seqlen: int = 64, backend: Optional[str] = None,
            mixer_kwargs: Optional[dict] = None) -> Dict[str, Dict[str, float]]:
    """{quantity: {layer: RMS}} for one model trained `steps` steps. backend: the scan's (None: the
    device's default, the compiled "cpp" on a CPU where it is built: 10x faster than "torch")."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MambaLM(d_inner // EXPAND, n_layer, vocab, d_state=d_state, expand=EXPAND, tie_embeddings=False,
                    backend=backend,
                    **(mixer_kwargs or {}))
    p = Parameterization(preset, optimizer, base_d_inner, base_d_state)
    p.parameterize_(model, generator=gen)
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    groups = p.param_groups(model, lr)
    opt = torch.optim.Adam(groups) if optimizer == "adam" else torch.optim.SGD(groups)
    tokens = torch.randint(0, vocab, (batch, seqlen + 1), generator=torch.Generator().manual_seed(1000 + seed))
    recorder = Recorder(model)
    try:
        with torch.no_grad():
            model(tokens[:, :-1])
        before = dict(recorder.outputs)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model.loss(tokens).backward()
            opt.step()
        with torch.no_grad():
            model(tokens[:, :-1])
        after = dict(recorder.outputs)
    finally:
        recorder.remove()
    out = {q: {} for q in QUANTITIES}
    for layer, (y0, x0) in before.items():
        y1, x1 = after[layer]
        out["x"][layer], out["y"][layer] = rms(x0), rms(y0)
        out["dx"][layer], out["dy"][layer] = rms(x1 - x0), rms(y1 - y0)
    return out


def fit_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log2(values) against log2(widths)."""
    xs = [math.log2(w) for w in widths]
    ys = [math.log2(max(v, 1e-300)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def coord_check(preset: str, optimizer: str, sweep: str, widths: Optional[Sequence[int]] = None,
                fixed: Optional[int] = None, steps: int = 4, seeds: Sequence[int] = (0, 1, 2),
                lr: Optional[float] = None, progress: bool = False, **model_kwargs) -> dict:
    """One sweep. Returns the JSON-ready result: settings, widths, rms[q][layer] (geometric mean over
    seeds, per width) and slopes[q][layer], plus slopes of dx/x ("dx_over_x")."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    widths, fixed = sweep_settings(sweep, widths, fixed)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: must be a finite number > 0, got {lr}")
    shapes = [(w, fixed) if sweep == "d_inner" else (fixed, w) for w in widths]
    base = shapes[0]
    runs = [(shape, seed) for shape in shapes for seed in seeds]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(runs), desc=f"{preset}/{optimizer}/{sweep}", unit="model", leave=False)
    per_width: List[List[dict]] = [[] for _ in shapes]
    for (shape, seed) in runs:
        per_width[shapes.index(shape)].append(
            measure(preset, optimizer, shape[0], shape[1], base[0], base[1], seed, steps, lr, **model_kwargs))
        if bar:
            bar.update()
    if bar:
        bar.close()
    layers = sorted(per_width[0][0]["x"])
    # Geometric mean over seeds: one seed's outlier at a small width moves an arithmetic mean, and
    # so the slope, much more.
    rms_table = {q: {layer: [2 ** (sum(math.log2(max(m[q][layer], 1e-300)) for m in runs_w) / len(runs_w))
                             for runs_w in per_width] for layer in layers} for q in QUANTITIES}
    slopes = {q: {layer: fit_slope(widths, rms_table[q][layer]) for layer in layers} for q in QUANTITIES}
    slopes["dx_over_x"] = {layer: slopes["dx"][layer] - slopes["x"][layer] for layer in layers}
    mean_slopes = {q: sum(v.values()) / len(v) for q, v in slopes.items()}
    return {"parameterization": preset, "optimizer": optimizer, "sweep": sweep, "widths": widths,
            "fixed": {"d_state" if sweep == "d_inner" else "d_inner": fixed}, "steps": steps, "seeds": list(seeds),
            "lr": DEFAULT_LR[optimizer] if lr is None else lr, "base": {"d_inner": base[0], "d_state": base[1]},
            "model": dict(dict(n_layer=3, vocab=1024, batch=8, seqlen=64), **model_kwargs),
            "rms": rms_table, "slopes": slopes, "mean_slopes": mean_slopes}


def plot(result: dict, png: str) -> str:
    """log2 RMS against log2 width, one panel per quantity, a line per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(4.2 * len(QUANTITIES), 3.6))
    widths = result["widths"]
    for ax, q in zip(axes, QUANTITIES):
        ys = []
        for layer, values in result["rms"][q].items():
            ys += [math.log2(v) for v in values]
            ax.plot([math.log2(w) for w in widths], [math.log2(v) for v in values], marker="o",
                    label=f"layer {layer.split('.')[-2] if '.' in layer else layer} "
                          f"(slope {result['slopes'][q][layer]:+.2f})")
        # At least 4 log2 units tall, so that a flat line looks flat and slopes compare across panels.
        mid, half = (max(ys) + min(ys)) / 2, max(2.0, (max(ys) - min(ys)) / 2 + 0.25)
        ax.set_ylim(mid - half, mid + half)
        ax.set_xlabel(f"log2 {result['sweep']}")
        ax.set_ylabel(f"log2 RMS {q}")
        ax.set_title(q)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"coordinate check: {result['parameterization']}, {result['optimizer']}, sweep {result['sweep']}")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def save_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


TABLE_QUANTITIES = ("x", "y", "dx", "dy", "dx_over_x")
FLAT = 0.25  # |slope| at most this counts as width-independent (the acceptance bound)


def acceptance(result: dict) -> Dict[str, bool]:
    """The quantities that must be flat for mup_ssm in this sweep: x, y, dx, dy in the d_inner
    sweep; y, dy and dx/x in the d_state sweep (x itself need not be flat in N_x: high states decay
    fast). Flat: the slope, averaged over the SSM layers, within +-FLAT. (Per-layer slopes of a
    three-seed run move by about +-0.2 between seed sets, see docs/mup_ssm.md; the layer mean
    moves about half as much.)"""
    wanted = ("x", "y", "dx", "dy") if result["sweep"] == "d_inner" else ("y", "dy", "dx_over_x")
    return {q: abs(result["mean_slopes"][q]) <= FLAT for q in wanted}


def _cell(slopes: Dict[str, float]) -> str:
    values = list(slopes.values())
    mean = sum(values) / len(values)
    return f"{mean:+.2f} ({min(values):+.2f} .. {max(values):+.2f})"


def table_markdown(results: List[dict], settings: str) -> str:
    """The regenerated Table 1: fitted log2-log2 slopes per preset, optimizer and sweep."""
    head = ("| preset | optimizer | sweep | x | y | Δx | Δy | Δx/x | mup_ssm acceptance |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        verdict = ""
        if r["parameterization"].startswith("mup_ssm"):
            acc = acceptance(r)
            verdict = "pass" if all(acc.values()) else "FAIL: " + ", ".join(q for q, ok in acc.items() if not ok)
        rows.append(f"| {r['parameterization']} | {r['optimizer']} | {r['sweep']} | "
                    + " | ".join(_cell(r["slopes"][q]) for q in TABLE_QUANTITIES) + f" | {verdict} |")
    return "\n".join([
        "# Coordinate check: slopes of per-coordinate RMS against width (regenerated Table 1)",
        "",
        "Generated by `python -m ssm_kernels coord-check --table`; do not edit by hand.",
        "",
        "Each cell is the least-squares slope of log2 RMS against log2 width (N_u = d_inner in the",
        "d_inner sweep, N_x = d_state in the d_state sweep): the mean over the three Mamba layers, and",
        "in brackets the range over layers. 0 means width-independent; +0.5 means growing like",
        "sqrt(width). x: last SSM state; y: state readout sum_n C[n] x[n]; Δx, Δy: their change",
        "after training; Δx/x: slope of Δx minus slope of x. The acceptance column checks the",
        "quantities mup_ssm must keep flat (layer mean within ±0.25): x, y, Δx, Δy in the d_inner",
        "sweep; y, Δy, Δx/x in the d_state sweep.",
        "",
        settings,
        "",
        head,
        *rows,
        "",
    ])
