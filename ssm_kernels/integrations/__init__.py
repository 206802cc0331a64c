"""Existing Mamba models on our kernels and parameterization: transformers' MambaForCausalLM /
FalconMambaForCausalLM and mamba_ssm's Mamba modules (patched in place, with an undo), and the
declarations that let ssm_kernels.mup parameterize them."""

from ..modules.declarations import restore_multipliers
from . import roles  # noqa: F401  (registers the declarations)
from .mamba_ssm_models import apply_to_mamba_ssm
from .patching import Patch
from .transformers_models import apply_to_transformers

__all__ = ["Patch", "apply_to_mamba_ssm", "apply_to_transformers", "restore_multipliers", "roles"]
