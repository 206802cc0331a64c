"""What a module tells the parameterization about itself: its parameters' roles, its shape, its
multiplier slots. Ours declare themselves (a `declaration()` method); modules of other libraries
(transformers, mamba_ssm) are declared by `ssm_kernels.integrations`, registered here by class
name so that nothing in this layer imports those libraries.

Also here, written once: mamba_ssm's initialization (`mamba_init_`), with a per-role scale hook
that the parameterization sets, and the persistence of multipliers in state dicts.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

MULTIPLIER_KEY = "ssm_kernels_multipliers"  # state-dict key (under the owner's prefix) of a slot owner's values


@dataclass
class MixerShape:
    """A Mamba-1 mixer's sizes and mamba_ssm's init settings for dt_proj."""
    d_model: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    dt_init: str = "random"       # "random" (uniform) or "constant"
    dt_init_scale: float = 1.0
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4


@dataclass
class Declaration:
    """roles: local parameter name -> role ("x_proj" stands for the three row roles x_proj_dt /
    x_proj_B / x_proj_C). mixer: set for a Mamba mixer. n_layer: set for a language model (its
    out_proj init is divided by sqrt(n_layer), as mamba_ssm does). slots: multiplier name ->
    (object, attribute), e.g. "dt_scale" -> (mixer.scan, "dt_scale"). tied_readout: the readout
    is the embedding's Parameter."""
    roles: Dict[str, str] = field(default_factory=dict)
    mixer: Optional[MixerShape] = None
    n_layer: Optional[int] = None
    slots: Dict[str, Tuple[object, str]] = field(default_factory=dict)
    tied_readout: bool = False


_FOREIGN: Dict[str, Callable[[nn.Module], Declaration]] = {}
_FOREIGN_MIXERS: List[str] = []  # the registered classes that are Mamba mixers


def class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_declaration(qualified_class_name: str, declare: Callable[[nn.Module], Declaration], *,
                         mixer: bool = False) -> None:
    """Declares the modules of a class we do not own (by "module.QualName", so that the class's
    library need not be imported). declare(module) -> Declaration; mixer: the class is a Mamba mixer."""
    _FOREIGN[qualified_class_name] = declare
    if mixer:
        _FOREIGN_MIXERS.append(qualified_class_name)


def foreign_mixer_names() -> List[str]:
    """The short names of the Mamba mixer classes declared by register_declaration, sorted."""
    return sorted({path.rpartition(".")[2] for path in _FOREIGN_MIXERS})


def declaration(module: nn.Module) -> Optional[Declaration]:
    own = getattr(module, "declaration", None)
    if callable(own):
        return own()
    for cls in type(module).__mro__:
        declare = _FOREIGN.get(class_name(cls))
        if declare is not None:
            return declare(module)
    return None


def declared_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module, Declaration]]:
    """(prefix, module, declaration) for every declared module; a declared module's parameters
    that another declared module inside it claims stay with the inner one."""
    for prefix, module in model.named_modules():
        d = declaration(module)
        if d is not None:
            yield prefix, module, d


def parameter_roles(model: nn.Module) -> Dict[str, str]:
    """name -> role for every parameter, from the modules' declarations (never from attributes on
    the Parameters, which FSDP and torch.save drop). A tied readout counts once, as the embedding."""
    roles: Dict[str, str] = {}
    for prefix, module, d in declared_modules(model):
        dot = prefix + "." if prefix else ""
        params = dict(module.named_parameters())
        for local, role in d.roles.items():
            if local in params:
                roles.setdefault(dot + local, role)
    names = [name for name, _ in model.named_parameters()]  # deduplicated: a tied weight once
    missing = [n for n in names if n not in roles]
    if missing:
        raise ValueError(f"model: no parameterization role for parameters {missing}; roles come from the "
                         "modules' declarations (ssm_kernels' Mamba, MambaLM, RMSNorm; nn.Embedding, nn.LayerNorm; "
                         "transformers' and mamba_ssm's Mamba models through ssm_kernels.integrations)")
    return {n: roles[n] for n in names}


def _declare_embedding(module: nn.Module) -> Declaration:
    return Declaration(roles={"weight": "embedding"})


def declare_norm(module: nn.Module) -> Declaration:
    """Every parameter of a norm module (weight, and bias where it has one) has the role "norm"."""
    return Declaration(roles={name: "norm" for name, _ in module.named_parameters(recurse=False)})


