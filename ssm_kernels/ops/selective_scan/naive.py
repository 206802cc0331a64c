"""Plain sequential PyTorch selective scan: the ground truth for every other backend.

One step at a time, differentiable by autograd, any float dtype (float64 included).
"""

import torch
import torch.nn.functional as F

from .checks import check_inputs, check_multipliers


def expand_state_matrix(X: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C from check_inputs ((dim, N) or (batch, G, N, L)) as a per-channel tensor that
    broadcasts against (batch, dim, N, L)."""
    if X.dim() == 2:
        return X[None, :, :, None]
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def discretize_dt(delta, delta_bias, delta_softplus: bool, dt_scale: float):
    """dt = softplus(dt_scale * delta + delta_bias) (softplus optional, threshold 20 as in mamba_ssm)."""
    dt = delta * dt_scale
    if delta_bias is not None:
        dt = dt + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt, threshold=20.0)
    return dt


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, dt_scale=1.0, b_scale=1.0, c_scale=1.0,
                       initial_state=None, backend=None):
    """Sequential reference with the same signature as `selective_scan_fn` (`backend` is ignored).

    Computes in float64 when any input is float64, otherwise in float32; returns `out` in u's
    dtype and `last_state` (batch, dim, N) in the compute dtype.
    """
    B, C, _ = check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt_scale, b_scale, c_scale = check_multipliers(dt_scale, b_scale, c_scale).values()
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    batch, dim, seqlen = u.shape

    u_f, delta_f, A_f = u.to(acc), delta.to(acc), A.to(acc)
    dt = discretize_dt(delta_f, None if delta_bias is None else delta_bias.to(acc), delta_softplus, dt_scale)
    Bx = expand_state_matrix(B.to(acc), dim) * b_scale  # broadcasts to (batch, dim, N, L)
    Cx = expand_state_matrix(C.to(acc), dim) * c_scale
    h = (initial_state.to(acc) if initial_state is not None
         else u_f.new_zeros(batch, dim, A.shape[1]))
    ys = []
    for t in range(seqlen):
        dt_t = dt[:, :, t, None]
        h = torch.exp(dt_t * A_f) * h + dt_t * Bx[..., min(t, Bx.shape[-1] - 1)] * u_f[:, :, t, None]
        ys.append((h * Cx[..., min(t, Cx.shape[-1] - 1)]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(acc)[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out
