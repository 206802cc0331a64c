"""Chunked, vectorized selective scan in plain PyTorch: the "torch" backend.

The same algorithm as the Triton kernels in chunk.py, written with tensor ops so it runs on
any device and doubles as a readable model of the kernels:

- the sequence is cut into chunks of `chunk_size` steps; within a chunk the recurrence
  h_t = a_t * h_{t-1} + x_t (a_t = exp(dt_t * A), x_t = dt_t * B_t * u_t) is a log-step
  (Hillis-Steele) scan along time, vectorized over batch, channels and states;
- the state entering each chunk is saved, (batch, dim, n_chunks, N), and nothing larger;
- the backward walks the chunks in reverse, recomputes the chunk's states from the saved
  one and runs the adjoint recurrence g_t = a_{t+1} * g_{t+1} + dL/dh_t as a reverse scan.

Tensors are handled as (batch, G, channels per group, [N,] T) so grouped B and C broadcast
over the channels of their group without being copied per channel.
"""

import torch

from ..utils import new_buffer

CHUNK_SIZE = 64


def linear_scan(a: torch.Tensor, x: torch.Tensor, reverse: bool = False):
    """Inclusive scan of h_t = a_t * h_{t-1} + x_t along the last dim, from h = 0.

    With reverse=True, the suffix recurrence h_t = a_t * h_{t+1} + x_t instead.
    Returns h. Only multiplies decays, never divides, so it is as stable as the sequential
    loop. The decay products stop at the largest float: a growing scan (a > 1) would otherwise
    reach inf, and inf * (a zero state) is NaN where the sequential loop gives a number.
    """
    k, T = 1, a.shape[-1]
    big = torch.finfo(a.dtype).max
    while k < T:
        if reverse:
            x = torch.cat([x[..., :-k] + a[..., :-k] * x[..., k:], x[..., -k:]], dim=-1)
            a = torch.cat([(a[..., :-k] * a[..., k:]).clamp_(max=big), a[..., -k:]], dim=-1)
        else:
            x = torch.cat([x[..., :k], x[..., k:] + a[..., k:] * x[..., :-k]], dim=-1)
            a = torch.cat([a[..., :k], (a[..., k:] * a[..., :-k]).clamp_(max=big)], dim=-1)
        k *= 2
    return x


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class _Layout:
    """Views of the inputs in (batch, G, channels per group, ...) form, in the compute dtype."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, groups, acc):
        batch, dim, seqlen = u.shape
        self.batch, self.dim, self.seqlen, self.groups = batch, dim, seqlen, groups
        self.d_state = A.shape[1]
        grouped = (batch, groups, dim // groups)
        self.u = u.reshape(*grouped, seqlen)
        self.delta = delta.reshape(*grouped, seqlen)
        self.z = None if z is None else z.reshape(*grouped, seqlen)
        self.A = A.to(acc).reshape(1, *grouped[1:], self.d_state, 1)
        self.D = None if D is None else D.to(acc).reshape(1, *grouped[1:], 1)
        self.bias = None if delta_bias is None else delta_bias.to(acc).reshape(1, *grouped[1:], 1)
        self.B_fixed, self.C_fixed = B.dim() == 2, C.dim() == 2
        self.B, self.C = self._state_matrix(B, acc), self._state_matrix(C, acc)
        self.acc = acc

    def _state_matrix(self, X, acc):
        if X.dim() == 2:  # fixed (dim, N) -> (1, G, dpg, N, 1)
            return X.to(acc).reshape(1, self.groups, self.dim // self.groups, self.d_state, 1)
        return X.unsqueeze(2)  # (batch, G, 1, N, L); sliced per chunk, then cast

    def chunk(self, X, t0, t1):
        return X[..., t0:t1].to(self.acc)

    def state_matrix_chunk(self, X, fixed, t0, t1):
        return X if fixed else X[..., t0:t1].to(self.acc)

    def dt(self, delta_c, softplus: bool, dt_scale: float):
        """Returns (dt, d dt / d pre-activation) for one chunk."""
        pre = delta_c * dt_scale
        if self.bias is not None:
            pre = pre + self.bias
        if not softplus:
            return pre, None
        dt = torch.where(pre <= 20.0, torch.log1p(torch.exp(torch.clamp(pre, max=20.0))), pre)
        return dt, torch.where(pre <= 20.0, torch.sigmoid(pre), torch.ones_like(pre))

    def chunk_scan(self, h_in, t0, t1, config):
        """Steps t0..t1-1 of the recurrence from the state h_in (batch, G, dpg, N) entering them;
        the forward runs it, the backward recomputes it. Returns u, dt, d dt/d(pre-activation),
        B and C times their multipliers, a and the states after each step (..., N, T)."""
        u_c = self.chunk(self.u, t0, t1)
        dt, dsoftplus = self.dt(self.chunk(self.delta, t0, t1), config.delta_softplus, config.dt_scale)
        Bs = self.state_matrix_chunk(self.B, self.B_fixed, t0, t1) * config.b_scale
        Cs = self.state_matrix_chunk(self.C, self.C_fixed, t0, t1) * config.c_scale
        a = torch.exp(dt.unsqueeze(-2) * self.A)
        x = (dt * u_c).unsqueeze(-2) * Bs
        # h_in enters through the first step (h_0 = a_0 h_in + x_0), never times a chunk-long product
        x_in = torch.cat([x[..., :1] + a[..., :1] * h_in.unsqueeze(-1), x[..., 1:]], dim=-1)
        return u_c, dt, dsoftplus, Bs, Cs, a, linear_scan(a, x_in)


def selective_scan_fwd_torch(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, initial_state=None, config,
                             chunk_size: int = CHUNK_SIZE):
    """Forward. B, C as returned by check_inputs; config a ScanConfig. Returns (out, last_state,
    chunk_states)."""
    if config.cu_seqlens is not None:
        return _packed_fwd(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                           config=config, chunk_size=chunk_size)
    groups = config.groups
    acc = compute_dtype(u, A, B, C, initial_state)
    lay = _Layout(u, delta, A, B, C, D, z, delta_bias, groups, acc)
    batch, dim, seqlen, N = lay.batch, lay.dim, lay.seqlen, lay.d_state
    n_chunks = -(-seqlen // chunk_size)
    states = new_buffer(batch, dim, n_chunks, N, dtype=acc, device=u.device)
    out = new_buffer(batch, dim, seqlen, dtype=u.dtype, device=u.device)
    out_g = out.view(batch, groups, dim // groups, seqlen)
    h = (initial_state.to(acc).reshape(batch, groups, dim // groups, N).clone() if initial_state is not None
         else u.new_zeros(batch, groups, dim // groups, N, dtype=acc))
    for c in range(n_chunks):
        t0, t1 = c * chunk_size, min((c + 1) * chunk_size, seqlen)
        states[:, :, c] = h.reshape(batch, dim, N)
        u_c, _, _, _, Cs, _, hs = lay.chunk_scan(h, t0, t1, config)
        y = (hs * Cs).sum(-2)
        if lay.D is not None:
            y = y + lay.D * u_c
        if lay.z is not None:
            y = y * torch.nn.functional.silu(lay.chunk(lay.z, t0, t1))
        out_g[..., t0:t1] = y.to(out.dtype)
        h = hs[..., -1]
    last_state = new_buffer(batch, dim, N, dtype=acc, device=u.device)
    last_state.copy_(h.reshape(batch, dim, N))
    return out, last_state, states


def selective_scan_bwd_torch(dout, dlast_state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                             chunk_states, config, chunk_size: int = CHUNK_SIZE):
    """Backward from the saved chunk states. Always deterministic: no atomics, fixed-order sums
    (config.deterministic changes nothing here).

    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); dD, dz and
    ddelta_bias are None when D, z or delta_bias is None. dB and dC have the shapes of B and C
    as given here ((dim, N) or (batch, G, N, L)).
    """
    if config.cu_seqlens is not None:
        return _packed_bwd(dout, dlast_state, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                           chunk_states=chunk_states, config=config, chunk_size=chunk_size)
    groups, b_scale, c_scale = config.groups, config.b_scale, config.c_scale
    acc = chunk_states.dtype
    lay = _Layout(u, delta, A, B, C, D, z, delta_bias, groups, acc)
    batch, dim, seqlen, N = lay.batch, lay.dim, lay.seqlen, lay.d_state
    dpg = dim // groups
    n_chunks = chunk_states.shape[2]
    dout = dout.reshape(batch, groups, dpg, seqlen)
    du = new_buffer(batch, groups, dpg, seqlen, dtype=u.dtype, device=u.device)
    ddelta = new_buffer(batch, groups, dpg, seqlen, dtype=delta.dtype, device=u.device)
    dz = None if z is None else new_buffer(batch, groups, dpg, seqlen, dtype=z.dtype, device=u.device)
    dA = torch.zeros(groups, dpg, N, dtype=acc, device=u.device)
    dD = None if D is None else torch.zeros(groups, dpg, dtype=acc, device=u.device)
    dbias = None if delta_bias is None else torch.zeros(groups, dpg, dtype=acc, device=u.device)
    dB = (torch.zeros(groups, dpg, N, dtype=acc, device=u.device) if lay.B_fixed
          else new_buffer(batch, groups, N, seqlen, dtype=acc, device=u.device))
    dC = (torch.zeros(groups, dpg, N, dtype=acc, device=u.device) if lay.C_fixed
          else new_buffer(batch, groups, N, seqlen, dtype=acc, device=u.device))
    # dL/dh at the chunk's last step coming from later steps (and from last_state).
    dh = (dlast_state.to(acc).reshape(batch, groups, dpg, N) if dlast_state is not None
          else torch.zeros(batch, groups, dpg, N, dtype=acc, device=u.device))

    def reduce_state_grad(grad, fixed, acc_fixed, t0, t1):
        # grad: (batch, G, dpg, N, T); fixed B/C sum over batch and time, variable over channels.
        if fixed:
            acc_fixed += grad.sum(dim=(0, -1))
        else:
            acc_fixed[..., t0:t1] = grad.sum(2)

    for c in reversed(range(n_chunks)):
        t0, t1 = c * chunk_size, min((c + 1) * chunk_size, seqlen)
        h_in = chunk_states[:, :, c].reshape(batch, groups, dpg, N)
        u_c, dt, dsoftplus, Bs, Cs, a, hs = lay.chunk_scan(h_in, t0, t1, config)
        # Gating: out = y * silu(z).
        dout_c = dout[..., t0:t1].to(acc)
        if lay.z is not None:
            z_c = lay.chunk(lay.z, t0, t1)
            y = (hs * Cs).sum(-2)
            if lay.D is not None:
                y = y + lay.D * u_c
            sig = torch.sigmoid(z_c)
            dz[..., t0:t1] = (dout_c * y * sig * (1 + z_c * (1 - sig))).to(dz.dtype)
            dy = dout_c * z_c * sig
        else:
            dy = dout_c
        # Adjoint recurrence g_t = a_{t+1} g_{t+1} + Cs_t dy_t, with dh entering at the last step.
        alpha = torch.cat([a[..., 1:], torch.ones_like(a[..., :1])], dim=-1)
        v = Cs * dy.unsqueeze(-2)
        g = linear_scan(alpha, torch.cat([v[..., :-1], v[..., -1:] + dh.unsqueeze(-1)], dim=-1), reverse=True)
        reduce_state_grad(g * (dt * u_c).unsqueeze(-2) * b_scale, lay.B_fixed, dB, t0, t1)
        reduce_state_grad(hs * dy.unsqueeze(-2) * c_scale, lay.C_fixed, dC, t0, t1)
        du_c = (g * Bs).sum(-2) * dt
        if lay.D is not None:
            du_c = du_c + lay.D * dy
            dD += (dy * u_c).sum(dim=(0, -1))
        du[..., t0:t1] = du_c.to(du.dtype)
        # a_t h_{t-1} as a product: hs - x would cancel under strong decay (dA off by 100%)
        decayed = a * torch.cat([h_in.unsqueeze(-1), hs[..., :-1]], dim=-1)
        d_dt = (g * (Bs * u_c.unsqueeze(-2) + decayed * lay.A)).sum(-2)
        dA += (g * decayed * dt.unsqueeze(-2)).sum(dim=(0, -1))
        d_pre = d_dt if dsoftplus is None else d_dt * dsoftplus
        ddelta[..., t0:t1] = (d_pre * config.dt_scale).to(ddelta.dtype)
        if dbias is not None:
            dbias += d_pre.sum(dim=(0, -1))
        dh = g[..., 0] * a[..., 0]  # dL/dh entering this chunk

    def shape_state_grad(grad, fixed, X):
        return (grad.view(dim, N) if fixed else grad).to(X.dtype)

    return (du.view(batch, dim, seqlen), ddelta.view(batch, dim, seqlen), dA.view(dim, N).to(A.dtype),
            shape_state_grad(dB, lay.B_fixed, B), shape_state_grad(dC, lay.C_fixed, C),
            None if D is None else dD.view(dim).to(D.dtype),
            None if z is None else dz.view(batch, dim, seqlen),
            None if delta_bias is None else dbias.view(dim).to(delta_bias.dtype),
            dh.reshape(batch, dim, N))


# -- packed variable-length sequences (cu_seqlens) ----------------------------------------------
# Each sequence runs as a batch of one on its slice of the packed (1, dim, L) tensors. Its saved
# states start at slot start // chunk_size + s of the row, the layout the Triton kernels use (a
# size that does not depend on the lengths: cdiv(L, chunk_size) + num_seqs slots).

def _sequences(cu_seqlens, chunk_size):
    bounds = cu_seqlens.tolist()
    return [(s, a, b, a // chunk_size + s, -(-(b - a) // chunk_size)) for s, (a, b) in
            enumerate(zip(bounds[:-1], bounds[1:]))]


def _slice(t, a, b):
    """A sequence's part of a packed tensor along time; fixed B/C and per-channel tensors as they are."""
    return t if t is None or t.dim() < 3 else t[..., a:b]