register_declaration(class_name(nn.Embedding), _declare_embedding)
register_declaration(class_name(nn.LayerNorm), declare_norm)


# -- multiplier slots that survive save / load ----------------------------------------------------
class OutputMultiplier:
    """A forward hook that multiplies a module's output by `value` (1: untouched); the slot that
    carries an embedding or readout multiplier into a module we do not own."""

    def __init__(self):
        self.value = 1.0

    def __call__(self, module, args, output):
        return output if self.value == 1.0 else output * self.value

    @staticmethod
    def on(module: nn.Module) -> "OutputMultiplier":
        hook = module.__dict__.get("_ssm_kernels_output_multiplier")
        if hook is None:
            hook = OutputMultiplier()
            module.register_forward_hook(hook)
            module.__dict__["_ssm_kernels_output_multiplier"] = hook
        return hook


def persist_multipliers(owner: nn.Module) -> None:
    """Makes a declared module's multiplier slots part of its state dict, under "<prefix>ssm_kernels_multipliers"
    (a float64 tensor), only when one of them is not 1: an unparameterized model's state dict stays
    mamba_ssm's and transformers' own, and a parameterized one is refused by their strict loading
    (an unexpected key) instead of silently computing another function. Loading restores the values;
    loading a state dict without the key into a module whose multipliers are not 1 warns."""
    if owner.__dict__.get("_ssm_kernels_persisted"):
        return
    owner.__dict__["_ssm_kernels_persisted"] = True
    # Module-level hooks that read the module they are given: a deepcopy or a pickle of the model
    # keeps working (a closure over `owner` would point a copy at the original).
    owner.register_state_dict_post_hook(_save_multipliers)
    owner.register_load_state_dict_pre_hook(_load_multipliers)


def _slot_values(module: nn.Module):
    return [float(getattr(obj, attr)) for obj, attr in declaration(module).slots.values()]


def _save_multipliers(module, state_dict, prefix, local_metadata):
    values = _slot_values(module)
    if any(v != 1.0 for v in values):
        state_dict[prefix + MULTIPLIER_KEY] = torch.tensor(values, dtype=torch.float64)


