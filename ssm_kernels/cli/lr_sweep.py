"""`python -m ssm_kernels lr-sweep`: does the best learning rate transfer across width?

Trains MambaLM at each width x learning rate x preset x seed on the bytes of some Python standard
library sources (real text every machine has), evaluates the mean next-byte loss on other modules'
sources (held out), and reports per preset the best learning rate at each width and its drift
across widths in grid steps (log2 of the lr ratio over the grid's ratio). The JSON file is the
state: a sweep resumes from it, skipping the runs it holds (the settings must match).
"""

import functools
import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..modules import MambaLM
from ..mup import OPTIMIZERS, PRESETS, Parameterization
from .args import check_output_path, check_plot_path, positive_float, positive_int
from .training import CORPUS_MODULES, corpus, optimizer_for, random_windows, train_steps

HELP = "best learning rate against width, per preset (muP transfer)"

HELD_OUT_MODULES = ("shutil", "textwrap", "tokenize")  # not in CORPUS_MODULES


@functools.lru_cache(maxsize=None)
def _texts():
    """(training text, held-out text): read once per process, not once per run."""
    return corpus(CORPUS_MODULES), corpus(HELD_OUT_MODULES)


def train_one(preset: str, optimizer: str, d_model: int, lr: float, seed: int, settings: dict) -> dict:
    """One training run; returns {"train_loss", "eval_loss"} (inf when the run diverged)."""
    s = settings
    torch.manual_seed(seed)
    model = MambaLM(d_model, s["n_layer"], vocab_size=256, d_state=s["d_state"], tie_embeddings=False)
    p = Parameterization(preset, optimizer, base_d_inner=2 * s["base_d_model"], base_d_state=s["d_state"])
    p.parameterize_(model, torch.Generator().manual_seed(seed))
    opt = optimizer_for(p, model, lr)
    text, held_out = _texts()
    g = torch.Generator().manual_seed(seed)  # the data order: the same for every width, lr and preset
    losses = train_steps(opt, s["steps"], lambda step: model.loss(random_windows(text, s["batch"], s["seqlen"], g)),
                         stop_when_not_finite=True)
    if losses is None:
        return dict(train_loss=math.inf, eval_loss=math.inf)
    train_loss = losses[-1] if losses else math.inf
    with torch.no_grad():
        n = s["eval_batches"] * s["batch"]
        starts = torch.linspace(0, len(held_out) - s["seqlen"] - 1, n).long().tolist()  # fixed, spread over the text
        batch = torch.stack([held_out[o:o + s["seqlen"]] for o in starts])
        logits = torch.cat([model(chunk[:, :-1]) for chunk in batch.split(s["batch"])])
        eval_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)).item()
    return dict(train_loss=train_loss, eval_loss=eval_loss if math.isfinite(eval_loss) else math.inf)


def _key(r: dict):
    return (r["preset"], r["d_model"], r["lr"], r["seed"])


_RUN_FIELDS = {"preset": str, "d_model": int, "lr": (int, float), "seed": int, "eval_loss": (int, float)}


