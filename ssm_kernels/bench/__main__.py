"""`python -m ssm_kernels.bench plot RESULTS.json -o PNG [--table]`: draw a `pytest benchmarks/` results file."""

import argparse
import sys

from .plot import plot_results, summary_table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ssm_kernels.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("plot", help="throughput against width, one line per backend x multipliers")
    plot.add_argument("results", help="file written by pytest benchmarks/ --benchmark-json=RESULTS.json")
    plot.add_argument("-o", "--output", required=True, help="PNG to write")
    plot.add_argument("--title")
    plot.add_argument("--table", action="store_true", help="also print GB/s and peak memory per benchmark")
    args = parser.parse_args(argv)
    from ..cli.args import check_output_path
    check_output_path(plot, "--output", args.output)
    try:
        plot_results(args.results, args.output, args.title)
        if args.table:
            print("\n".join(summary_table(args.results)))
    except (OSError, ValueError) as err:  # a results file that is not one: a user error, exit 2 as argparse's
        print(f"{parser.prog} plot: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
