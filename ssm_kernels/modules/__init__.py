"""Mamba-1 modules on our selective scan: the mixer, mamba_inner_fn, and a small language model."""

from .inference import InferenceParams
from .mamba import Mamba, SelectiveScan, causal_conv1d, causal_conv1d_update, mamba_inner_fn
from .mamba_lm import Block, MambaLM, RMSNorm

__all__ = ["Block", "InferenceParams", "Mamba", "MambaLM", "RMSNorm", "SelectiveScan", "causal_conv1d",
           "causal_conv1d_update", "mamba_inner_fn"]
