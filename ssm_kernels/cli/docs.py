"""`python -m ssm_kernels docs`: writes the documentation generated from the code, docs/presets.md
(every preset's exponents, the tables in ssm_kernels/mup/presets.py); a test checks it is current."""

import os

from ..mup.presets import presets_markdown

HELP = "write docs/presets.md from the preset tables"


def add_arguments(parser):
    parser.add_argument("--out", default="docs", metavar="FOLDER", help="where presets.md goes (default docs)")


def run(parser, args) -> int:
    if not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: no such folder")
    path = os.path.join(args.out, "presets.md")
    with open(path, "w") as f:
        f.write(presets_markdown())
    print(f"wrote {path}")
    return 0
