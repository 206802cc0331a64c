"""Width-scaling parameterizations (SP, muP, spectral, muP-SSM) for Mamba models."""

from .parameterization import Parameterization, keep_lr_scale, parameter_roles
from .presets import OPTIMIZERS, PRESETS, ROLES, Rule

__all__ = ["OPTIMIZERS", "PRESETS", "ROLES", "Parameterization", "Rule", "keep_lr_scale", "parameter_roles"]
