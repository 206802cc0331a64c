"""Command line: `python -m ssm_kernels [check|profile] [options]`.

`check` (the default) runs every available backend against the float64 reference on the
current device (CUDA when present, else the CPU) and prints errors and times for a few widths.
`profile` runs one configuration under torch.profiler: top kernels, bandwidth, peak memory.
"""

import argparse
import sys

import torch


def _add_check_arguments(parser):
    parser.add_argument("--widths", type=int, nargs="+", help="d_inner values (default: 64 256 1024 on the "
                        "CPU, 768 1536 3072 on CUDA)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp32 on the CPU, bf16 on CUDA")
    parser.add_argument("--backends", nargs="+", choices=["torch", "triton"],
                        help="default: torch, plus triton on CUDA or under TRITON_INTERPRET=1")
    parser.add_argument("--device", help="default cuda when available, else cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")


def _add_profile_arguments(parser):
    parser.add_argument("--d-inner", type=int, default=16384)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--backward", action="store_true", help="profile forward+backward (default: forward)")
    parser.add_argument("--trace", metavar="PATH", help="write a Chrome trace of the profiled step")
    parser.add_argument("--backend", choices=["triton", "torch", "mamba_ssm"],
                        help="default triton on CUDA, torch on the CPU (triton there needs TRITON_INTERPRET=1)")
    parser.add_argument("--multipliers", choices=["fused", "separate", "none"], default="fused")
    parser.add_argument("--device", help="default cuda when available, else cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ssm_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    _add_check_arguments(sub.add_parser("check", help="backends against the float64 reference (default)"))
    _add_profile_arguments(sub.add_parser("profile", help="one configuration under torch.profiler"))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "check")
    args = parser.parse_args(argv)

    if args.command == "check":
        from .check import DTYPES, check
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = device.type == "cuda"
        widths = args.widths or ([768, 1536, 3072] if on_gpu else [64, 256, 1024])
        dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
        ok = check(widths, args.batch, args.seqlen, args.d_state, dtype, device, args.backends, args.repeats)
        return 0 if ok else 1
    if args.command == "profile":
        from .profile import profile
        if args.steps < 1 or args.warmup < 0:
            parser.error("--steps must be >= 1 and --warmup >= 0")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
        profile(args.d_inner, args.seqlen, args.batch, dtype, args.d_state, args.backward, args.trace, args.backend,
                device, args.multipliers, args.warmup, args.steps)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