def load_runs(json_path: str, optimizer: str, settings: dict) -> List[dict]:
    """The runs a saved sweep holds; a ValueError naming what is wrong with the file (so that a
    resumed sweep stops before any work, not with a traceback at its end)."""
    try:
        with open(json_path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{json_path}: cannot be read as a sweep's JSON ({err})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("runs"), list):
        raise ValueError(f"{json_path}: not a sweep's JSON (expected an object with a list 'runs')")
    if saved.get("optimizer") != optimizer or saved.get("settings") != settings:
        raise ValueError(f"{json_path}: holds a sweep with other settings ({saved.get('optimizer')}, "
                         f"{saved.get('settings')}); use another file to change them")
    for i, r in enumerate(saved["runs"]):
        bad = [k for k, kind in _RUN_FIELDS.items() if not isinstance(r, dict) or not isinstance(r.get(k), kind)]
        if bad:
            raise ValueError(f"{json_path}: run {i} lacks {', '.join(bad)} (or has the wrong type)")
    return saved["runs"]


def _one_thread():
    """A sweep worker: one thread, so that workers do not oversubscribe the cores (two threads per
    process beside another process turned an 18 ms step into 1.1 s on a 2-core machine)."""
    torch.set_num_threads(1)


def _ordered(presets, widths, lrs, seeds, done) -> list:
    """The runs left, a whole seed at a time and within it a whole preset at a time (in the order
    given), so that a sweep stopped early holds complete tables for its first seeds and presets."""
    return [(p, w, lr, seed) for seed in seeds for p in presets for w in widths for lr in lrs
            if (p, w, lr, seed) not in done]


def sweep(presets: Sequence[str], optimizer: str, widths: Sequence[int], lrs: Sequence[float], seeds: Sequence[int],
          settings: dict, json_path: Optional[str] = None, progress: bool = True, workers: int = 1,
          run_missing: bool = True) -> dict:
    """Every run not yet in json_path (written after each run ends); returns the whole result.
    workers > 1: runs in that many spawned processes of one thread each; workers == 1: in this
    process, on one thread. run_missing=False: only the report of what json_path holds."""
    state = dict(optimizer=optimizer, settings=settings, runs=[])
    if json_path and os.path.exists(json_path):
        state["runs"] = load_runs(json_path, optimizer, settings)
    todo = _ordered(presets, widths, lrs, seeds, {_key(r) for r in state["runs"]}) if run_missing else []

    def record(key, result, seconds):
        preset, width, lr, seed = key
        state["runs"].append(dict(preset=preset, d_model=width, lr=lr, seed=seed, seconds=round(seconds, 2), **result))
        if json_path:
            with open(json_path + ".tmp", "w") as f:
                json.dump(state, f, indent=1)
            os.replace(json_path + ".tmp", json_path)  # a sweep killed mid-write keeps the last good file

    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=f"lr-sweep {optimizer}", unit="run", disable=not progress)
    if workers <= 1:
        threads = torch.get_num_threads()
        _one_thread()
        try:
            for key in todo:
                record(key, *_timed_run(key, optimizer, settings))
                bar.update()
        finally:
            torch.set_num_threads(threads)
    elif todo:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)
        try:
            futures = {pool.submit(_timed_run, key, optimizer, settings): key for key in todo}
            for future in as_completed(futures):
                result, seconds = future.result()
                record(futures[future], result, seconds)
                bar.update()
        finally:  # an error or Ctrl-C: the runs not started are dropped, not waited for
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    state["report"] = report(state["runs"], presets, widths, lrs, seeds)
    return state


def _timed_run(key, optimizer, settings):
    """(the run's result, its seconds): in this process or in a worker."""
    began = time.perf_counter()
    preset, width, lr, seed = key
    return train_one(preset, optimizer, width, lr, seed, settings), time.perf_counter() - began


@functools.lru_cache(maxsize=None)
def unigram_loss() -> float:
    """Held-out loss (nats/byte) of predicting every byte by its frequency in the training text
    (add-one smoothed): a run that ends above it has learned less than byte counts, i.e. diverged."""
    text, held_out = _texts()
    p = (torch.bincount(text, minlength=256).double() + 1.0)
    p /= p.sum()
    return float(-p[held_out].log().mean())


