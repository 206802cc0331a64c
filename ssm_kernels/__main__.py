"""`python -m ssm_kernels`: the command line (ssm_kernels/cli/)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