def _load_multipliers(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    saved = state_dict.pop(prefix + MULTIPLIER_KEY, None)
    if saved is None:
        current = _slot_values(module)
        if any(v != 1.0 for v in current):
            warnings.warn(f"{prefix or 'model'}: the state dict has no width multipliers but this module's are "
                          f"{current}; the loaded weights now compute a different function than where they came "
                          "from (set the multipliers to 1 for an unparameterized checkpoint)", stacklevel=2)
        return
    error = _apply_saved(list(declaration(module).slots.values()), saved, prefix + MULTIPLIER_KEY)
    if error:
        error_msgs.append(error)


def _apply_saved(pairs, saved: Tensor, key: str) -> Optional[str]:
    """Sets the slots from a saved tensor; the error message when the counts differ."""
    if saved.numel() != len(pairs):
        return f"{key}: {saved.numel()} multipliers saved, the module has {len(pairs)}"
    for (obj, attr), value in zip(pairs, saved.tolist()):
        setattr(obj, attr, value)
    return None


def restore_multipliers(model: nn.Module, state_dict: Dict[str, Tensor]) -> nn.Module:
    """Sets every declared multiplier slot from a state dict's "ssm_kernels_multipliers" entries
    (a model loaded by other means than load_state_dict, e.g. transformers' from_pretrained, which
    reports those entries as unused)."""
    for prefix, module, d in declared_modules(model):
        if not d.slots:
            continue
        persist_multipliers(module)
        key = (prefix + "." if prefix else "") + MULTIPLIER_KEY
        saved = state_dict.get(key)
        if saved is None:
            continue
        error = _apply_saved(list(d.slots.values()), saved, key)
        if error:
            raise ValueError(error)
    return model


# -- mamba_ssm's initialization, once ------------------------------------------------------------
def _uniform(t: Tensor, bound: float, generator):
    return t.uniform_(-bound, bound, generator=generator)


def dt_bias_init(shape: MixerShape, like: Tensor, generator=None) -> Tensor:
    """softplus^-1 of dt log-uniform in [dt_min, dt_max], floored at dt_init_floor (mamba_ssm)."""
    u = torch.rand(shape.d_inner, generator=generator).to(like.device)
    dt = torch.exp(u * (math.log(shape.dt_max) - math.log(shape.dt_min)) + math.log(shape.dt_min))
    dt = dt.clamp(min=shape.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


@torch.no_grad()
def init_ssm_parameters_(params: Dict[str, Tensor], shape: MixerShape, dt_weight_bound: float, generator=None):
    """dt_proj.weight uniform in +-dt_weight_bound (or that constant), dt_proj.bias from
    dt_bias_init, A_log[:, n] = log(n + 1) (S4D-real), D = 1."""
    weight, bias = params["dt_proj.weight"], params["dt_proj.bias"]
    if shape.dt_init == "constant":
        weight.fill_(dt_weight_bound)
    else:
        _uniform(weight, dt_weight_bound, generator)
    bias.copy_(dt_bias_init(shape, bias, generator))
    A_log = params["A_log"]
    A = torch.arange(1, shape.d_state + 1, dtype=torch.float32, device=A_log.device)
    A_log.copy_(torch.log(A).repeat(shape.d_inner, 1))
    params["D"].fill_(1.0)


X_PROJ_ROWS = ("x_proj_dt", "x_proj_B", "x_proj_C")


@torch.no_grad()
def mamba_init_(model: nn.Module, scale: Optional[Callable[[str], float]] = None,
                generator: Optional[torch.Generator] = None) -> nn.Module:
    """Draws every declared parameter with mamba_ssm's init (MambaLMHeadModel's _init_weights with
    rescale_prenorm_residual, at the model's own shape), each random draw's spread multiplied by
    scale(role) (default 1). Structured parameters (dt_proj.bias, A_log, D, norms, biases) are set,
    not scaled. A tied readout keeps the embedding's draw."""
    scale = scale or (lambda role: 1.0)
    n_layers = [d.n_layer for _, _, d in declared_modules(model) if d.n_layer]
    n_layer = n_layers[0] if n_layers else None
    seen = set()
    for _, module, d in declared_modules(model):
        params = dict(module.named_parameters())
        if d.mixer is not None:
            _init_mixer(params, d, d.mixer, scale, n_layer, generator)
            seen.update(id(params[n]) for n in d.roles if n in params)
            continue
        for local, role in d.roles.items():
            p = params.get(local)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if role == "embedding":
                p.normal_(0.0, 0.02 * scale(role), generator=generator)
            elif role == "readout":
                _uniform(p, scale(role) / math.sqrt(p.shape[1]), generator)
            elif role == "norm":
                p.fill_(1.0) if local.endswith("weight") else p.zero_()
    return model


def _init_mixer(params, d: Declaration, shape: MixerShape, scale, n_layer, generator):
    by_role = {role: params[local] for local, role in d.roles.items() if local in params}
    _uniform(by_role["in_proj"], scale("in_proj") / math.sqrt(shape.d_model), generator)
    conv_bound = 1 / math.sqrt(shape.d_conv)
    _uniform(by_role["conv_weight"], conv_bound * scale("conv_weight"), generator)
    if "conv_bias" in by_role:
        _uniform(by_role["conv_bias"], conv_bound * scale("conv_bias"), generator)
    rows = by_role["x_proj"].split([shape.dt_rank, shape.d_state, shape.d_state], dim=0)
    for role, block in zip(X_PROJ_ROWS, rows):
        _uniform(block, scale(role) / math.sqrt(shape.d_inner), generator)
    out_bound = scale("out_proj") / math.sqrt(shape.d_inner)
    _uniform(by_role["out_proj"], out_bound / math.sqrt(n_layer) if n_layer else out_bound, generator)
    for role in ("in_proj_bias", "out_proj_bias"):
        if role in by_role:
            by_role[role].zero_()
    local = {role: name for name, role in d.roles.items()}
    init_ssm_parameters_({name: params[local[role]] for name, role in
                          (("dt_proj.weight", "dt_proj_weight"), ("dt_proj.bias", "dt_proj_bias"), ("A_log", "A_log"),
                           ("D", "D"))}, shape, shape.dt_rank ** -0.5 * shape.dt_init_scale * scale("dt_proj_weight"),
                         generator)
