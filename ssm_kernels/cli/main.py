"""Command line: `python -m ssm_kernels [COMMAND] [options]`, one module of this package per command.

`check` (the default) runs every available backend against the float64 reference on the
current device (CUDA when present, else the CPU) and prints errors and times for a few widths.
`profile` runs one configuration under torch.profiler: top kernels, bandwidth, peak memory.
`coord-check` measures how a parameterization's SSM activations scale with width.
`train` trains a small MambaLM on text, data- and context-parallel under torchrun.
`lr-sweep` trains across widths and learning rates and reports how the best learning rate moves.
`docs` writes the documentation generated from the code (docs/presets.md).

Each command's module has HELP, add_arguments(parser) and run(parser, args) -> exit status; this
dispatcher only builds the parser from COMMANDS and calls the chosen command's run.
"""

import argparse
import sys

from . import check, coord_check, docs, lr_sweep, profile, train

COMMANDS = {"check": check, "profile": profile, "coord-check": coord_check, "lr-sweep": lr_sweep, "train": train,
            "docs": docs}
DEFAULT = "check"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssm_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    parsers = {}
    for name, command in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=command.HELP)
        command.add_arguments(parsers[name])
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, DEFAULT)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return COMMANDS[args.command].run(parsers[args.command], args)
