"""Applying a preset to a model: roles, initialization, forward multipliers, optimizer param groups."""

import functools
import numbers
import types
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from ..modules.declarations import declared_modules, foreign_mixer_names, mamba_init_, parameter_roles
from .presets import DECAYED, OPTIMIZERS, PRESETS, ROLES, TIED, Rule, check_table, share_learning_rate


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
        for name, value in (("base_d_inner", base_d_inner), ("base_d_state", base_d_state)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name}: expected a positive int (the base model's width), got {value!r}")
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
        """(d_inner, d_state) of the model's mixers, from their declarations."""
        shapes = {(d.mixer.d_inner, d.mixer.d_state) for _, _, d in declared_modules(model) if d.mixer is not None}
        if not shapes:
            foreign = ", ".join(foreign_mixer_names())
            raise ValueError(f"model: has no Mamba layer (ssm_kernels' Mamba, or one of {foreign})")
        if len(shapes) > 1:
            raise ValueError(f"model: Mamba layers of different shapes {sorted(shapes)}")
        return shapes.pop()

    # -- initialization ----------------------------------------------------------------------
    def init_(self, model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
        """Draws every parameter afresh: mamba_ssm's init at the model's shape (SP), each draw's
        spread multiplied by the preset's init factor over SP's, so that SP is mamba_ssm's init
        at every width and every preset is SP at the base shape. Idempotent: the result does not
        depend on earlier values, and the same generator state gives the same tensors. A tied
        readout follows the embedding's rule (presets.TIED)."""
        parameter_roles(model)  # every parameter has a role, or a clear error
        d_inner, d_state = self._shape(model)
        sharded = [name for name, p in model.named_parameters() if _is_dtensor(p)]
        if sharded:
            raise ValueError(f"model: parameters {sharded[:3]}... are sharded (DTensor); draw them before "
                             "sharding: parameterize_ (or init_) first, then fully_shard")
        sp = Parameterization("sp", self.optimizer, self.base_d_inner, self.base_d_state)

        def scale(role):
            return self.factors(role, d_inner, d_state)["init"] / sp.factors(role, d_inner, d_state)["init"]
        return mamba_init_(model, scale, generator)

    # -- forward multipliers -----------------------------------------------------------------
    def multipliers(self, d_inner: int, d_state: int, tied: bool = False) -> Dict[str, float]:
        """The forward multipliers; tied: the readout is the embedding's Parameter (presets.TIED)."""
        m = {role: self.factors(role, d_inner, d_state)["mult"] for role in ROLES}
        readout = self.factor(TIED[self.preset], d_inner, d_state) if tied else m["readout"]
        return dict(dt_scale=m["x_proj_dt"] * m["dt_proj_weight"], b_scale=m["x_proj_B"], c_scale=m["x_proj_C"],
                    embedding=m["embedding"], readout=readout)

    def apply_multipliers(self, model: nn.Module) -> nn.Module:
        """Sets every declared multiplier slot: the kernel's dt/b/c scales on each mixer, the
        embedding and readout multipliers on the language model. They are saved in its state dict
        (when not 1) and restored by load_state_dict."""
        d_inner, d_state = self._shape(model)
        tied = any(d.tied_readout for _, _, d in declared_modules(model))
        m = self.multipliers(d_inner, d_state, tied)
        for _, _, d in declared_modules(model):
            for name, (obj, attr) in d.slots.items():
                setattr(obj, attr, m[name])
        return model

    def parameterize_(self, model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
        """init_ then apply_multipliers."""
        return self.apply_multipliers(self.init_(model, generator))

    # -- optimizer ---------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> List[dict]:
        """Plain param groups, one per (lr_scale, weight_decay):
        {"params": [...], "lr": lr * lr_scale, "lr_scale": lr_scale, "weight_decay": ..., "roles": [...]}."""
        d_inner, d_state = self._shape(model)
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
    the base value afterwards, also when the step raises. A group added later with add_param_group
    follows the same convention (its "lr" is lr * lr_scale, as param_groups gives it; no lr_scale
    means 1). When resuming, call it on the new optimizer before load_state_dict (the saved groups
    hold the base lr)."""
    if getattr(optimizer, "_ssm_kernels_lr_scale", False):
        return optimizer
    for group in optimizer.param_groups:
        _to_base_lr(group)
    step, add_param_group = optimizer.step, optimizer.add_param_group

    def scaled_step(self, *args, **kwargs):
        # A bound method, as LR schedulers expect (they wrap optimizer.step.__func__).
        groups = list(self.param_groups)
        base = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = group["lr"] * group["lr_scale"]
        try:
            return step(*args, **kwargs)
        finally:
            for group, lr in zip(groups, base):
                group["lr"] = lr

    def add_group(self, param_group):
        _to_base_lr(param_group)
        return add_param_group(param_group)

    optimizer.step = types.MethodType(functools.wraps(step.__func__)(scaled_step), optimizer)
    optimizer.add_param_group = types.MethodType(add_group, optimizer)
    optimizer._ssm_kernels_lr_scale = True
    return optimizer


def _to_base_lr(group: dict) -> None:
    group.setdefault("lr_scale", 1.0)
    if "lr" in group:
        group["lr"] = group["lr"] / group["lr_scale"]
