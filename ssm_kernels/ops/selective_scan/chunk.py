"""Chunked selective scan in Triton: the "triton" backend.

Grid: (channel blocks, batch). A program owns BLOCK_D channels of one batch row (never
straddling two groups of B/C) and walks the sequence in chunks of BT steps, carrying the
state [BLOCK_D, N] in fp32 registers. Within a chunk the recurrence h_t = a_t h_{t-1} + x_t
is a `tl.associative_scan` over (a, x) pairs along time, on [BLOCK_D, BLOCK_N, BT] tiles.

Forward saves only the state entering each chunk (batch, dim, n_chunks, N). The backward walks
chunks in reverse, recomputes the chunk's states from the saved one, and runs the adjoint
recurrence g_t = a_{t+1} g_{t+1} + C_t dy_t. That one is a suffix recurrence: we load the
chunk's inputs in reversed time order, run an ordinary forward scan, and `tl.flip` the result
(`associative_scan(reverse=True)` has open bug reports for this operator, triton#4362).

Padding steps (t >= L) get dt = 0, hence a = 1 and x = 0: the state passes through them
unchanged, so the chunk's last column is the true state and no step needs special casing.
The multipliers are fp32 runtime arguments: one compiled kernel serves every width.
"""

import torch
import triton
import triton.language as tl

from ..utils import new_buffer


@triton.jit
def _affine_combine(a_l, x_l, a_r, x_r):
    # (h -> a_l h + x_l) followed by (h -> a_r h + x_r)
    return a_l * a_r, a_r * x_l + x_r


@triton.jit
def _load_tile(ptr, stride_b, stride_d, stride_l, pid_b, offs_d, offs_t, mask):
    """A [BLOCK_D, BT] tile of a (batch, dim, L) tensor, as fp32 (0 where masked)."""
    ptrs = ptr + pid_b * stride_b + offs_d[:, None] * stride_d + offs_t[None, :] * stride_l
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_group_tile(ptr, stride_b, stride_g, stride_n, stride_l, pid_b, group, offs_n, offs_t, mask):
    """A [1, BLOCK_N, BT] tile of a grouped (batch, G, N, L) B or C, as fp32."""
    ptrs = ptr + pid_b * stride_b + group * stride_g + offs_n[:, None] * stride_n + offs_t[None, :] * stride_l
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)[None, :, :]


