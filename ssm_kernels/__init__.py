"""Triton selective-scan kernels for Mamba-style SSMs, with width-dependent (muP-SSM) multipliers."""

from .ops import selective_scan_fn, selective_scan_ref, selective_state_update
# The package root wires the layers: importing the integrations' roles declares transformers' and
# mamba_ssm's Mamba classes (by name, importing neither library), so that ssm_kernels.mup
# parameterizes them without depending on the integrations layer.
from .integrations import roles as _foreign_declarations  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["selective_scan_fn", "selective_scan_ref", "selective_state_update", "__version__"]
