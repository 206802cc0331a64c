"""apply_to_mamba_ssm(): mamba_ssm's Mamba-1 modules on our kernels.

mamba_ssm's Mamba (modules/mamba_simple.py) calls the module-level names selective_scan_fn,
mamba_inner_fn, causal_conv1d_fn, causal_conv1d_update and selective_state_update; without its
CUDA build (or without causal-conv1d) they are missing or raise. We rebind them to ours, and wrap
Mamba.forward and Mamba.step so that they see the mixer's width multipliers. Its Triton norms
(layer_norm_fn / rms_norm_fn, as Block, MixerModel and RMSNorm call them) keep running on CUDA
tensors; CPU tensors get the same arithmetic in PyTorch, so a MambaLMHeadModel runs on the CPU.
"""

import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from ..modules.mamba import causal_conv1d, causal_conv1d_update, mamba_inner_fn
from ..ops.selective_scan import selective_scan_fn
from ..ops.state_update import selective_state_update
from .patching import Patch, current_multipliers, start, with_mixer_context
from .roles import MAMBA_SSM_MIXER


def _functions(backend: Optional[str]):
    def inner(*args, **kwargs):
        return mamba_inner_fn(*args, **kwargs, **current_multipliers(), backend=backend)

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                 **current_multipliers(), backend=backend)

    def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, **ignored):
        return selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, **current_multipliers(),
                                      backend=backend)

    def conv(x, weight, bias=None, activation=None, **ignored):
        return causal_conv1d(x, weight, bias, activation)

    return dict(selective_scan_fn=scan, mamba_inner_fn=inner, causal_conv1d_fn=conv,
                causal_conv1d_update=causal_conv1d_update, selective_state_update=state_update)


def _norm_off_cuda(original, rms_only: bool):
    """mamba_ssm's layer_norm_fn (rms_only: rms_norm_fn) for CUDA tensors; for others its arithmetic
    in PyTorch: (x + residual) normalized, residual kept in fp32 when residual_in_fp32."""
    def norm(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
             rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=rms_only, **rest):
        if x.is_cuda:
            extra = {} if rms_only else {"is_rms_norm": is_rms_norm}
            return original(x, weight, bias, residual, x1, weight1, bias1, eps=eps, dropout_p=dropout_p,
                            rowscale=rowscale, prenorm=prenorm, residual_in_fp32=residual_in_fp32, **extra, **rest)
        if x1 is not None or weight1 is not None or rowscale is not None or dropout_p > 0 or any(rest.values()):
            raise NotImplementedError("mamba_ssm's layer_norm_fn off CUDA: x1, weight1, rowscale, dropout and "
                                      "out buffers are not supported by ssm_kernels' CPU stand-in")
        acc = torch.promote_types(x.dtype, torch.float32)
        h = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
        residual_out = h if residual_in_fp32 else h.to(x.dtype if residual is None else residual.dtype)
        if is_rms_norm:
            normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
            normed = normed if bias is None else normed + bias.to(acc)
        else:
            normed = F.layer_norm(h, h.shape[-1:], weight.to(acc), None if bias is None else bias.to(acc), eps)
        out = normed.to(x.dtype)
        return (out, residual_out) if prenorm else out
    return norm


_NORM_USERS = (("mamba_ssm.ops.triton.layer_norm", "rms_norm_fn", True),
               ("mamba_ssm.ops.triton.layer_norm", "layer_norm_fn", False),
               ("mamba_ssm.modules.block", "layer_norm_fn", False),
               ("mamba_ssm.models.mixer_seq_simple", "layer_norm_fn", False))


def apply_to_mamba_ssm(backend: Optional[str] = None) -> Patch:
    """Patches mamba_ssm's Mamba-1 module in place (models built before or after the call): its
    forward (fast and reference paths) and decoding step run on our kernels, on any device, with
    no CUDA build. Idempotent; undo() restores mamba_ssm. Raises ImportError when mamba_ssm does
    not import."""
    patch, fresh = start("mamba_ssm", backend)
    if not fresh:
        return patch
    try:
        try:
            module = importlib.import_module(MAMBA_SSM_MIXER)
        except ImportError as e:
            raise ImportError(f"mamba_ssm: does not import ({e}); apply_to_mamba_ssm patches an importable "
                              "mamba_ssm") from e
        for name, fn in _functions(backend).items():
            patch.set(module, name, fn)
        mixer = module.Mamba
        patch.set(mixer, "forward", with_mixer_context(mixer.forward))
        patch.set(mixer, "step", with_mixer_context(mixer.step))
        patch.targets.append(MAMBA_SSM_MIXER)
        for module_name, name, rms_only in _NORM_USERS:
            try:
                user = importlib.import_module(module_name)
            except ImportError:
                continue
            if getattr(user, name, None) is not None:
                patch.set(user, name, _norm_off_cuda(getattr(user, name), rms_only))
    except BaseException:
        patch.undo()
        raise
    return patch
