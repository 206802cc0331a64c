"""One decoding step in PyTorch: the "torch" backend's selective_state_update (any dtype, any device)."""

import torch
import torch.nn.functional as F

from ..selective_scan.naive import discretize_dt


def state_update_torch(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, indices=None, out, config):
    """B, C as (batch, G, N) views, indices checked (or None); writes state (in place) and out."""
    acc = torch.float64 if torch.float64 in (state.dtype, x.dtype, A.dtype) else torch.float32
    batch, dim = x.shape
    indices = None if indices is None else indices.long()
    rows = state if indices is None else state.index_select(0, indices)
    dt = discretize_dt(dt.to(acc)[..., None], None if dt_bias is None else dt_bias.to(acc), config.delta_softplus,
                       config.dt_scale)[..., 0]  # one step of the scan's dt

    def per_channel(X):  # (batch, G, N) -> (batch, dim, N)
        return X.to(acc).repeat_interleave(dim // X.shape[1], dim=1)
    xa = x.to(acc)
    h = torch.exp(dt[..., None] * A.to(acc)) * rows.to(acc) + (dt * xa)[..., None] * (per_channel(B) * config.b_scale)
    if indices is None:
        state.copy_(h)
    else:
        state.index_copy_(0, indices, h.to(state.dtype))
    y = (h * (per_channel(C) * config.c_scale)).sum(-1)
    if D is not None:
        y = y + D.to(acc) * xa
    if z is not None:
        y = y * F.silu(z.to(acc))
    return out.copy_(y)