@triton.jit
def _discretize(delta, bias, mask, dt_scale, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt = softplus(dt_scale * delta + bias) and d dt / d(pre-activation); dt = 0 where masked."""
    pre = delta * dt_scale
    if HAS_BIAS:
        pre += bias[:, None]
    if SOFTPLUS:
        e = tl.exp(tl.minimum(pre, 20.0))
        w = 1.0 + e
        # log1p(e) without cancellation: log(w) * e / (w - 1), exact e where w rounds to 1
        log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        dt = tl.where(pre <= 20.0, log1p_e, pre)
        ddt = tl.where(pre <= 20.0, e / w, 1.0)
    else:
        dt = pre
        ddt = tl.full(pre.shape, 1.0, tl.float32)
    return tl.where(mask, dt, 0.0), ddt


@triton.jit
def _block_setup(pid_db, dim_per_group, blocks_per_group, d_state,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Group, channel offsets and masks of this program's channel block."""
    group = pid_db // blocks_per_group
    group_end = (group + 1) * dim_per_group
    offs_d = group * dim_per_group + (pid_db % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < group_end
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_state
    return group.to(tl.int64), offs_d.to(tl.int64), mask_d, offs_n.to(tl.int64), mask_n


@triton.jit
def _load_channel_params(A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, s_A_d, s_A_n, s_B_0, s_B_1, s_C_0, s_C_1,
                         s_D, s_bias, b_scale, c_scale, offs_d, mask_d, offs_n, mask_n,
                         HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, B_VARIABLE: tl.constexpr,
                         C_VARIABLE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The block's per-channel parameters in fp32: A and A * log2(e) [BLOCK_D, BLOCK_N, 1] (the
    kernels take exp(dt A) as exp2(dt A log2(e))); D and delta_bias
    [BLOCK_D] (0 when absent); fixed B and C [BLOCK_D, BLOCK_N, 1] times their multipliers
    (unused when variable)."""
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
    Dv = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)
    B_fixed = tl.zeros([BLOCK_D, BLOCK_N, 1], tl.float32)
    if not B_VARIABLE:
        B_fixed = tl.load(B_ptr + offs_d[:, None] * s_B_0 + offs_n[None, :] * s_B_1,
                          mask=mask_dn, other=0.0).to(tl.float32)[:, :, None] * b_scale
    C_fixed = tl.zeros([BLOCK_D, BLOCK_N, 1], tl.float32)
    if not C_VARIABLE:
        C_fixed = tl.load(C_ptr + offs_d[:, None] * s_C_0 + offs_n[None, :] * s_C_1,
                          mask=mask_dn, other=0.0).to(tl.float32)[:, :, None] * c_scale
    A = A.to(tl.float32)[:, :, None]
    return A, A * 1.4426950408889634, Dv, bias, B_fixed, C_fixed


@triton.jit
def _chunk_scan(u_ptr, delta_ptr, B_ptr, C_ptr, s_u_b, s_u_d, s_u_l, s_delta_b, s_delta_d, s_delta_l,
                s_B_0, s_B_1, s_B_2, s_B_3, s_C_0, s_C_1, s_C_2, s_C_3,
                pid_b, group, offs_d, mask_d, offs_n, mask_n, offs_t, seqlen,
                A_log2, bias, B_fixed, C_fixed, h_in, dt_scale, b_scale, c_scale,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, B_VARIABLE: tl.constexpr,
                C_VARIABLE: tl.constexpr):
    """One chunk of the recurrence from the state h_in entering it; the forward kernel runs it
    and the backward recomputes it. Returns the tile mask, u, dt and d dt/d(pre-activation)
    [BLOCK_D, BT], B and C with their multipliers, and a, x and the states hs after each step
    [BLOCK_D, BLOCK_N, BT]."""
    mask_t = offs_t < seqlen
    mask = mask_d[:, None] & mask_t[None, :]
    mask_nt = mask_n[:, None] & mask_t[None, :]
    u = _load_tile(u_ptr, s_u_b, s_u_d, s_u_l, pid_b, offs_d, offs_t, mask)
    delta = _load_tile(delta_ptr, s_delta_b, s_delta_d, s_delta_l, pid_b, offs_d, offs_t, mask)
    dt, ddt = _discretize(delta, bias, mask, dt_scale, HAS_BIAS, SOFTPLUS)
    if B_VARIABLE:
        Bt = _load_group_tile(B_ptr, s_B_0, s_B_1, s_B_2, s_B_3, pid_b, group, offs_n, offs_t, mask_nt) * b_scale
    else:
        Bt = B_fixed
    if C_VARIABLE:
        Ct = _load_group_tile(C_ptr, s_C_0, s_C_1, s_C_2, s_C_3, pid_b, group, offs_n, offs_t, mask_nt) * c_scale
    else:
        Ct = C_fixed
    a = tl.exp2(dt[:, None, :] * A_log2)
    x = (dt * u)[:, None, :] * Bt
    a_prod, hs = tl.associative_scan((a, x), axis=2, combine_fn=_affine_combine)
    hs = hs + a_prod * h_in[:, :, None]
    return mask, u, dt, ddt, Bt, Ct, a, x, hs


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, last_ptr, states_ptr,
    seqlen, d_state, dim_per_group, blocks_per_group, n_chunks,
    dt_scale, b_scale, c_scale,
    s_u_b, s_u_d, s_u_l, s_delta_b, s_delta_d, s_delta_l, s_z_b, s_z_d, s_z_l,
    s_out_b, s_out_d, s_out_l,
    s_A_d, s_A_n,
    s_B_0, s_B_1, s_B_2, s_B_3, s_C_0, s_C_1, s_C_2, s_C_3,  # variable: (b, g, n, l); fixed: (d, n)
    s_D, s_bias, s_h0_b, s_h0_d, s_h0_n, s_last_b, s_last_d, s_last_n,
    s_st_b, s_st_d, s_st_c, s_st_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BT: tl.constexpr,
):
    pid_b = tl.program_id(1).to(tl.int64)
    group, offs_d, mask_d, offs_n, mask_n = _block_setup(tl.program_id(0), dim_per_group, blocks_per_group,
                                                         d_state, BLOCK_D, BLOCK_N)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A, A_log2, Dv, bias, B_fixed, C_fixed = _load_channel_params(
        A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, s_A_d, s_A_n, s_B_0, s_B_1, s_C_0, s_C_1, s_D, s_bias,
        b_scale, c_scale, offs_d, mask_d, offs_n, mask_n, HAS_D, HAS_BIAS, B_VARIABLE, C_VARIABLE, BLOCK_D, BLOCK_N)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_h0_b + offs_d[:, None] * s_h0_d + offs_n[None, :] * s_h0_n,
                    mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    states = states_ptr + pid_b * s_st_b + offs_d[:, None] * s_st_d + offs_n[None, :] * s_st_n
    t_idx = tl.arange(0, BT).to(tl.int64)  # int64 so every time offset below is int64

    for c in range(0, n_chunks):
        tl.store(states + c * s_st_c, h, mask=mask_dn)
        offs_t = c * BT + t_idx
        mask, u, _, _, _, Ct, _, _, hs = _chunk_scan(
            u_ptr, delta_ptr, B_ptr, C_ptr, s_u_b, s_u_d, s_u_l, s_delta_b, s_delta_d, s_delta_l,
            s_B_0, s_B_1, s_B_2, s_B_3, s_C_0, s_C_1, s_C_2, s_C_3, pid_b, group, offs_d, mask_d, offs_n, mask_n,
            offs_t, seqlen, A_log2, bias, B_fixed, C_fixed, h, dt_scale, b_scale, c_scale,
            HAS_BIAS, SOFTPLUS, B_VARIABLE, C_VARIABLE)
        y = tl.sum(hs * Ct, axis=1)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = _load_tile(z_ptr, s_z_b, s_z_d, s_z_l, pid_b, offs_d, offs_t, mask)
            y *= z * tl.sigmoid(z)
        out_ptrs = out_ptr + pid_b * s_out_b + offs_d[:, None] * s_out_d + offs_t[None, :] * s_out_l
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where(t_idx[None, None, :] == BT - 1, hs, 0.0), axis=2)  # state after the chunk

    tl.store(last_ptr + pid_b * s_last_b + offs_d[:, None] * s_last_d + offs_n[None, :] * s_last_n, h, mask=mask_dn)


@triton.jit
def _store_group_grad(ptr, val, blk, pid_b, group, offs_n, offs_t, mask,
                      s_blk, s_b, s_g, s_n, s_l, USE_ATOMIC: tl.constexpr):
    """Write one channel block's [BLOCK_N, BT] contribution to dB or dC of a grouped B/C:
    an fp32 atomic add into a shared buffer, or a plain store into this block's own slice
    (deterministic; the slices are summed afterwards)."""
    ptrs = ptr + blk * s_blk + pid_b * s_b + group * s_g + offs_n[:, None] * s_n + offs_t[None, :] * s_l
    if USE_ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask)
    else:
        tl.store(ptrs, val, mask=mask)


@triton.jit
def selective_scan_bwd_kernel(
    dout_ptr, dlast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, seqlen, d_state, dim_per_group, blocks_per_group, n_chunks,
    dt_scale, b_scale, c_scale,
    s_dout_b, s_dout_d, s_dout_l, s_u_b, s_u_d, s_u_l, s_delta_b, s_delta_d, s_delta_l, s_z_b, s_z_d, s_z_l,
    s_dx_b, s_dx_d, s_dx_l,  # du, ddelta and dz: contiguous outputs of one shape
    s_A_d, s_A_n,
    s_B_0, s_B_1, s_B_2, s_B_3, s_C_0, s_C_1, s_C_2, s_C_3,
    s_D, s_bias, s_dlast_b, s_dlast_d, s_dlast_n,
    s_st_b, s_st_d, s_st_c, s_st_n,
    s_dB_blk, s_dB_0, s_dB_1, s_dB_2, s_dB_3, s_dC_blk, s_dC_0, s_dC_1, s_dC_2, s_dC_3,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, USE_ATOMIC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BT: tl.constexpr,
):
    """du, ddelta, dz are contiguous (batch, dim, L); dA, dh0, fixed dB/dC are contiguous
    (batch, dim, N) fp32 per-batch partials; dD, dbias (batch, dim) partials; grouped dB/dC
    fp32 (blocks, batch, G, N, L), strides given."""
    pid_db = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    group, offs_d, mask_d, offs_n, mask_n = _block_setup(pid_db, dim_per_group, blocks_per_group,
                                                         d_state, BLOCK_D, BLOCK_N)
    blk = (pid_db % blocks_per_group).to(tl.int64)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A, A_log2, Dv, bias, B_fixed, C_fixed = _load_channel_params(
        A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, s_A_d, s_A_n, s_B_0, s_B_1, s_C_0, s_C_1, s_D, s_bias,
        b_scale, c_scale, offs_d, mask_d, offs_n, mask_n, HAS_D, HAS_BIAS, B_VARIABLE, C_VARIABLE, BLOCK_D, BLOCK_N)
    # dL/dh at the chunk's last step, from the steps after it (initially from last_state).
    if HAS_DLAST:
        dh = tl.load(dlast_ptr + pid_b * s_dlast_b + offs_d[:, None] * s_dlast_d + offs_n[None, :] * s_dlast_n,
                     mask=mask_dn, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dB_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dC_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dD_acc = tl.zeros([BLOCK_D], tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], tl.float32)
    states = states_ptr + pid_b * s_st_b + offs_d[:, None] * s_st_d + offs_n[None, :] * s_st_n
    t_idx = tl.arange(0, BT).to(tl.int64)  # int64 so every time offset below is int64

    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t0 = c * BT
        h_in = tl.load(states + c * s_st_c, mask=mask_dn, other=0.0)

        # Recompute the chunk forward (time ascending).
        offs_t = t0 + t_idx
        mask, u, dt, ddt, Bt, Ct, a, x, hs = _chunk_scan(
            u_ptr, delta_ptr, B_ptr, C_ptr, s_u_b, s_u_d, s_u_l, s_delta_b, s_delta_d, s_delta_l,
            s_B_0, s_B_1, s_B_2, s_B_3, s_C_0, s_C_1, s_C_2, s_C_3, pid_b, group, offs_d, mask_d, offs_n, mask_n,
            offs_t, seqlen, A_log2, bias, B_fixed, C_fixed, h_in, dt_scale, b_scale, c_scale,
            HAS_BIAS, SOFTPLUS, B_VARIABLE, C_VARIABLE)
        mask_nt = mask_n[:, None] & (offs_t < seqlen)[None, :]
        dtu = dt * u

        dout = _load_tile(dout_ptr, s_dout_b, s_dout_d, s_dout_l, pid_b, offs_d, offs_t, mask)
        if HAS_Z:
            z = _load_tile(z_ptr, s_z_b, s_z_d, s_z_l, pid_b, offs_d, offs_t, mask)
            sig = tl.sigmoid(z)
            y = tl.sum(hs * Ct, axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            dz = dout * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + pid_b * s_dx_b + offs_d[:, None] * s_dx_d + offs_t[None, :] * s_dx_l,
                     dz.to(dz_ptr.dtype.element_ty), mask=mask)
            dy = dout * z * sig
        else:
            dy = dout

        # Adjoint recurrence, time descending: position s holds step t0 + BT - 1 - s.
        offs_r = t0 + (BT - 1 - t_idx)
        mask_r = mask_d[:, None] & (offs_r < seqlen)[None, :]
        dout_r = _load_tile(dout_ptr, s_dout_b, s_dout_d, s_dout_l, pid_b, offs_d, offs_r, mask_r)
        if HAS_Z:
            z_r = _load_tile(z_ptr, s_z_b, s_z_d, s_z_l, pid_b, offs_d, offs_r, mask_r)
            dout_r = dout_r * z_r * tl.sigmoid(z_r)
        if C_VARIABLE:
            Ct_r = _load_group_tile(C_ptr, s_C_0, s_C_1, s_C_2, s_C_3, pid_b, group, offs_n, offs_r,
                                    mask_n[:, None] & (offs_r < seqlen)[None, :]) * c_scale
        else:
            Ct_r = C_fixed
        # g_t = a_{t+1} g_{t+1} + C_t dy_t: the decay at position s is that of step t + 1, which
        # belongs to the chunk (s > 0) and the sequence; elsewhere dt = 0 makes it 1.
        offs_next = offs_r + 1
        mask_next = mask_d[:, None] & ((offs_next < seqlen) & (t_idx > 0))[None, :]
        delta_next = _load_tile(delta_ptr, s_delta_b, s_delta_d, s_delta_l, pid_b, offs_d, offs_next, mask_next)
        dt_next, _ = _discretize(delta_next, bias, mask_next, dt_scale, HAS_BIAS, SOFTPLUS)
        alpha = tl.exp2(dt_next[:, None, :] * A_log2)
        alpha_prod, g_r = tl.associative_scan((alpha, Ct_r * dout_r[:, None, :]), axis=2,
                                              combine_fn=_affine_combine)
        g = tl.flip(g_r + alpha_prod * dh[:, :, None], 2)  # dL/dh_t, time ascending

        # Gradients of the chunk's inputs.
        if B_VARIABLE:
            _store_group_grad(dB_ptr, tl.sum(g * dtu[:, None, :], axis=0) * b_scale, blk, pid_b, group,
                              offs_n, offs_t, mask_nt, s_dB_blk, s_dB_0, s_dB_1, s_dB_2, s_dB_3, USE_ATOMIC)
        else:
            dB_acc += tl.sum(g * dtu[:, None, :], axis=2)
        if C_VARIABLE:
            _store_group_grad(dC_ptr, tl.sum(hs * dy[:, None, :], axis=0) * c_scale, blk, pid_b, group,
                              offs_n, offs_t, mask_nt, s_dC_blk, s_dC_0, s_dC_1, s_dC_2, s_dC_3, USE_ATOMIC)
        else:
            dC_acc += tl.sum(hs * dy[:, None, :], axis=2)
        du = tl.sum(g * Bt, axis=1) * dt
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        tl.store(du_ptr + pid_b * s_dx_b + offs_d[:, None] * s_dx_d + offs_t[None, :] * s_dx_l,
                 du.to(du_ptr.dtype.element_ty), mask=mask)
        decayed = hs - x  # = a_t h_{t-1}, without dividing by a_t
        d_dt = tl.sum(g * (Bt * u[:, None, :] + decayed * A), axis=1)
        dA_acc += tl.sum(g * decayed * dt[:, None, :], axis=2)
        d_pre = tl.where(mask, d_dt * ddt, 0.0)
        tl.store(ddelta_ptr + pid_b * s_dx_b + offs_d[:, None] * s_dx_d + offs_t[None, :] * s_dx_l,
                 (d_pre * dt_scale).to(ddelta_ptr.dtype.element_ty), mask=mask)
        dbias_acc += tl.sum(d_pre, axis=1)
        dh = tl.sum(tl.where(t_idx[None, None, :] == 0, g * a, 0.0), axis=2)  # dL/dh entering the chunk

    # Per-batch partials, contiguous: (batch, dim, N) and (batch, dim).
    offs_dn = pid_b * dim * d_state + offs_d[:, None] * d_state + offs_n[None, :]
    offs_bd = pid_b * dim + offs_d
    tl.store(dh0_ptr + offs_dn, dh, mask=mask_dn)
    tl.store(dA_ptr + offs_dn, dA_acc, mask=mask_dn)
    if not B_VARIABLE:
        tl.store(dB_ptr + offs_dn, dB_acc * b_scale, mask=mask_dn)
    if not C_VARIABLE:
        tl.store(dC_ptr + offs_dn, dC_acc * c_scale, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + offs_bd, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + offs_bd, dbias_acc, mask=mask_d)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Elements of one [BLOCK_D, BLOCK_N, BT] tile: on a GPU this bounds the registers a program
# needs. Under the interpreter it is small so that even tiny test shapes have several channel
# blocks per group (partial blocks, cross-block dB/dC sums).
_TILE_ELEMENTS = {"cuda": 4096, "interpreter": 128}
# GPU defaults, not tuned for speed yet: chosen from ptxas' register report for sm_90 (see
# tests/compile_for_gpu.py), where 8 warps and BLOCK_D <= 16 keep the backward's spills small.
_CUDA_MAX_BLOCK_D = 16
_CUDA_NUM_WARPS = 8


def triton_chunk_size(d_state: int, device: torch.device) -> int:
    """Steps per chunk (BT). Under the interpreter (CPU tensors) 16: its scan runs element by
    element in Python, so small tiles keep it fast and put chunk boundaries in small tests."""
    if device.type != "cuda":
        return 16
    block_n = triton.next_power_of_2(d_state)
    return 64 if block_n <= 16 else 32 if block_n <= 64 else 16


def _blocks(d_state: int, dim_per_group: int, device: torch.device):
    """(BLOCK_D, BLOCK_N, BT, blocks per group)."""
    bt = triton_chunk_size(d_state, device)
    block_n = triton.next_power_of_2(d_state)
    on_gpu = device.type == "cuda"
    block_d = min(triton.next_power_of_2(dim_per_group),
                  max(1, _TILE_ELEMENTS["cuda" if on_gpu else "interpreter"] // (bt * block_n)))
    if on_gpu:
        block_d = min(block_d, _CUDA_MAX_BLOCK_D)
    return block_d, block_n, bt, triton.cdiv(dim_per_group, block_d)


def _num_warps(device: torch.device) -> int:
    return _CUDA_NUM_WARPS if device.type == "cuda" else 4


def _state_matrix_strides(X):
    """(batch, group, n, l) strides of a grouped B/C, or (d, n, 0, 0) of a fixed one."""
    return tuple(X.stride()) if X.dim() == 4 else (X.stride(0), X.stride(1), 0, 0)


def _strides(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


def selective_scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, initial_state, groups: int,
                              delta_softplus: bool, dt_scale: float, b_scale: float, c_scale: float):
    """Forward. B, C as returned by check_inputs. Returns (out, last_state, chunk_states)."""
    batch, dim, seqlen = u.shape
    N = A.shape[1]
    dim_per_group = dim // groups
    BLOCK_D, BLOCK_N, BT, blocks_per_group = _blocks(N, dim_per_group, u.device)
    n_chunks = triton.cdiv(seqlen, BT)
    out = new_buffer(batch, dim, seqlen, dtype=u.dtype, device=u.device)
    last_state = new_buffer(batch, dim, N, dtype=torch.float32, device=u.device)
    states = new_buffer(batch, dim, n_chunks, N, dtype=torch.float32, device=u.device)
    grid = (groups * blocks_per_group, batch)
    selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state, out, last_state, states,
        seqlen, N, dim_per_group, blocks_per_group, n_chunks,
        dt_scale, b_scale, c_scale,
        *u.stride(), *delta.stride(), *_strides(z, 3), *out.stride(),
        *A.stride(), *_state_matrix_strides(B), *_state_matrix_strides(C),
        *_strides(D, 1), *_strides(delta_bias, 1), *_strides(initial_state, 3), *last_state.stride(),
        *states.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus,
        B_VARIABLE=B.dim() == 4, C_VARIABLE=C.dim() == 4,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BT=BT, num_warps=_num_warps(u.device),
    )
    return out, last_state, states


def selective_scan_bwd_triton(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                              groups: int, delta_softplus: bool, dt_scale: float, b_scale: float,
                              c_scale: float, deterministic: bool = False):
    """Backward from the saved chunk states; same returns as selective_scan_bwd_torch.

    Grouped dB/dC sum over the channel blocks of a group. Default: fp32 atomics into one
    buffer (order-dependent rounding). Deterministic: each block writes its own slice of a
    (blocks per group, batch, G, N, L) buffer, summed afterwards in a fixed order.
    """
    batch, dim, seqlen = u.shape
    N = A.shape[1]
    dim_per_group = dim // groups
    BLOCK_D, BLOCK_N, BT, blocks_per_group = _blocks(N, dim_per_group, u.device)
    n_chunks = chunk_states.shape[2]
    f32 = dict(dtype=torch.float32, device=u.device)
    du = new_buffer(batch, dim, seqlen, dtype=u.dtype, device=u.device)
    ddelta = new_buffer(batch, dim, seqlen, dtype=delta.dtype, device=u.device)
    dz = None if z is None else new_buffer(batch, dim, seqlen, dtype=z.dtype, device=u.device)
    dA = new_buffer(batch, dim, N, **f32)
    dh0 = new_buffer(batch, dim, N, **f32)
    dD = None if D is None else new_buffer(batch, dim, **f32)
    dbias = None if delta_bias is None else new_buffer(batch, dim, **f32)
    use_atomic = blocks_per_group > 1 and not deterministic

    def state_matrix_grad(X):
        if X.dim() == 2:
            return new_buffer(batch, dim, N, **f32)
        if use_atomic:
            return torch.zeros(1, batch, groups, N, seqlen, **f32)
        return new_buffer(blocks_per_group, batch, groups, N, seqlen, **f32)
    dB, dC = state_matrix_grad(B), state_matrix_grad(C)

    def grad_strides(dX, X):
        if X.dim() == 2:
            return (0,) * 5
        # With atomics every block adds into the one slice: block stride 0.
        return (0 if use_atomic else dX.stride(0),) + tuple(dX.stride()[1:])

    grid = (groups * blocks_per_group, batch)
    selective_scan_bwd_kernel[grid](
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0,
        dim, seqlen, N, dim_per_group, blocks_per_group, n_chunks,
        dt_scale, b_scale, c_scale,
        *dout.stride(), *u.stride(), *delta.stride(), *_strides(z, 3), *du.stride(),
        *A.stride(), *_state_matrix_strides(B), *_state_matrix_strides(C),
        *_strides(D, 1), *_strides(delta_bias, 1), *_strides(dlast_state, 3),
        *chunk_states.stride(),
        *grad_strides(dB, B), *grad_strides(dC, C),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_DLAST=dlast_state is not None, SOFTPLUS=delta_softplus,
        B_VARIABLE=B.dim() == 4, C_VARIABLE=C.dim() == 4, USE_ATOMIC=use_atomic,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BT=BT, num_warps=_num_warps(u.device),
    )
    # Fixed order sums over batch (and channel blocks): deterministic.
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype), dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype), dh0)
