"""`python -m ssm_kernels coord-check`: how a parameterization's SSM activations scale with width
(the muP coordinate check), one sweep or, with --table, every preset x optimizer x sweep."""

import json
import os

from ..mup import OPTIMIZERS, PRESETS
from ..mup import coord_check as cc
from .args import check_output_path, check_plot_path, nonnegative_int, positive_float, positive_int

HELP = "activation scaling with width (muP check)"


def add_arguments(parser):
    parser.add_argument("--param", choices=tuple(PRESETS), default="mup_ssm")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--sweep", choices=cc.SWEEPS, default="d_inner")
    parser.add_argument("--json", metavar="PATH", help="write the result (with --table: every sweep's)")
    parser.add_argument("--plot", metavar="PNG", help="log2 RMS against log2 width, one panel per quantity")
    parser.add_argument("--widths", type=positive_int, nargs="+",
                        help="default d_inner 64 128 256 512 (d_state 16), or d_state 16 32 64 128 (d_inner 128)")
    parser.add_argument("--fixed", type=positive_int, help="the dimension not swept (default 16 or 128, as above)")
    parser.add_argument("--steps", type=positive_int, default=4, help="training steps (default 4)")
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=positive_float, help="base learning rate (default 3e-3 Adam, 0.3 SGD)")
    parser.add_argument("--dt-min", type=positive_float, default=0.001, help="Mamba's dt init range (default 0.001 0.1; "
                        "--dt-min 0.5 --dt-max 1 puts the d_state sweep in the asymptotic regime N_x >> 1/dt)")
    parser.add_argument("--dt-max", type=positive_float, default=0.1)
    parser.add_argument("--table", action="store_true",
                        help="every preset x optimizer x sweep; print the slopes and write them to --table-out")
    parser.add_argument("--table-out", default="docs/coord_check_table.md", metavar="MD",
                        help="markdown of the slopes (`python -m ssm_kernels docs` writes the preset tables they "
                        "were measured with, docs/presets.md)")


def _check_arguments(parser, args):
    try:
        cc.sweep_settings(args.sweep, args.widths, args.fixed)
    except ValueError as err:
        parser.error(f"--{err}")
    if args.dt_min >= args.dt_max:
        parser.error(f"--dt-min {args.dt_min:g} must be below --dt-max {args.dt_max:g}")
    check_output_path(parser, "--json", args.json)
    check_plot_path(parser, "--plot", args.plot)


def run(parser, args) -> int:
    _check_arguments(parser, args)
    common = dict(widths=args.widths, fixed=args.fixed, steps=args.steps, seeds=args.seeds, lr=args.lr, progress=True,
                  mixer_kwargs=dict(dt_min=args.dt_min, dt_max=args.dt_max))
    if not args.table:
        result = cc.coord_check(args.param, args.optimizer, args.sweep, **common)
        print(f"{args.param}, {args.optimizer}, sweep {args.sweep}, widths {result['widths']}: slopes of log2 RMS "
              "against log2 width, per layer")
        for q, slopes in result["slopes"].items():
            print(f"  {q:<10} mean {result['mean_slopes'][q]:+.2f}   "
                  + "  ".join(f"{layer}: {s:+.2f}" for layer, s in slopes.items()))
        if args.json:
            cc.save_json(result, args.json)
        if args.plot:
            cc.plot(result, args.plot)
        return 0
    results = [cc.coord_check(p, o, s, **common) for p in PRESETS for o in OPTIMIZERS
               for s in cc.SWEEPS]
    r0 = results[0]
    settings = (f"Settings: 3-layer MambaLM (expand 2, vocab {r0['model']['vocab']}, untied readout, dt init in "
                f"[{args.dt_min:g}, {args.dt_max:g}]), one fixed batch "
                f"{r0['model']['batch']} x {r0['model']['seqlen']} tokens, {args.steps} steps, seeds {args.seeds}, "
                f"base lr {{adam: {cc.DEFAULT_LR['adam'] if args.lr is None else args.lr}, "
                f"sgd: {cc.DEFAULT_LR['sgd'] if args.lr is None else args.lr}}}; "
                + "; ".join(f"{r['sweep']} sweep: widths {r['widths']}, {r['fixed']}" for r in results[:2]) + ".")
    text = cc.table_markdown(results, settings)
    print(text)
    if args.table_out:
        os.makedirs(os.path.dirname(args.table_out) or ".", exist_ok=True)
        with open(args.table_out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
