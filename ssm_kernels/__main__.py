"""Command line: `python -m ssm_kernels [check|profile] [options]`.

`check` (the default) runs every available backend against the float64 reference on the
current device (CUDA when present, else the CPU) and prints errors and times for a few widths.
`profile` runs one configuration under torch.profiler: top kernels, bandwidth, peak memory.
`coord-check` measures how a parameterization's SSM activations scale with width.
`train` trains a small MambaLM on text, data- and context-parallel under torchrun.
`lr-sweep` trains across widths and learning rates and reports how the best learning rate moves.
"""

import argparse
import sys

from .cli_args import (check_backends, check_output_path, check_plot_path, default_device, device, nonnegative_int,
                       positive_float, positive_int)
from .ops.selective_scan.backends import CHUNKED_BACKENDS


def _add_check_arguments(parser):
    parser.add_argument("--widths", type=positive_int, nargs="+", help="d_inner values (default: 64 256 1024 on the "
                        "CPU, 768 1536 3072 on CUDA)")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seqlen", type=positive_int, default=256)
    parser.add_argument("--d-state", type=positive_int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp32 on the CPU, bf16 on CUDA")
    parser.add_argument("--backends", nargs="+", choices=CHUNKED_BACKENDS,
                        help="default: torch, plus triton on CUDA or under TRITON_INTERPRET=1")
    parser.add_argument("--device", type=device, help="default cuda when available, else cpu")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions (median reported)")


def _add_profile_arguments(parser):
    parser.add_argument("--d-inner", type=positive_int, default=16384)
    parser.add_argument("--seqlen", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--d-state", type=positive_int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--backward", action="store_true", help="profile forward+backward (default: forward)")
    parser.add_argument("--trace", metavar="PATH", help="write a Chrome trace of the profiled step")
    parser.add_argument("--backend", choices=CHUNKED_BACKENDS + ("mamba_ssm",),
                        help="default triton on CUDA; on the CPU cpp when built, else torch (triton there needs "
                        "TRITON_INTERPRET=1)")
    parser.add_argument("--multipliers", choices=["fused", "separate", "none"], default="fused")
    parser.add_argument("--device", type=device, help="default cuda when available, else cpu")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps (median reported)")


def _add_coord_check_arguments(parser):
    parser.add_argument("--param", choices=["sp", "mup", "spectral", "mup_ssm", "mup_ssm_asymptotic"],
                        default="mup_ssm")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--sweep", choices=["d_inner", "d_state"], default="d_inner")
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
                        help="markdown of the slopes; presets.md (the preset tables) goes beside it")


def _check_coord_check_arguments(parser, args):
    from .mup import coord_check as cc
    try:
        cc.sweep_settings(args.sweep, args.widths, args.fixed)
    except ValueError as err:
        parser.error(f"--{err}")
    if args.dt_min >= args.dt_max:
        parser.error(f"--dt-min {args.dt_min:g} must be below --dt-max {args.dt_max:g}")
    check_output_path(parser, "--json", args.json)
    check_plot_path(parser, "--plot", args.plot)


def _coord_check(args):
    from .mup import coord_check as cc
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
    from .mup import PRESETS
    results = [cc.coord_check(p, o, s, **common) for p in PRESETS for o in ("adam", "sgd")
               for s in ("d_inner", "d_state")]
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
        import os

        from .mup.presets import presets_markdown
        folder = os.path.dirname(args.table_out) or "."
        os.makedirs(folder, exist_ok=True)
        with open(args.table_out, "w") as f:
            f.write(text)
        with open(os.path.join(folder, "presets.md"), "w") as f:  # the tables the slopes were measured with
            f.write(presets_markdown())
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ssm_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    _add_check_arguments(sub.add_parser("check", help="backends against the float64 reference (default)"))
    _add_profile_arguments(sub.add_parser("profile", help="one configuration under torch.profiler"))
    _add_coord_check_arguments(sub.add_parser("coord-check", help="activation scaling with width (muP check)"))
    from . import lr_sweep, train
    sweep_parser = sub.add_parser("lr-sweep", help="best learning rate against width, per preset (muP transfer)")
    lr_sweep.add_arguments(sweep_parser)
    train_parser = sub.add_parser("train", help="a small MambaLM on text; DDP + context parallel under torchrun")
    train.add_arguments(train_parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "check")
    args = parser.parse_args(argv)

    if args.command == "check":
        from .check import DTYPES, check
        dev = default_device(args.device)
        check_backends(parser, "--backends", args.backends, dev)
        on_gpu = dev.type == "cuda"
        widths = args.widths or ([768, 1536, 3072] if on_gpu else [64, 256, 1024])
        dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
        ok = check(widths, args.batch, args.seqlen, args.d_state, dtype, dev, args.backends, args.repeats)
        return 0 if ok else 1
    if args.command == "profile":
        from .profile import profile
        dev = default_device(args.device)
        check_backends(parser, "--backend", [args.backend] if args.backend else None, dev)
        if args.backend == "mamba_ssm" and dev.type != "cuda":
            parser.error("--backend mamba_ssm: its CUDA kernel needs a CUDA device")
        check_output_path(parser, "--trace", args.trace)
        dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
        profile(args.d_inner, args.seqlen, args.batch, dtype, args.d_state, args.backward, args.trace, args.backend,
                dev, args.multipliers, args.warmup, args.steps)
        return 0
    if args.command == "coord-check":
        _check_coord_check_arguments(parser, args)
        return _coord_check(args)
    if args.command == "lr-sweep":
        return lr_sweep.main(sweep_parser, args)
    if args.command == "train":
        train.check_arguments(train_parser, args)
        train.train(args)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
