"""Triton selective-scan kernels for Mamba-style SSMs, with width-dependent (muP-SSM) multipliers."""

from .ops import selective_scan_fn, selective_scan_ref, selective_state_update

__version__ = "0.1.0"
__all__ = ["selective_scan_fn", "selective_scan_ref", "selective_state_update", "__version__"]
