"""apply_to_transformers(): transformers' Mamba and FalconMamba on our kernels.

transformers resolves its kernels per modeling module: MambaMixer.forward calls the module-level
names mamba_inner_fn, mamba_selective_scan, mamba_selective_state_update, causal_conv1d_fn and
causal_conv1d_update, which its hub-kernel decorators bind to mamba_ssm / causal-conv1d or to
its own PyTorch code. We rebind those names in each modeling module (and wrap the mixer's forward,
so that they see that mixer's width multipliers); the classes stay transformers' own.

FalconMamba: transformers' own path normalizes dt before dt_proj (over dt_rank), while mamba_ssm's
fused mamba_inner_fn, which it calls in training when mamba_ssm is installed, normalizes delta
after dt_proj (over d_inner): two different functions. We keep transformers' own path (our
mamba_inner_fn declines, and its scan, conv and decoding step are ours), so that training,
prefill and generation compute one function, the one its eval path computes.

Mamba: transformers' fused training call (mamba_inner_fn, the one mamba_ssm provides) takes no
attention mask. With padding in the mask our stand-in declines the fused call, so that
transformers' own path zeroes the padded positions, as in eval mode.
"""

import contextvars
import functools
import importlib
from typing import Optional

from ..modules.mamba import causal_conv1d, causal_conv1d_update, mamba_inner_fn
from ..ops.selective_scan import selective_scan_fn
from ..ops.state_update import selective_state_update
from .patching import Patch, current_multipliers, start, with_mixer_context
from .roles import HF_FALCON, HF_MAMBA

_MIXERS = {HF_MAMBA: "MambaMixer", HF_FALCON: "FalconMambaMixer"}
_PADDED = contextvars.ContextVar("ssm_kernels_padded_batch", default=False)


def _with_mask_context(forward):
    """The mixer's forward, telling the fused stand-in whether its batch has padded positions."""
    @functools.wraps(forward)
    def wrapped(self, hidden_states, *args, **kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        token = _PADDED.set(mask is not None and not bool(mask.all()))
        try:
            return forward(self, hidden_states, *args, **kwargs)
        finally:
            _PADDED.reset(token)
    return wrapped


def _functions(backend: Optional[str], fused: bool):
    def inner(*args, **kwargs):
        if _PADDED.get():
            return None  # transformers' own path applies the mask
        # transformers passes mamba_ssm's leading arguments positionally and the rest by keyword
        return mamba_inner_fn(*args, **kwargs, **current_multipliers(), backend=backend)

    def decline(*args, **kwargs):
        return None  # transformers then takes its own path, on the functions below

    def scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False, **ignored):  # use_mambapy, use_associative_scan: transformers' own paths
        return selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                 **current_multipliers(), backend=backend)

    def state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **ignored):
        return selective_state_update(state, hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                      **current_multipliers(), backend=backend)

    def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
        return causal_conv1d(hidden_states, weight, bias, activation, cu_seqlens=kwargs.get("cu_seqlens"))

    return dict(mamba_inner_fn=inner if fused else decline, mamba_selective_scan=scan,
                mamba_selective_state_update=state_update, causal_conv1d_fn=conv,
                causal_conv1d_update=causal_conv1d_update)


def apply_to_transformers(backend: Optional[str] = None) -> Patch:
    """Patches transformers' Mamba and FalconMamba modeling modules in place, for models built
    before or after the call: training, prefill and generation run on our selective scan,
    selective_state_update and causal conv, on any device (backend: as selective_scan_fn's;
    None picks per device). Idempotent; returns the Patch, whose undo() restores transformers.
    Needed for width multipliers (ssm_kernels.mup) on these models."""
    patch, fresh = start("transformers", backend)
    if not fresh:
        return patch
    try:
        for module_name, mixer_name in _MIXERS.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue  # a transformers without this model
            for name, fn in _functions(backend, fused=module_name == HF_MAMBA).items():
                if not hasattr(module, name):
                    raise RuntimeError(f"{module_name}: has no {name}; this transformers version is not supported "
                                       "by ssm_kernels.integrations (tested with 5.x)")
                patch.set(module, name, fn)
            mixer = getattr(module, mixer_name)
            patch.set(mixer, "forward", with_mixer_context(_with_mask_context(mixer.forward)))
            patch.targets.append(module_name)
        if not patch.targets:
            raise ImportError("transformers: not installed, or without Mamba models (pip install transformers)")
    except BaseException:
        patch.undo()
        raise
    return patch
