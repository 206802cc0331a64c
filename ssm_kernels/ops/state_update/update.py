"""selective_state_update: one step of the selective scan for decoding, the state updated in place.

Same arithmetic as one step of selective_scan_fn (dt_scale before the bias and the softplus,
b_scale on B, c_scale on C), so decoding token by token continues a prefill exactly.
"""

from typing import Optional

import torch
from torch import Tensor

from ..selective_scan.backends import BACKENDS, resolve_backend
from ..selective_scan.checks import ALL_DTYPES, check_multipliers
from ..selective_scan.config import ScanConfig
from ..utils import new_buffer


def _check(name: str, t, shape: tuple, device, dtypes=ALL_DTYPES):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but x is on {device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}; expected one of "
                        + ", ".join(str(d).replace("torch.", "") for d in dtypes))


def _state_vector(name: str, X, batch: int, dim: int, d_state: int, device) -> Tensor:
    """B or C: (batch, N) or (batch, G, N) -> a (batch, G, N) view."""
    if not isinstance(X, Tensor) or X.dim() not in (2, 3):
        raise ValueError(f"{name}: expected (batch, N) or (batch, G, N), got "
                         f"{tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__}")
    X = X.unsqueeze(1) if X.dim() == 2 else X
    _check(name, X, (batch, X.shape[1], d_state), device)
    if X.shape[1] < 1 or dim % X.shape[1]:
        raise ValueError(f"{name}: dim={dim} is not divisible by the number of groups G={X.shape[1]}")
    return X


def _check_indices(indices, batch: int, cache_rows: int, device) -> Optional[Tensor]:
    if indices is None:
        if cache_rows != batch:
            raise ValueError(f"state: has {cache_rows} rows but x has batch {batch}; pass state_batch_indices "
                             "to update rows of a larger state cache")
        return None
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("state_batch_indices: expected an int32 or int64 tensor")
    _check("state_batch_indices", indices, (batch,), device, (torch.int32, torch.int64))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing and batch:  # a value check reads the indices back; skipped inside CUDA graph capture
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= cache_rows:
            raise ValueError(f"state_batch_indices: values must lie in [0, {cache_rows}), got [{lo}, {hi}]")
        if torch.unique(indices).numel() != batch:
            raise ValueError("state_batch_indices: a row of the state cache appears twice")
    return indices.contiguous()


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                           dt_scale=1.0, b_scale=1.0, c_scale=1.0, state_batch_indices=None, backend=None):
    """One decoding step, mamba_ssm's `selective_state_update` for Mamba-1 shapes.

        dt = dt_scale * dt + dt_bias (then softplus if dt_softplus)
        state = exp(dt * A) * state + dt * (b_scale * B) * x          (in place)
        out = sum_n (c_scale * C[n]) * state[n] + D * x;   out *= silu(z) when z is given

    Args:
        state: (batch, dim, N), updated in place; with state_batch_indices (cache_rows, dim, N), of
            which rows state_batch_indices[i] are read and written (continuous batching).
        x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, G, N) (channel d uses group
            d // (dim // G)); D, dt_bias: (dim,).
        dt_scale, b_scale, c_scale: the width multipliers, as in selective_scan_fn.
        state_batch_indices: (batch,) int32/int64, distinct rows of the state cache.
        backend: a scan backend (selective_scan_fn's choice and default); each registry entry names
            its decoding step ("cpp" and "ref" run the "torch" one: a step is a few vector ops).

    Returns out (batch, dim) in x's dtype.
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected (batch, dim), got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    device, (batch, dim) = x.device, x.shape
    backend = resolve_backend(backend, x)
    if not isinstance(state, Tensor) or state.dim() != 3:
        raise ValueError(f"state: expected (batch, dim, N), got "
                         f"{tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__}")
    d_state = state.shape[2]
    dtypes = BACKENDS[backend].dtypes
    _check("state", state, (state.shape[0], dim, d_state), device, dtypes)
    _check("x", x, (batch, dim), device, dtypes)
    _check("dt", dt, (batch, dim), device, dtypes)
    _check("A", A, (dim, d_state), device, dtypes)
    B = _state_vector("B", B, batch, dim, d_state, device)
    C = _state_vector("C", C, batch, dim, d_state, device)
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _check(name, t, (dim,), device, dtypes)
    if z is not None:
        _check("z", z, (batch, dim), device, dtypes)
    indices = _check_indices(state_batch_indices, batch, state.shape[0], device)
    config = ScanConfig(groups=B.shape[1], delta_softplus=bool(dt_softplus), backend=backend,
                        **check_multipliers(dt_scale, b_scale, c_scale))
    out = new_buffer(batch, dim, dtype=x.dtype, device=device)
    return BACKENDS[backend].state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, indices=indices, out=out,
                                          config=config)