def _packed_fwd(u, delta, A, B, C, *, D, z, delta_bias, initial_state, config, chunk_size):
    one = config.replace(cu_seqlens=None)  # each sequence runs as a batch of one
    acc = compute_dtype(u, A, B, C, initial_state)
    _, dim, seqlen = u.shape
    N = A.shape[1]
    seqs = _sequences(config.cu_seqlens, chunk_size)
    out = new_buffer(1, dim, seqlen, dtype=u.dtype, device=u.device)
    last_state = new_buffer(len(seqs), dim, N, dtype=acc, device=u.device)
    # zeros: the slots between sequences are never written, and the op returns every slot
    states = torch.zeros(1, dim, -(-seqlen // chunk_size) + len(seqs), N, dtype=acc, device=u.device)
    for s, a, b, slot, n in seqs:
        h0 = None if initial_state is None else initial_state[s:s + 1]
        if a == b:
            last_state[s] = 0.0 if h0 is None else h0[0]
            continue
        out_s, last_s, states_s = selective_scan_fwd_torch(
            *(_slice(t, a, b) for t in (u, delta)), A, *(_slice(t, a, b) for t in (B, C)), D=D, z=_slice(z, a, b),
            delta_bias=delta_bias, initial_state=h0, config=one, chunk_size=chunk_size)
        out[..., a:b] = out_s
        last_state[s] = last_s[0]
        states[:, :, slot:slot + n] = states_s
    return out, last_state, states


def _packed_bwd(dout, dlast_state, u, delta, A, B, C, *, D, z, delta_bias, chunk_states, config, chunk_size):
    one = config.replace(cu_seqlens=None)
    seqs = _sequences(config.cu_seqlens, chunk_size)
    acc = chunk_states.dtype
    _, dim, seqlen = u.shape
    N = A.shape[1]
    du = new_buffer(1, dim, seqlen, dtype=u.dtype, device=u.device)
    ddelta = new_buffer(1, dim, seqlen, dtype=delta.dtype, device=u.device)
    dz = None if z is None else new_buffer(1, dim, seqlen, dtype=z.dtype, device=u.device)
    dB, dC = (torch.zeros(X.shape, dtype=acc, device=u.device) for X in (B, C))
    dA = torch.zeros(dim, N, dtype=acc, device=u.device)
    dD = None if D is None else torch.zeros(dim, dtype=acc, device=u.device)
    dbias = None if delta_bias is None else torch.zeros(dim, dtype=acc, device=u.device)
    dh0 = new_buffer(len(seqs), dim, N, dtype=acc, device=u.device)
    for s, a, b, slot, n in seqs:  # sums in sequence order: deterministic
        dlast = None if dlast_state is None else dlast_state[s:s + 1]
        if a == b:  # the state passes through an empty sequence
            dh0[s] = 0.0 if dlast is None else dlast[0]
            continue
        g = selective_scan_bwd_torch(
            dout[..., a:b], dlast, *(_slice(t, a, b) for t in (u, delta)), A, *(_slice(t, a, b) for t in (B, C)),
            D=D, z=_slice(z, a, b), delta_bias=delta_bias, chunk_states=chunk_states[:, :, slot:slot + n],
            config=one, chunk_size=chunk_size)
        du[..., a:b], ddelta[..., a:b] = g[0], g[1]
        dA += g[2]
        for total, part, X in ((dB, g[3], B), (dC, g[4], C)):
            if X.dim() == 2:
                total += part
            else:
                total[..., a:b] = part
        if dD is not None:
            dD += g[5]
        if dz is not None:
            dz[..., a:b] = g[6]
        if dbias is not None:
            dbias += g[7]
        dh0[s] = g[8][0]
    return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), None if D is None else dD.to(D.dtype), dz,
            None if delta_bias is None else dbias.to(delta_bias.dtype), dh0)