def report(runs: List[dict], presets, widths, lrs, seeds) -> Dict[str, dict]:
    """Per preset, at each width (from the seeds that have every lr there; a width without one
    is left out): the mean held-out loss per lr over those seeds, the best lr and its loss,
    whether every seed alone picks that lr, the spread over seeds (min, max) of the loss at the
    best lr, the largest stable lr (every seed's loss below unigram_loss(), about 3.13 here),
    and, for the lr best at the smallest width ("transferred"), its loss and the transfer regret
    (its loss over the best loss, minus 1). Across widths: the drift of the best lr in steps of
    the grid given (positions in the sorted lrs, whatever their spacing)."""
    grid = sorted(lrs)
    table = {_key(r): r["eval_loss"] for r in runs}
    out = {}
    for preset in presets:
        per_width = {}
        for w in widths:
            done = [s for s in seeds if all((preset, w, lr, s) in table for lr in grid)]
            if not done:
                continue
            mean = {lr: sum(table[(preset, w, lr, s)] for s in done) / len(done) for lr in grid}
            best = min(grid, key=lambda lr: mean[lr])
            per_seed = [min(grid, key=lambda lr: table[(preset, w, lr, s)]) for s in done]
            stable = [lr for lr in grid if all(table[(preset, w, lr, s)] < unigram_loss() for s in done)]
            at_best = [table[(preset, w, best, s)] for s in done]
            per_width[w] = dict(loss_by_lr=mean, best_lr=best, best_loss=mean[best], seeds=done,
                                seeds_agree=all(b == best for b in per_seed), best_loss_spread=[min(at_best),
                                                                                                max(at_best)],
                                largest_stable_lr=max(stable) if stable else None)
        if per_width:
            transferred = per_width[min(per_width)]["best_lr"]
            for row in per_width.values():
                row["transferred_lr"] = transferred
                row["transferred_loss"] = row["loss_by_lr"][transferred]
                row["transfer_regret"] = row["transferred_loss"] / row["best_loss"] - 1.0
        positions = [grid.index(row["best_lr"]) for row in per_width.values()]
        out[preset] = dict(widths=per_width, drift_steps=max(positions) - min(positions) if positions else 0)
    return out


