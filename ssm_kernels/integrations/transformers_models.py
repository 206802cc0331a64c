"""apply_to_transformers(): transformers' Mamba and FalconMamba on our kernels (tested with
transformers 5.24 and 5.25, the range of the `transformers` extra).

How our functions reach transformers. Each Mamba modeling module calls module-level kernel
functions, which transformers binds with `use_kernel_func_from_hub_with_fallback` (mamba_ssm /
causal-conv1d where they import and the input is on CUDA, its own PyTorch code otherwise). We
rebind those names in each modeling module and wrap the mixer's forward; the classes stay
transformers' own. The hook points a version has:

    name                              5.24                 5.25
    mamba_selective_scan              mixer.forward        mamba_scan_forward
    mamba_selective_state_update      mixer.forward        mamba_scan_forward
    causal_conv1d_fn / _update        mixer.forward        causal_conv1d_forward
    mamba_inner_fn (fused training)   Mamba, FalconMamba   Mamba only

The first four are required (a mixer without them cannot be served and the call refuses, before
anything is patched); mamba_inner_fn is patched where it exists.

Why not transformers' hub-kernel mapping. Its supported way to supply these functions is the
`kernels` package: a mapping from a function's name to a layer repository, applied by
`kernelize(model)`. It does not give the same coverage: it swaps functions per model instance
after `kernelize`, not for every model built before or after; it loads layers from a kernel
repository (the Hub, or a local build tree laid out per torch version and build variant), not
from an installed Python package; the functions it swaps receive no mixer, so the width
multipliers would still need the per-mixer context below; and transformers calls it with
`KernelizeFallback.ALL`, which silently keeps transformers' own code when a layer fails to load.
(`lazy_load_kernel` / `_KERNEL_MODULE_MAPPING` serve whole hub kernels such as fp8 GEMMs;
the Mamba-1 modules do not consult them.)

The wrapped mixer forward sets, for the functions it calls: the mixer's width multipliers;
whether the batch has padded positions; the recurrent state its cache already holds, which our
scan takes as `initial_state`, so that a prefill continuing from a cache is exact (transformers'
own chunked scan starts from zero there, as its code says); and a check that the scan ran on our
functions, so that a transformers whose mixer bypasses them (a later release, or `kernelize()`
with a hub mapping) raises instead of silently dropping the multipliers.

FalconMamba: transformers' own path normalizes dt before dt_proj (over dt_rank), while mamba_ssm's
fused mamba_inner_fn, which 5.24 calls in training when mamba_ssm is installed, normalizes delta
after dt_proj (over d_inner): two different functions. Our stand-in declines that call, so that
training, prefill and generation compute one function, the one its eval path computes (5.25
removed the fused call for this reason).

Mamba: transformers' fused training call takes no attention mask. With padding in the mask our
stand-in declines the fused call, so that transformers' own path zeroes the padded positions, as
in eval mode.
"""

import contextvars
import functools
import importlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..modules.mamba import causal_conv1d, causal_conv1d_update, mamba_inner_fn
from ..ops.selective_scan import selective_scan_fn
from ..ops.state_update import selective_state_update
from .patching import Patch, current_multipliers, start, with_mixer_context
from .roles import HF_FALCON, HF_MAMBA

_MIXERS = {HF_MAMBA: "MambaMixer", HF_FALCON: "FalconMambaMixer"}
REQUIRED_HOOKS = ("mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn", "causal_conv1d_update")
OPTIONAL_HOOKS = ("mamba_inner_fn",)
TESTED_VERSIONS = "5.24 and 5.25"


@dataclass
class _MixerCall:
    """What one mixer forward tells the functions it calls."""
    padded: bool
    initial_state: Optional[torch.Tensor]
    served: bool = False  # set by our scan, decoding step and fused call

    def take_initial_state(self, u: torch.Tensor) -> Optional[torch.Tensor]:
        """The cache's state, once (a second scan in the same forward starts where the first ended,
        which transformers passes on itself), in the dtype our scan accumulates in."""
        state, self.initial_state = self.initial_state, None
        if state is None:
            return None
        return state.to(device=u.device, dtype=torch.float64 if u.dtype == torch.float64 else torch.float32)


_CALL: contextvars.ContextVar = contextvars.ContextVar("ssm_kernels_transformers_mixer_call", default=None)


def _served() -> Optional[_MixerCall]:
    call = _CALL.get()
    if call is not None:
        call.served = True
    return call


