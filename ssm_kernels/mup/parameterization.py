"""Applying a preset to a model: roles, initialization, forward multipliers, optimizer param groups."""

import math
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from ..modules.mamba import Mamba
from ..modules.mamba_lm import MambaLM, RMSNorm
from .presets import DECAYED, OPTIMIZERS, PRESETS, ROLES, Rule, check_table, share_learning_rate

X_PROJ_ROWS = ("x_proj_dt", "x_proj_B", "x_proj_C")
_MAMBA_PARAMS = {"in_proj.weight": "in_proj", "in_proj.bias": "in_proj_bias", "conv1d.weight": "conv_weight",
                 "conv1d.bias": "conv_bias", "x_proj.weight": "x_proj", "dt_proj.weight": "dt_proj_weight",
                 "dt_proj.bias": "dt_proj_bias", "A_log": "A_log", "D": "D", "out_proj.weight": "out_proj",
                 "out_proj.bias": "out_proj_bias"}


def parameter_roles(model: nn.Module) -> "OrderedDict[str, str]":
    """name -> role for every parameter, from module types and names (never from attributes on the
    Parameters, which FSDP and torch.save drop). "x_proj" stands for the three row roles
    x_proj_dt / x_proj_B / x_proj_C. A tied lm_head counts once, as the embedding."""
    roles = OrderedDict()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        if isinstance(module, Mamba):
            for local, role in _MAMBA_PARAMS.items():
                owner, _, attr = local.rpartition(".")
                if getattr(module.get_submodule(owner) if owner else module, attr, None) is not None:
                    roles[dot + local] = role
        elif isinstance(module, nn.Embedding):
            roles[dot + "weight"] = "embedding"
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            for name, _ in module.named_parameters(recurse=False):
                roles[dot + name] = "norm"
        elif prefix.rpartition(".")[2] == "lm_head":
            roles[dot + "weight"] = "readout"
    names = [name for name, _ in model.named_parameters()]  # deduplicated: a tied weight once
    missing = [n for n in names if n not in roles]
    if missing:
        raise ValueError(f"model: no parameterization role for parameters {missing}; roles come from Mamba, "
                         "nn.Embedding, RMSNorm/LayerNorm and a Linear named lm_head")
    return OrderedDict((n, roles[n]) for n in names)


def _is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(p, DTensor)


