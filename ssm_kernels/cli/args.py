"""Argument types and checks shared by the command lines (`python -m ssm_kernels ...`,
`python -m ssm_kernels.bench`): every user mistake ends in argparse's usage line, a message that
names the flag, and exit status 2, before any work starts."""

import argparse
import math
import os

import torch


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def device(text: str) -> torch.device:
    """A device this machine has: cpu, or cuda[:i] when CUDA is available."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:index], got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:index], got {text!r}")
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index is not None and dev.index >= torch.cuda.device_count())):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device on this machine")
    return dev


def default_device(dev) -> torch.device:
    return dev if dev is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_backends(parser: argparse.ArgumentParser, flag: str, names, dev: torch.device) -> None:
    """Each named scan backend runs on this device, or parser.error says why not."""
    from ..ops.selective_scan.backends import BACKENDS
    for name in names or ():
        if name not in BACKENDS:
            continue  # e.g. mamba_ssm in profile: checked where it is used
        reason = BACKENDS[name].unavailable_reason(dev)
        if reason is not None:
            parser.error(f"{flag} {name}: {reason}")


def check_output_path(parser: argparse.ArgumentParser, flag: str, path) -> None:
    """A file the run will write at its end: its folder must exist now, not after the run."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        parser.error(f"{flag} {path}: is a folder, expected a file name")
    import tempfile
    try:  # a folder that exists but takes no new file (read-only, /proc) fails now, not after the run
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ssm_kernels_write_check"):
            pass
    except OSError as err:
        parser.error(f"{flag} {path}: cannot write in {folder} ({err.strerror or err})")


def check_plot_path(parser: argparse.ArgumentParser, flag: str, path) -> None:
    """A plot the run will draw at its end: matplotlib importable, a format it writes, a writable folder."""
    if path is None:
        return
    check_output_path(parser, flag, path)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        parser.error(f"{flag}: drawing the plot needs matplotlib (pip install matplotlib, or the [plot] extra)")
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in formats:
        parser.error(f"{flag} {path}: matplotlib writes {', '.join('.' + f for f in sorted(formats))}, "
                     f"not {'.' + suffix if suffix else 'a file without a suffix'}")
