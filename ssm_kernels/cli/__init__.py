"""The command line, `python -m ssm_kernels COMMAND`: one module per command (see main.py)."""

from .main import COMMANDS, main

__all__ = ["COMMANDS", "main"]