class Parameterization:
    """A preset for one optimizer, relative to a base shape (base_d_inner, base_d_state).

    p = Parameterization("mup_ssm", "adam", base_d_inner=64, base_d_state=16)
    p.init_(model)                                     # draws every parameter (idempotent)
    p.apply_multipliers(model)                         # kernel and readout/embedding multipliers
    opt = torch.optim.AdamW(p.param_groups(model, lr=3e-3, weight_decay=0.1))
    """

    def __init__(self, preset: str, optimizer: str, base_d_inner: int, base_d_state: int):
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
        optimizer = {"adamw": "adam"}.get(optimizer, optimizer)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS} (or adamw), got {optimizer!r}")
        if base_d_inner < 1 or base_d_state < 1:
            raise ValueError("base_d_inner, base_d_state: must be positive")
        self.preset, self.optimizer = preset, optimizer
        self.base_d_inner, self.base_d_state = base_d_inner, base_d_state
        self.table: Dict[str, Rule] = PRESETS[preset][optimizer]
        check_table(self.table)
        self.resolved = share_learning_rate(self.table, optimizer)

    # -- scale factors -----------------------------------------------------------------------
    def factor(self, exponents, d_inner: int, d_state: int) -> float:
        return (d_inner / self.base_d_inner) ** exponents[0] * (d_state / self.base_d_state) ** exponents[1]

    def factors(self, role: str, d_inner: int, d_state: int) -> Dict[str, float]:
        rule = self.resolved[role]
        return {k: self.factor(getattr(rule, k), d_inner, d_state) for k in ("init", "mult", "lr", "wd")}

    @staticmethod
    def _shape(model: nn.Module):
        mixers = [m for m in model.modules() if isinstance(m, Mamba)]
        if not mixers:
            raise ValueError("model: has no Mamba layer")
        shapes = {(m.d_inner, m.d_state, m.expand) for m in mixers}
        if len(shapes) > 1:
            raise ValueError(f"model: Mamba layers of different shapes {sorted(shapes)}")
        return mixers, shapes.pop()

    # -- initialization ----------------------------------------------------------------------
    @torch.no_grad()
    def init_(self, model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
        """Draws every parameter afresh: SP's (mamba_ssm's) distribution at the base shape, its std
        scaled by the init factor. Idempotent: the result does not depend on earlier values, and
        the same generator state gives the same tensors."""
        roles = parameter_roles(model)
        mixers, (d_inner, d_state, expand) = self._shape(model)
        base_d_model = self.base_d_inner / expand
        lms = [m for m in model.modules() if isinstance(m, MambaLM)]  # also inside a DDP or other wrapper
        n_layer = lms[0].n_layer if lms else None
        params = dict(model.named_parameters())
        sharded = [name for name, p in params.items() if _is_dtensor(p)]
        if sharded:
            raise ValueError(f"model: parameters {sharded[:3]}... are sharded (DTensor); draw them before "
                             "sharding: parameterize_ (or init_) first, then fully_shard")

        def uniform(t, bound):
            return t.uniform_(-bound, bound, generator=generator)

        def f(role):
            return self.factors(role, d_inner, d_state)["init"]

        for name, role in roles.items():
            p = params[name]
            if role == "embedding":
                p.normal_(0.0, 0.02 * f(role), generator=generator)
            elif role == "readout":
                uniform(p, f(role) / math.sqrt(base_d_model))
            elif role == "norm" and name.endswith("weight"):
                p.fill_(1.0)
            elif role == "norm":  # a LayerNorm bias
                p.zero_()
            elif role in ("in_proj_bias", "out_proj_bias"):
                p.zero_()
        for mixer in mixers:
            # SP's dt_proj bound is dt_rank^-1/2: at the base shape, the base shape's rank.
            dt_rank_base = math.ceil(base_d_model / 16) if mixer.dt_rank_auto else mixer.dt_rank
            uniform(mixer.in_proj.weight, f("in_proj") / math.sqrt(base_d_model))
            conv_bound = 1 / math.sqrt(mixer.d_conv)
            uniform(mixer.conv1d.weight, conv_bound * f("conv_weight"))
            if mixer.conv1d.bias is not None:
                uniform(mixer.conv1d.bias, conv_bound * f("conv_bias"))
            rows = mixer.x_proj.weight.split([mixer.dt_rank, d_state, d_state], dim=0)
            for role, block in zip(X_PROJ_ROWS, rows):
                uniform(block, f(role) / math.sqrt(self.base_d_inner))
            out_bound = f("out_proj") / math.sqrt(self.base_d_inner)
            uniform(mixer.out_proj.weight, out_bound / math.sqrt(n_layer) if n_layer else out_bound)
            # dt_proj (weight at the scaled bound, bias from log-uniform dt), A_log, D
            mixer.reset_ssm_parameters(generator, dt_rank_base ** -0.5 * mixer.dt_init_scale * f("dt_proj_weight"))
        return model

    # -- forward multipliers -----------------------------------------------------------------
    def multipliers(self, d_inner: int, d_state: int) -> Dict[str, float]:
        m = {role: self.factors(role, d_inner, d_state)["mult"] for role in ROLES}
        return dict(dt_scale=m["x_proj_dt"] * m["dt_proj_weight"], b_scale=m["x_proj_B"], c_scale=m["x_proj_C"],
                    embedding=m["embedding"], readout=m["readout"])

    def apply_multipliers(self, model: nn.Module) -> nn.Module:
        """Sets the kernel multipliers on every mixer.scan and MambaLM's embedding/readout multipliers.
        They are module attributes, not state: call this again after building or loading a model."""
        mixers, (d_inner, d_state, _) = self._shape(model)
        m = self.multipliers(d_inner, d_state)
        for mixer in mixers:
            mixer.scan.dt_scale, mixer.scan.b_scale, mixer.scan.c_scale = m["dt_scale"], m["b_scale"], m["c_scale"]
        for module in model.modules():
            if isinstance(module, MambaLM):
                module.embedding_multiplier, module.readout_multiplier = m["embedding"], m["readout"]
        return model

    def parameterize_(self, model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
        """init_ then apply_multipliers."""
        return self.apply_multipliers(self.init_(model, generator))

    # -- optimizer ---------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> List[dict]:
        """Plain param groups, one per (lr_scale, weight_decay):
        {"params": [...], "lr": lr * lr_scale, "lr_scale": lr_scale, "weight_decay": ..., "roles": [...]}."""
        _, (d_inner, d_state, _) = self._shape(model)
        params = dict(model.named_parameters())
        groups: "OrderedDict[tuple, dict]" = OrderedDict()
        for name, role in parameter_roles(model).items():
            rule_role = "x_proj_dt" if role == "x_proj" else role  # x_proj's rows share the dt rows' lr and wd
            fac = self.factors(rule_role, d_inner, d_state)
            wd = weight_decay * fac["wd"] if rule_role in DECAYED else 0.0
            key = (fac["lr"], wd)
            group = groups.setdefault(key, {"params": [], "lr": lr * fac["lr"], "lr_scale": fac["lr"],
                                            "weight_decay": wd, "roles": []})
            group["params"].append(params[name])
            if role not in group["roles"]:
                group["roles"].append(role)
        return list(groups.values())


def keep_lr_scale(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Lets any LR scheduler drive the base learning rate while each group keeps its lr_scale.

    Call it on an optimizer built from `param_groups` *before* creating the scheduler: each group's
    "lr" becomes the unscaled base lr (what the scheduler sees and sets, e.g. OneCycleLR's max_lr
    applies to every group alike), and every optimizer.step() runs with lr * lr_scale, restoring
    the base value afterwards. When resuming, call it on the new optimizer before
    load_state_dict (the saved groups hold the base lr)."""
    if getattr(optimizer, "_ssm_kernels_lr_scale", False):
        return optimizer
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", 1.0)
        group["lr"] = group["lr"] / group["lr_scale"]

    def scale(opt, args, kwargs):
        for group in opt.param_groups:
            group["lr"] = group["lr"] * group["lr_scale"]

    def unscale(opt, args, kwargs):
        for group in opt.param_groups:
            group["lr"] = group["lr"] / group["lr_scale"]
    optimizer.register_step_pre_hook(scale)
    optimizer.register_step_post_hook(unscale)
    optimizer._ssm_kernels_lr_scale = True
    return optimizer
