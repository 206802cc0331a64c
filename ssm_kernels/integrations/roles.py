"""Declarations (roles, shapes, multiplier slots) for transformers' and mamba_ssm's Mamba models, so
that ssm_kernels.mup parameterizes them like our own. Registered by class name: importing this
imports neither library."""

from torch import nn

from ..modules.declarations import (Declaration, MixerShape, OutputMultiplier, declare_norm, persist_multipliers,
                                    register_declaration)
from ..modules.mamba import MAMBA_ROLES
from .patching import ScanMultipliers

HF_MAMBA = "transformers.models.mamba.modeling_mamba"
HF_FALCON = "transformers.models.falcon_mamba.modeling_falcon_mamba"
MAMBA_SSM_MIXER = "mamba_ssm.modules.mamba_simple"


def _mixer(module: nn.Module, shape: MixerShape) -> Declaration:
    holder = ScanMultipliers.on(module)
    d = Declaration(roles=dict(MAMBA_ROLES), mixer=shape,
                    slots={name: (holder, name) for name in ("dt_scale", "b_scale", "c_scale")})
    persist_multipliers(module)
    return d


def _hf_mixer(module: nn.Module) -> Declaration:
    c = module.config
    return _mixer(module, MixerShape(d_model=module.hidden_size, d_inner=module.intermediate_size,
                                     d_state=module.ssm_state_size, d_conv=module.conv_kernel_size,
                                     dt_rank=module.time_step_rank, dt_init=c.time_step_init_scheme,
                                     dt_init_scale=c.time_step_scale, dt_min=c.time_step_min, dt_max=c.time_step_max,
                                     dt_init_floor=c.time_step_floor))


def _mamba_ssm_mixer(module: nn.Module) -> Declaration:
    # mamba_ssm's Mamba does not keep its dt init arguments: its defaults are assumed.
    return _mixer(module, MixerShape(d_model=module.d_model, d_inner=module.d_inner, d_state=module.d_state,
                                     d_conv=module.d_conv, dt_rank=module.dt_rank))


def _lm(module: nn.Module, embedding: nn.Module, n_layer: int) -> Declaration:
    emb_name = next(name for name, m in module.named_modules() if m is embedding)
    d = Declaration(roles={f"{emb_name}.weight": "embedding", "lm_head.weight": "readout"}, n_layer=n_layer,
                    tied_readout=module.lm_head.weight is embedding.weight,
                    slots={"embedding": (OutputMultiplier.on(embedding), "value"),
                           "readout": (OutputMultiplier.on(module.lm_head), "value")})
    persist_multipliers(module)
    return d


def _hf_lm(module: nn.Module) -> Declaration:
    return _lm(module, module.backbone.embeddings, module.config.num_hidden_layers)


def _mamba_ssm_lm(module: nn.Module) -> Declaration:
    return _lm(module, module.backbone.embedding, module.config.n_layer)


FOREIGN_DECLARATIONS = (
        (f"{HF_MAMBA}.MambaMixer", _hf_mixer), (f"{HF_FALCON}.FalconMambaMixer", _hf_mixer),
        (f"{HF_MAMBA}.MambaRMSNorm", declare_norm), (f"{HF_FALCON}.FalconMambaRMSNorm", declare_norm),
        (f"{HF_MAMBA}.MambaForCausalLM", _hf_lm), (f"{HF_FALCON}.FalconMambaForCausalLM", _hf_lm),
        (f"{MAMBA_SSM_MIXER}.Mamba", _mamba_ssm_mixer), ("mamba_ssm.ops.triton.layer_norm.RMSNorm", declare_norm),
        ("mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel", _mamba_ssm_lm))
for _path, _declare in FOREIGN_DECLARATIONS:
    register_declaration(_path, _declare, mixer=_declare in (_hf_mixer, _mamba_ssm_mixer))