def markdown(results: Sequence[dict]) -> str:
    """The tables of docs/lr_transfer.md, one section per sweep (optimizer) and preset."""
    lines = []
    for result in results:
        s = result["settings"]
        lines += [f"## {result['optimizer']}", "",
                  f"Settings: MambaLM {s['n_layer']} layers, d_state {s['d_state']}, untied readout, base d_model "
                  f"{s['base_d_model']}; {s['steps']} steps of batch {s['batch']} x {s['seqlen']} bytes, 10 % "
                  f"warmup then cosine to 0; held-out loss over {s['eval_batches'] * s['batch']} windows "
                  f"(nats/byte). {len(result['runs'])} runs. Stable: every seed's loss below the byte-frequency "
                  f"(unigram) loss, {unigram_loss():.3f}.", ""]
        for preset, rep in result["report"].items():
            lines += [f"### {preset}: best lr drifts {rep['drift_steps']} grid steps", "",
                      "| d_model | seeds | best lr | best loss (seed min - max) | seeds agree | loss at transferred lr "
                      "| transfer regret | largest stable lr |", "|---|---|---|---|---|---|---|---|"]
            for w, row in rep["widths"].items():
                low, high = row["best_loss_spread"]
                top = max(float(lr) for lr in row["loss_by_lr"])  # stable up to the grid's end: at least that
                stable = ("none" if row["largest_stable_lr"] is None else
                          f"{'≥ ' if float(row['largest_stable_lr']) == top else ''}{row['largest_stable_lr']:.3g}")
                lines.append(f"| {w} | {len(row['seeds'])} | {row['best_lr']:.3g} | {row['best_loss']:.4f} "
                             f"({low:.4f} - {high:.4f}) | {'yes' if row['seeds_agree'] else 'no'} | "
                             f"{row['transferred_loss']:.4f} (lr {row['transferred_lr']:.3g}) | "
                             f"{100 * row['transfer_regret']:.1f} % | {stable} |")
            lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Held-out loss against log2 lr, one panel per preset, one line per width."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    presets = list(result["report"])
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4), squeeze=False, sharey=True)
    for ax, preset in zip(axes[0], presets):
        for w, row in result["report"][preset]["widths"].items():
            lrs = sorted(row["loss_by_lr"], key=float)
            ax.plot([float(lr) for lr in lrs], [row["loss_by_lr"][lr] for lr in lrs], marker="o", label=f"d_model {w}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"base learning rate ({result['optimizer']})")
        ax.set_title(f"{preset}: best lr drifts {result['report'][preset]['drift_steps']:g} grid steps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser):
    parser.add_argument("--presets", nargs="+", default=["sp", "mup_ssm"], choices=tuple(PRESETS))
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--widths", type=positive_int, nargs="+", default=[32, 64, 128, 256], help="d_model values")
    parser.add_argument("--lrs", type=positive_float, nargs="+", help="base learning rates (default: 2^-12 .. 2^-5 "
                        "for Adam, 2^-4 .. 2^3 for SGD)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=positive_int, default=150)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seqlen", type=positive_int, default=128)
    parser.add_argument("--n-layer", type=positive_int, default=2)
    parser.add_argument("--d-state", type=positive_int, default=16)
    parser.add_argument("--base-d-model", type=positive_int, help="the width the presets are SP at (default: the "
                        "smallest of --widths)")
    parser.add_argument("--eval-batches", type=positive_int, default=8)
    parser.add_argument("--json", metavar="PATH", help="the sweep's state: written after each run, resumed from")
    parser.add_argument("--plot", metavar="PNG")
    parser.add_argument("--markdown", metavar="MD", help="also write the report's tables (docs/lr_transfer.md's format)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report, plot and tabulate what --json holds (for the seeds given that are "
                        "complete), e.g. a sweep stopped early")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes of one thread each running the runs side by side (default: the core count, "
                        f"{os.cpu_count()} here). Measured on a 2-core CPU with the compiled CPU scan and 2 workers: one run "
                        "of 300 steps of batch 16 x 128 takes about 12 s at d_model 32 and 110 s at d_model 256; "
                        "one seed of 4 presets x 8 lrs x d_model 32-256 (128 runs) took 58 min")


def run(parser, args) -> int:
    if args.seqlen < 2:
        parser.error(f"--seqlen: must be at least 2, got {args.seqlen}")
    text, held_out = _texts()
    shortest = min(len(text), len(held_out) - 1)  # evaluation reads seqlen + 1 bytes from the held-out text
    if args.seqlen >= shortest:
        parser.error(f"--seqlen: must be below {shortest:,} (the training text has {len(text):,} bytes, the held-out "
                     f"text {len(held_out):,}), got {args.seqlen}")
    lrs = args.lrs or [2.0 ** e for e in (range(-12, -4) if args.optimizer == "adam" else range(-4, 4))]
    for flag, values in (("--widths", args.widths), ("--lrs", lrs), ("--seeds", args.seeds),
                         ("--presets", args.presets)):
        if len(set(values)) != len(values):
            parser.error(f"{flag}: repeated values {values}")
    if len(lrs) < 2:
        parser.error("--lrs: at least two learning rates")
    check_output_path(parser, "--json", args.json)
    check_output_path(parser, "--markdown", args.markdown)
    check_plot_path(parser, "--plot", args.plot)
    settings = dict(steps=args.steps, batch=args.batch, seqlen=args.seqlen, n_layer=args.n_layer,
                    d_state=args.d_state, base_d_model=args.base_d_model or min(args.widths),
                    eval_batches=args.eval_batches)
    if args.report_only and not (args.json and os.path.exists(args.json)):
        parser.error("--report-only: needs --json naming a sweep's file that exists")
    if args.json and os.path.exists(args.json):
        try:
            load_runs(args.json, args.optimizer, settings)  # what sweep resumes from, checked before any run
        except ValueError as err:
            parser.error(f"--json: {err}")
    result = sweep(args.presets, args.optimizer, args.widths, sorted(lrs), args.seeds, settings, args.json,
                   workers=args.workers, run_missing=not args.report_only)
    for preset, r in result["report"].items():
        print(f"{preset} ({args.optimizer}): best lr drifts {r['drift_steps']:g} grid steps across d_model "
              f"{args.widths}")
        for w, row in r["widths"].items():
            print(f"  d_model {w:>5}: best lr {row['best_lr']:.3g}, held-out loss {row['best_loss']:.4f}"
                  f"{'' if row['seeds_agree'] else '  (seeds disagree)'}")
    if args.json and not args.report_only:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown([result]) + "\n")
    return 0