def _argument(name: str, position: int, args: tuple, kwargs: dict):
    """forward(hidden_states, cache=None, attention_mask=None, **kwargs) in 5.24 and 5.25, where
    `cache` was called `cache_params` (still accepted until 5.40); `position` counts after
    hidden_states."""
    if name in kwargs:
        return kwargs[name]
    if name == "cache" and "cache_params" in kwargs:
        return kwargs["cache_params"]
    return args[position] if len(args) > position else None


def _serve_mixer(forward):
    """The mixer's forward, with the call context its functions read (see the module docstring)."""
    @functools.wraps(forward)
    def wrapped(self, hidden_states, *args, **kwargs):
        mask = _argument("attention_mask", 1, args, kwargs)
        cache = _argument("cache", 0, args, kwargs)
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        call = _MixerCall(padded=mask is not None and not bool(mask.all()), initial_state=state)
        token = _CALL.set(call)
        try:
            out = forward(self, hidden_states, *args, **kwargs)
        finally:
            _CALL.reset(token)
        if not call.served and hidden_states.shape[1] > 0:
            raise RuntimeError(f"{type(self).__name__}: its forward ran a selective scan that is not ssm_kernels' "
                               "although apply_to_transformers() is active (a transformers version whose mixer "
                               f"bypasses the functions we patch, or a model passed to kernelize()); tested with "
                               f"transformers {TESTED_VERSIONS}")
        return out
    return wrapped


def _functions(backend: Optional[str], fused: bool):
    def inner(*args, **kwargs):
        call = _CALL.get()
        if call is not None and call.padded:
            return None  # transformers' own path applies the mask
        _served()
        # transformers passes mamba_ssm's leading arguments positionally and the rest by keyword
        return mamba_inner_fn(*args, **kwargs, **current_multipliers(), backend=backend)

    def decline(*args, **kwargs):
        return None  # transformers then takes its own path, on the functions below

    def scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False, **ignored):  # use_mambapy, use_associative_scan: transformers' own paths
        call = _served()
        initial_state = call.take_initial_state(hidden_states) if call is not None else None
        return selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                 **current_multipliers(), initial_state=initial_state, backend=backend)

    def state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **ignored):
        _served()
        return selective_state_update(state, hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                      **current_multipliers(), backend=backend)

    def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
        return causal_conv1d(hidden_states, weight, bias, activation, cu_seqlens=kwargs.get("cu_seqlens"))

    return dict(mamba_inner_fn=inner if fused else decline, mamba_selective_scan=scan,
                mamba_selective_state_update=state_update, causal_conv1d_fn=conv,
                causal_conv1d_update=causal_conv1d_update)


def _modeling_modules():
    """(module, mixer class name) for each Mamba modeling module this transformers has; refuses,
    naming what is missing, a module whose mixer cannot be served."""
    found = []
    for module_name, mixer_name in _MIXERS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # a transformers without this model
        missing = [name for name in REQUIRED_HOOKS + (mixer_name,) if not hasattr(module, name)]
        if missing:
            import transformers
            raise RuntimeError(f"{module_name}: has no {', '.join(missing)}, so ssm_kernels cannot serve its mixer "
                               f"(transformers {transformers.__version__}; tested with {TESTED_VERSIONS}); "
                               "nothing was patched")
        found.append((module, mixer_name))
    if not found:
        raise ImportError("transformers: not installed, or without Mamba models (pip install transformers)")
    return found


def apply_to_transformers(backend: Optional[str] = None) -> Patch:
    """Patches transformers' Mamba and FalconMamba modeling modules in place, for models built
    before or after the call: training, prefill (also one that continues from a cache) and
    generation run on our selective scan, selective_state_update and causal conv, on any device
    (backend: as selective_scan_fn's; None picks per device). Idempotent; returns the Patch, whose
    undo() restores transformers. Needed for width multipliers (ssm_kernels.mup) on these models."""
    modules = _modeling_modules()  # before anything is patched: a refusal leaves transformers as it was
    patch, fresh = start("transformers", backend)
    if not fresh:
        return patch
    try:
        for module, mixer_name in modules:
            functions = _functions(backend, fused=module.__name__ == HF_MAMBA)
            for name in REQUIRED_HOOKS + tuple(name for name in OPTIONAL_HOOKS if hasattr(module, name)):
                patch.set(module, name, functions[name])
            mixer = getattr(module, mixer_name)
            patch.set(mixer, "forward", with_mixer_context(_serve_mixer(mixer.forward)))
            patch.targets.append(module.__name__)
    except BaseException:
        patch.undo()
        raise
    return patch
