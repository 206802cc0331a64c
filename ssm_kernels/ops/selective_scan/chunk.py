"""Selective scan in Triton: the "triton" backend.

Layout. One program is one warp and CH channels (1 or 2, Geometry) of one batch row. The
sequence is cut into chunks of LANES * ITEMS steps; lane l of the warp owns the ITEMS consecutive
steps t0 + l*ITEMS ... t0 + l*ITEMS + ITEMS - 1 of the chunk, of every channel, in registers.
Two channels share each load of variable B and C (a group's channels read the same rows) and sum
their dB and dC terms before the atomics: both cost half per channel. A runtime loop walks the
N states; y accumulates in registers, so nothing is reduced over N. For each state the
recurrence h_t = a_t h_{t-1} + x_t (a_t = exp2(dt_t A log2 e), x_t = dt_t B_t u_t) runs as:

  1. in each lane, a sequential pass over its items from h = 0 (the lane's aggregate x);
  2. one scan across the 32 lanes of the (decay, x) aggregates, with the state carried in from
     the previous chunk folded into lane 0; a lane's decay over its items is
     exp2(A log2 e * sum of its dt), one exp2 instead of a product of ITEMS;
  3. in each lane, a second sequential pass from the state entering the lane, which gives every
     state and feeds y += C_t h_t.

The backward walks the chunks in reverse. It recomputes the chunk's states the same way from
the state saved at the chunk's start, then runs the adjoint recurrence g_t = C_t dy_t +
a_{t+1} g_{t+1} the same way in the other direction. a_{t+1} is the next item's decay: a
register rename inside a lane, one shuffle across lanes. The decayed state a_t h_{t-1} that dA
and ddelta need is a product, never h_t - x_t (which cancels under strong decay).

Only products across lanes can overflow when the scan grows (dt * A > 0): they saturate at the
largest float instead of reaching inf, so that inf * 0 never turns a zero state into NaN.

Tiles. A [ITEMS, LANES] tile ([ITEMS, CH, LANES] for two channels; items first, so the items
of a lane are the register axis) is loaded as a tile of VEC-wide vectors ([ITEMS // VEC, LANES,
VEC], or [LANES, ITEMS // VEC, VEC] on Triton 3.6, see LANES_FIRST) and permuted and reshaped in
registers; the compiler keeps one layout and moves no data.
"""

import torch
import triton
import triton.language as tl

from ..triton_helpers import (FLT_MAX, contiguous, discretize, has, log2_decay_rate, scan_heuristics, sigmoid,
                              strides)
from ..utils import new_buffer
from .checks import state_rows

# The order of a vector-load tile's axes that keeps each lane's items in one thread. The
# coalescing pass breaks the tie between the two strided axes (lanes, vectors of a lane) one
# way in Triton 3.6 and the other in 3.9; the wrong order spreads a lane's items over four
# threads and costs 1.6x in the forward (docs/kernel_design.md). 3.7 and 3.8 follow 3.9 here
# untested.
LANES_FIRST = tl.constexpr(tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7))


# ---------------------------------------------------------------------------------------------
# Helpers: tiles, in-lane item access, scans
#
# A program runs CH channels (1 or 2) of one batch row in one warp: a lane holds its items of
# every channel in registers. Variable B and C are shared by the channels: a program loads each
# tile of them once, and sums its channels' dB and dC terms before they leave it.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _time_offsets(t0, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr, CH: tl.constexpr):
    """Time steps of a chunk as a tile of VEC-wide vectors, lane l owning t0 + l*ITEMS + i:
    [LANES, ITEMS // VEC, VEC] with LANES_FIRST, else [ITEMS // VEC, LANES, VEC]; for CH > 1
    channels, with a channel axis of size 1 at axis 1 (see _channel_axis). The compiler gives the
    lanes axis the threads of the warp; a lane's items and channels are its registers."""
    lane = tl.arange(0, LANES)
    j = tl.arange(0, ITEMS // VEC)
    if CH == 1:
        k = tl.arange(0, VEC)[None, None, :]
        if LANES_FIRST:
            t = t0 + lane[:, None, None] * ITEMS + j[None, :, None] * VEC + k
        else:
            t = t0 + lane[None, :, None] * ITEMS + j[:, None, None] * VEC + k
    else:
        k = tl.arange(0, VEC)[None, None, None, :]
        if LANES_FIRST:
            t = t0 + lane[:, None, None, None] * ITEMS + j[None, None, :, None] * VEC + k
        else:
            t = t0 + lane[None, None, :, None] * ITEMS + j[:, None, None, None] * VEC + k
    return t


# Shapes. With one channel a program's values have the shapes of a one-channel kernel: tiles
# [ITEMS, LANES], per-lane [LANES], per-state [BLOCK_N], per-channel scalars. With CH > 1 they
# gain a channel axis: [ITEMS, CH, LANES], [CH, LANES], [CH, BLOCK_N], [CH]. (A size-1 channel
# axis costs registers: the compiler lays such tiles out less well.) The helpers below work on
# either; the ones that place a per-channel value take CH.

@triton.jit
def _channels(program, CH: tl.constexpr):
    """The program's channels: program * CH ... program * CH + CH - 1."""
    if CH == 1:
        d = program
    else:
        d = program * CH + tl.arange(0, CH)
    return d


@triton.jit
def _place(x, CH: tl.constexpr, AXES: tl.constexpr):
    """A per-channel value placed against other values: itself (a scalar) for one channel, else
    the [CH] vector with new axes of size 1 at AXES."""
    if CH == 1:
        y = x
    else:
        y = tl.expand_dims(x, AXES)
    return y


@triton.jit
def _channel_axis(x, CH: tl.constexpr):
    """A per-channel value -> the channel axis of a _time_offsets tile."""
    return _place(x, CH, (0, 2, 3))


@triton.jit
def _on_tiles(x, CH: tl.constexpr):
    """A per-channel value -> against tiles."""
    return _place(x, CH, (0, 2))


@triton.jit
def _column(x, CH: tl.constexpr):
    """A per-channel value -> against per-lane or per-state values."""
    return _place(x, CH, 1)


@triton.jit
def _per_channel(x):
    """The sum of a per-lane or per-state value over its last axis: a per-channel value."""
    return tl.sum(x, len(x.shape) - 1)


@triton.jit
def _items_first(x, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr):
    """A tile of _time_offsets' layout -> a tile, [ITEMS, LANES] or [ITEMS, CH (or 1), LANES]."""
    if len(x.shape) == 3:
        if LANES_FIRST:
            y = tl.reshape(tl.permute(x, (1, 2, 0)), (ITEMS, LANES))
        else:
            y = tl.reshape(tl.permute(x, (0, 2, 1)), (ITEMS, LANES))
    else:
        if LANES_FIRST:
            y = tl.reshape(tl.permute(x, (2, 3, 1, 0)), (ITEMS, x.shape[1], LANES))
        else:
            y = tl.reshape(tl.permute(x, (0, 3, 1, 2)), (ITEMS, x.shape[1], LANES))
    return y


@triton.jit
def _vectors_first(x, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr):
    """A tile -> the layout of _time_offsets, the inverse of _items_first."""
    if len(x.shape) == 2:
        y = tl.reshape(x, (ITEMS // VEC, VEC, LANES))
        if LANES_FIRST:
            y = tl.permute(y, (2, 0, 1))
        else:
            y = tl.permute(y, (0, 2, 1))
    else:
        y = tl.reshape(x, (ITEMS // VEC, VEC, x.shape[1], LANES))
        if LANES_FIRST:
            y = tl.permute(y, (3, 2, 0, 1))
        else:
            y = tl.permute(y, (0, 2, 3, 1))
    return y


@triton.jit
def _load_tile(ptr, t, mask, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr):
    """A chunk of the program's rows (ptr on the channel axis) or of one row shared by its
    channels (a scalar ptr; a channel axis of size 1 when CH > 1) as a tile in the memory's dtype,
    0 where masked (mask None: every step is in the sequence)."""
    if mask is None:
        x = tl.load(ptr + t)
    else:
        x = tl.load(ptr + t, mask=mask, other=0.0)
    return _items_first(x, LANES, ITEMS, VEC)


@triton.jit
def _load_tile_f32(ptr, t, mask, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr):
    return _load_tile(ptr, t, mask, LANES, ITEMS, VEC).to(tl.float32)


@triton.jit
def _store_tile(ptr, t, mask, x, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr):
    tl.store(ptr + t, _vectors_first(x, LANES, ITEMS, VEC).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _item_index(x):
    """The item index of every element of a tile, broadcastable against it."""
    if len(x.shape) == 2:
        idx = tl.arange(0, x.shape[0])[:, None]
    else:
        idx = tl.arange(0, x.shape[0])[:, None, None]
    return idx


@triton.jit
def _item(x, i: tl.constexpr, idx):
    """Item i of every lane, a tile -> a per-lane value (idx: _item_index(x), computed once by the
    caller: under the interpreter every call of a helper costs about 0.1 ms). Adding -0.0 is
    exact, so the compiler folds this to a register read."""
    return tl.sum(tl.where(idx == i, x, -0.0), 0)


@triton.jit
def _shift_to_earlier(x, last):
    """out[i] = x[i + 1] within each lane; out[ITEMS - 1] = last. Register renames only."""
    idx = _item_index(x)
    out = tl.where(idx == x.shape[0] - 1, tl.expand_dims(last, 0), x)
    for i in tl.static_range(x.shape[0] - 1):
        out = tl.where(idx == i, tl.expand_dims(_item(x, i + 1, idx), 0), out)
    return out


@triton.jit
def _shift_to_later(x, first):
    """out[i] = x[i - 1] within each lane; out[0] = first. Register renames only."""
    idx = _item_index(x)
    out = tl.where(idx == 0, tl.expand_dims(first, 0), x)
    for i in tl.static_range(1, x.shape[0]):
        out = tl.where(idx == i, tl.expand_dims(_item(x, i - 1, idx), 0), out)
    return out


@triton.jit
def _affine_combine(a_l, x_l, a_r, x_r):
    """(h -> a_l h + x_l) followed by (h -> a_r h + x_r)."""
    return a_l * a_r, a_r * x_l + x_r


@triton.jit
def _affine_combine_saturating(a_l, x_l, a_r, x_r):
    """_affine_combine whose decay product stops at the largest float: a growing scan's product
    over many lanes would otherwise reach inf, and inf * (a zero state) is NaN."""
    return tl.minimum(a_l * a_r, FLT_MAX, propagate_nan=tl.PropagateNan.ALL), a_r * x_l + x_r


@triton.jit
def _lane_exp2(log2_decay):
    """A decay over several steps, exp2 of a sum, kept finite (see _affine_combine_saturating)."""
    return tl.exp2(tl.minimum(log2_decay, 127.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _lanes(x):
    """The lane index of every element of a per-lane value."""
    return tl.arange(0, x.shape[len(x.shape) - 1]) + tl.zeros(x.shape, tl.int32)


@triton.jit
def _from_lane(x, lane):
    """A per-lane value read at lane index `lane` (same shape) within each channel: shuffles."""
    return tl.gather(x, lane, len(x.shape) - 1)


@triton.jit
def _lane_states(decay, x, carry, LANES: tl.constexpr, REVERSE: tl.constexpr):
    """The state entering each lane, from each lane's aggregate (decay, x) over its items and the
    state `carry` entering the chunk (per-lane values, carry the same in every lane). REVERSE runs
    toward earlier lanes: the carry enters at the chunk's end and "entering" is at a lane's last
    item. Returns (entering, the scan's totals; lane LANES - 1 holds the state leaving the
    chunk)."""
    lane = _lanes(x)
    axis: tl.constexpr = len(x.shape) - 1  # the lanes (gathers inline: see _item)
    edge = LANES - 1 if REVERSE else 0
    x = tl.where(lane == edge, x + decay * carry, x)
    if REVERSE:  # scan the lanes in reverse order by index, not with reverse=True
        decay = tl.gather(decay, LANES - 1 - lane, axis)
        x = tl.gather(x, LANES - 1 - lane, axis)
    _, total = tl.associative_scan((decay, x), axis, _affine_combine_saturating)
    entering = tl.gather(total, tl.maximum(lane - 1, 0), axis)
    if REVERSE:
        entering = tl.gather(entering, LANES - 1 - lane, axis)
    return tl.where(lane == edge, carry, entering), total


@triton.jit
def _with_element(v, n, value_at, index):
    """v (per-state) with state n replaced by value_at (per-lane) at lane `index`."""
    axis: tl.constexpr = len(v.shape) - 1
    offs = tl.arange(0, v.shape[axis])
    return tl.where(offs == n, tl.gather(value_at, tl.full(v.shape, index, tl.int32), axis), v)


@triton.jit
def _scan_items(a, x, entering):
    """h_i = a_i h_{i-1} + x_i along each lane's items, from the state entering the lane."""
    x = tl.where(_item_index(a) == 0, x + a * tl.expand_dims(entering, 0), x)
    _, h = tl.associative_scan((a, x), 0, _affine_combine)
    return h


@triton.jit
def _scan_items_reverse(a, x, entering):
    """g_i = a_i g_{i+1} + x_i along each lane's items, from the value entering at its end."""
    x = tl.where(_item_index(a) == a.shape[0] - 1, x + a * tl.expand_dims(entering, 0), x)
    _, g = tl.associative_scan((tl.flip(a, 0), tl.flip(x, 0)), 0, _affine_combine)
    return tl.flip(g, 0)


@triton.jit
def _lane_aggregate(a, x):
    """Each lane's scan of its items from 0: the x part of its aggregate, per lane."""
    _, h = tl.associative_scan((a, x), 0, _affine_combine)
    return _item(h, a.shape[0] - 1, _item_index(h))


@triton.jit
def _lane_aggregate_reverse(a, x):
    _, g = tl.associative_scan((tl.flip(a, 0), tl.flip(x, 0)), 0, _affine_combine)
    return _item(g, a.shape[0] - 1, _item_index(g))


@triton.jit
def _pick(v, n, LANES: tl.constexpr):
    """State n of a per-state value, broadcast to every lane: one shuffle."""
    if len(v.shape) == 1:
        y = tl.gather(v, tl.full([LANES], n, tl.int32), 0)
    else:
        y = tl.gather(v, tl.full([v.shape[0], LANES], n, tl.int32), 1)
    return y


@triton.jit
def _channel_rows(ptr, d, d_state, offs_n, mask_n, CH: tl.constexpr):
    """The per-channel (N,) rows of channels d (A, or a fixed B or C) as a [CH, BLOCK_N] fp32
    register tensor."""
    rows = ptr + _column(d, CH) * d_state + offs_n
    return tl.load(rows, mask=mask_n, other=0.0).to(tl.float32)


@triton.jit
def _channel_params(A_ptr, B_ptr, C_ptr, D_ptr, delta_bias_ptr, d, d_state, offs_n, mask_n,
                    HAS_D: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, B_VARIABLE: tl.constexpr,
                    C_VARIABLE: tl.constexpr, CH: tl.constexpr):
    """Channels d's A and fixed B, C rows as [CH, BLOCK_N] register tensors (one shuffle per state
    to read; a variable B or C gives A in its place, unused) and their D and delta_bias ([CH], 0
    if absent)."""
    A = _channel_rows(A_ptr, d, d_state, offs_n, mask_n, CH)
    B_fixed = A if B_VARIABLE else _channel_rows(B_ptr, d, d_state, offs_n, mask_n, CH)
    C_fixed = A if C_VARIABLE else _channel_rows(C_ptr, d, d_state, offs_n, mask_n, CH)
    D = tl.load(D_ptr + d).to(tl.float32) if HAS_D else d * 0.0
    bias = tl.load(delta_bias_ptr + d).to(tl.float32) if HAS_DELTA_BIAS else d * 0.0
    return A, B_fixed, C_fixed, D, bias


@triton.jit
def _state_tile(row, n, stride_n, d_state, t, mask, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr):
    """Variable B or C of state n (clamped to the last one) as a tile shared by the program's
    channels (a channel axis of size 1 when CH > 1)."""
    return _load_tile(row + tl.minimum(n, d_state - 1) * stride_n, t, mask, LANES, ITEMS, VEC)


@triton.jit
def _sequence(cu_seqlens_ptr, d, dim, seqlen, SAVED_EVERY: tl.constexpr, VEC: tl.constexpr, VARLEN: tl.constexpr):
    """What program (channels d [CH], s) runs: (batch row b, the step its time offsets count from,
    the first and the end offset of its own steps, its first slot of the saved states in the row,
    its channels' rows of the (batch or sequence, dim, N) states [CH]).

    VARLEN: sequence s of the packed batch of one row, steps cu_seqlens[s] ... cu_seqlens[s + 1] - 1.
    Offsets count from that start rounded down to a multiple of VEC, so that vector loads stay
    aligned; the up to VEC - 1 steps before the start are masked like steps past the end (dt = 0:
    the state passes through). Its saved states start at slot cu_seqlens[s] // SAVED_EVERY + s,
    which never overlaps sequence s - 1's, so the row needs cdiv(L, SAVED_EVERY) + num_seqs slots."""
    s = tl.program_id(1).to(tl.int64)
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + s).to(tl.int64)
        base = tl.multiple_of(start - start % VEC, VEC)
        first = start - base
        end = tl.load(cu_seqlens_ptr + s + 1).to(tl.int64) - base
        b = s * 0
        save_base = start // SAVED_EVERY + s
    else:
        base = s * 0
        first = 0
        end = seqlen
        b = s
        save_base = s * 0
    return b, base, first, end, save_base, s * dim + d


@triton.jit
def _in_sequence(t, first, end, VARLEN: tl.constexpr):
    """The mask of a program's own steps among the time offsets t."""
    if VARLEN:
        m = (t >= first) & (t < end)
    else:
        m = t < end
    return m


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.heuristics(scan_heuristics(HAS_INITIAL_STATE=has("initial_state_ptr")))
@triton.jit
def selective_scan_fwd_kernel(
    # inputs
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, initial_state_ptr, cu_seqlens_ptr,
    # outputs
    out_ptr, last_state_ptr, chunk_states_ptr,
    # sizes (saved_per_row: the chunk_states slots of a row)
    dim, seqlen, d_state, dim_per_group, saved_per_row,
    # strides: u, delta, z are (batch, dim, L) and variable B, C (batch, G, N, L), each with
    # time contiguous; every other tensor is contiguous
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d,
    stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    # width multipliers
    dt_scale, b_scale, c_scale,
    # meta
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr, B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr,
    BLOCK_N: tl.constexpr, CH: tl.constexpr, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr,
    SAVE_LANES: tl.constexpr, EVEN: tl.constexpr, FAST_MATH: tl.constexpr, VARLEN: tl.constexpr,
):
    """out, last_state, and the state entering every SAVE_LANES * ITEMS steps (the backward's
    chunks) in chunk_states (batch, dim, saved_per_row, N). Program (p, s) runs channels
    p * CH ... p * CH + CH - 1 (of one group) of batch row s, or, under VARLEN, of sequence s of
    the packed batch of one row (see _sequence)."""
    d = _channels(tl.program_id(0), CH)
    b, start, first, length, save_base, state = _sequence(cu_seqlens_ptr, d, dim, seqlen, SAVE_LANES * ITEMS, VEC,
                                                          VARLEN)
    channel = b * dim + d  # rows of the contiguous (batch, dim, L) tensors
    group = tl.program_id(0) * CH // dim_per_group
    lane = tl.arange(0, LANES)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_state

    u_rows = u_ptr + _channel_axis(b * stride_u_b + d * stride_u_d + start, CH)
    delta_rows = delta_ptr + _channel_axis(b * stride_delta_b + d * stride_delta_d + start, CH)
    B_row = B_ptr + b * stride_B_b + group * stride_B_g + start  # variable B, C: this (batch, group)
    C_row = C_ptr + b * stride_C_b + group * stride_C_g + start
    A, B_fixed, C_fixed, D, bias = _channel_params(A_ptr, B_ptr, C_ptr, D_ptr, delta_bias_ptr, d, d_state, offs_n,
                                                   mask_n, HAS_D, HAS_DELTA_BIAS, B_VARIABLE, C_VARIABLE, CH)
    n_saved = tl.cdiv(length, SAVE_LANES * ITEMS)
    saved = chunk_states_ptr + _column((channel * saved_per_row + save_base) * d_state, CH)

    # The state of every n, carried from chunk to chunk in registers.
    if HAS_INITIAL_STATE:
        carry = tl.load(initial_state_ptr + _column(state, CH) * d_state + offs_n, mask=mask_n,
                        other=0.0)
    else:
        carry = tl.zeros(A.shape, tl.float32)

    for c in range(0, tl.cdiv(length, LANES * ITEMS)):
        t = _time_offsets(c * LANES * ITEMS, LANES, ITEMS, VEC, CH)
        mask = None if EVEN else _in_sequence(t, first, length, VARLEN)
        u = _load_tile_f32(u_rows, t, mask, LANES, ITEMS, VEC)
        delta = _load_tile_f32(delta_rows, t, mask, LANES, ITEMS, VEC)
        dt, _ = discretize(delta, _on_tiles(bias, CH), dt_scale, HAS_DELTA_BIAS, DELTA_SOFTPLUS, FAST_MATH)
        if not EVEN:  # steps past the end: a = 1 and x = 0, the state passes through
            dt = tl.where(_items_first(mask, LANES, ITEMS, VEC), dt, 0.0)
        dtu = dt * u * b_scale
        dt_lane = tl.sum(dt, 0)
        save = c * (LANES // SAVE_LANES) + lane // SAVE_LANES
        save_mask = (lane % SAVE_LANES == 0) & (save < n_saved)
        y = tl.zeros(dt.shape, tl.float32)
        # Variable B and C are loaded for the next state right after their last use, so that
        # the load overlaps the rest of this state's work.
        if B_VARIABLE:
            B = _state_tile(B_row, 0, stride_B_n, d_state, t, mask, LANES, ITEMS, VEC)
        if C_VARIABLE:
            C = _state_tile(C_row, 0, stride_C_n, d_state, t, mask, LANES, ITEMS, VEC)
        for n in range(0, d_state):
            A2 = log2_decay_rate(_pick(A, n, LANES))
            a = tl.exp2(dt * tl.expand_dims(A2, 0))
            if B_VARIABLE:
                x = dtu * B
                B = _state_tile(B_row, n + 1, stride_B_n, d_state, t, mask, LANES, ITEMS, VEC)
            else:
                x = dtu * tl.expand_dims(_pick(B_fixed, n, LANES), 0)
            entering, total = _lane_states(_lane_exp2(dt_lane * A2), _lane_aggregate(a, x),
                                           _pick(carry, n, LANES), LANES, False)
            tl.store(saved + save * d_state + n, entering, mask=save_mask)
            h = _scan_items(a, x, entering)
            if C_VARIABLE:
                y += C * h
                C = _state_tile(C_row, n + 1, stride_C_n, d_state, t, mask, LANES, ITEMS, VEC)
            else:
                y += tl.expand_dims(_pick(C_fixed, n, LANES), 0) * h
            carry = _with_element(carry, n, total, LANES - 1)
        y = y * c_scale
        if HAS_D:
            y += _on_tiles(D, CH) * u
        if HAS_Z:
            z_rows = z_ptr + _channel_axis(b * stride_z_b + d * stride_z_d + start, CH)
            z = _load_tile_f32(z_rows, t, mask, LANES, ITEMS, VEC)
            y *= z * sigmoid(z, FAST_MATH)
        _store_tile(out_ptr + _channel_axis(channel * seqlen + start, CH), t, mask, y, LANES, ITEMS, VEC)

    tl.store(last_state_ptr + _column(state, CH) * d_state + offs_n, carry, mask=mask_n)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _sum_all(x):
    """A tile's sum over its items and lanes: a per-channel value."""
    if len(x.shape) == 2:
        y = tl.sum(tl.sum(x, 0), 0)
    else:
        y = tl.sum(tl.sum(x, 0), 1)
    return y


@triton.jit
def _per_lane_zeros(LANES: tl.constexpr, CH: tl.constexpr):
    """A per-lane accumulator: [LANES], or [CH, LANES]."""
    if CH == 1:
        z = tl.zeros([LANES], tl.float32)
    else:
        z = tl.zeros([CH, LANES], tl.float32)
    return z


@triton.jit
def _add_at(v, n, value):
    """v + value at state n (v per-state, value per-channel)."""
    axis: tl.constexpr = len(v.shape) - 1
    if axis == 1:
        value = value[:, None]
    return tl.where(tl.arange(0, v.shape[axis]) == n, v + value, v)


# How the backward sums variable dB and dC over the channels of a group: a program first adds
# the terms of its CH channels in registers, then adds that partial to the
# (batch, G, N, L) elements that every program of the group adds to:
REDUCE_ATOMIC = tl.constexpr(0)  # fp32 atomics: one pass; the rounding depends on their order
REDUCE_BOUND = tl.constexpr(1)  # deterministic pass 1: the largest |partial| of every element
REDUCE_FIXED = tl.constexpr(2)  # deterministic pass 2: int64 fixed-point partials, scaled per element
# Integer addition and max do not depend on the order, so passes 1 + 2 give the same bits every
# run (a program's own sum over its channels runs in a fixed order). Pass 1 keeps the bound as the
# int32 bits of a non-negative float (they order like the floats); fixed_point_scale_kernel turns
# it, in place, into the element's fp32 scale 2^shift.


@triton.jit
def _channel_sum(ptr, offset, value, scale, mask, REDUCE: tl.constexpr,
                 LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr):
    """Adds the program's channels' terms [ITEMS, CH, LANES], summed over CH, into ptr[offset]
    (a tile of one row, shared by the group's programs), as REDUCE says; ptr is fp32 (ATOMIC), the
    int32 bound (BOUND) or the int64 sum (FIXED, with the elements' scales from _scale_tile)."""
    if len(value.shape) == 3:
        value = tl.sum(value, 1, keep_dims=True)
    v = _vectors_first(value, LANES, ITEMS, VEC)
    if REDUCE == REDUCE_ATOMIC:
        tl.atomic_add(ptr + offset, v, mask=mask, sem="relaxed")
    elif REDUCE == REDUCE_BOUND:
        tl.atomic_max(ptr + offset, tl.abs(v).to(tl.int32, bitcast=True), mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr + offset, (v * scale).to(tl.int64), mask=mask, sem="relaxed")


@triton.jit
def _scale_tile(scale_ptr, row, n, d_state, seqlen, t, mask):
    """REDUCE_FIXED: the scales of state n's elements (clamped to the last state), in the layout
    of the time offsets t."""
    ptrs = scale_ptr + row + tl.minimum(n, d_state - 1) * seqlen + t
    if mask is None:
        scale = tl.load(ptrs)
    else:
        scale = tl.load(ptrs, mask=mask, other=0.0)
    return scale


@triton.jit
def _state_matrix_grad(ptr, scale_ptr, partial, scale, term, row, n, d_state, seqlen, t, mask,
                       VARIABLE: tl.constexpr, REDUCE: tl.constexpr, LANES: tl.constexpr, ITEMS: tl.constexpr,
                       VEC: tl.constexpr):
    """State n's term of dB or dC, [ITEMS, (CH,) LANES]. Variable B/C: summed over the program's
    channels into ptr[row + n * seqlen + t] as REDUCE says (REDUCE_FIXED: with this state's
    `scale`, and the next state's scales are loaded right after their last use, as B and C are).
    Fixed B/C: added to the per-channel partial. Returns (partial, scale)."""
    if VARIABLE:
        _channel_sum(ptr, row + n * seqlen + t, term, scale, mask, REDUCE, LANES, ITEMS, VEC)
        if REDUCE == REDUCE_FIXED:
            scale = _scale_tile(scale_ptr, row, n + 1, d_state, seqlen, t, mask)
    else:
        partial = _add_at(partial, n, _sum_all(term))
    return partial, scale


@triton.jit
def fixed_point_scale_kernel(bound_ptr, scale_ptr, numel, headroom, BLOCK: tl.constexpr):
    """scale_ptr (the bound's memory, as fp32) gets: from the int32 bits of each element's largest |term| -> the fp32 scale 2^shift that
    puts every term below 2^(62 - headroom) in magnitude, so that a sum of 2^(headroom - 1)
    channels stays inside int64 and each term keeps about 50 bits, more than fp32 has. The shift
    stops at 127 (the fp32 range): an element whose terms are all below 2^-103 keeps fewer than
    24 bits of them, an absolute resolution of 2^-127. NaN marks an element with a term that is
    not finite."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    bits = tl.load(bound_ptr + offs, mask=mask, other=0)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 126, -125)  # bound < 2^exponent
    shift = tl.minimum(62 - headroom - exponent, 127)
    scale = ((shift + 127) << 23).to(tl.float32, bitcast=True)
    tl.store(scale_ptr + offs, tl.where(bits >= 0x7F800000, float("nan"), scale), mask=mask)


@triton.jit
def fixed_point_to_float_kernel(sum_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """In place over the scales: the int64 sums of REDUCE_FIXED as fp32 (NaN where the scale is)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.load(sum_ptr + offs, mask=mask, other=0)
    scale = tl.load(scale_ptr + offs, mask=mask, other=1.0)
    shift = ((scale.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    unscale = ((1023 - shift).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    out = (total.to(tl.float64) * unscale).to(tl.float32)
    tl.store(scale_ptr + offs, tl.where(scale != scale, scale, out), mask=mask)


@triton.heuristics(scan_heuristics(HAS_DLAST_STATE=has("dlast_state_ptr")))
@triton.jit
def selective_scan_bwd_kernel(
    # inputs
    dout_ptr, dlast_state_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr,
    chunk_states_ptr, cu_seqlens_ptr,
    # gradients
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddelta_bias_ptr, dinitial_state_ptr,
    dB_scale_ptr, dC_scale_ptr,  # REDUCE_FIXED: the fixed-point scales from pass 1
    # sizes
    dim, seqlen, d_state, dim_per_group, saved_per_row,
    # strides: as in the forward (dout like u); every gradient is contiguous
    stride_dout_b, stride_dout_d, stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d,
    stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    # width multipliers
    dt_scale, b_scale, c_scale,
    # meta
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, HAS_DLAST_STATE: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr, B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr,
    BLOCK_N: tl.constexpr, CH: tl.constexpr, LANES: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr,
    EVEN: tl.constexpr, FAST_MATH: tl.constexpr, REDUCE: tl.constexpr, VARLEN: tl.constexpr,
):
    """Chunks of LANES * ITEMS steps, the forward's saved states' spacing; the programs' channels
    as in the forward. du, ddelta, dz are (batch, dim, L); variable dB, dC (batch, G, N, L), summed
    over channels as REDUCE says (REDUCE_BOUND writes nothing else); dA, dinitial_state and fixed
    dB, dC (batch, dim, N) and dD, ddelta_bias (batch, dim) are per-batch partials, summed
    afterwards in a fixed order (per sequence under VARLEN, as the states)."""
    WRITE_GRADS: tl.constexpr = REDUCE != REDUCE_BOUND
    d = _channels(tl.program_id(0), CH)
    b, start, first, length, save_base, state = _sequence(cu_seqlens_ptr, d, dim, seqlen, LANES * ITEMS, VEC, VARLEN)
    channel = b * dim + d
    group = tl.program_id(0) * CH // dim_per_group
    groups = dim // dim_per_group
    lane = tl.arange(0, LANES)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_state

    dout_rows = dout_ptr + _channel_axis(b * stride_dout_b + d * stride_dout_d + start, CH)
    u_rows = u_ptr + _channel_axis(b * stride_u_b + d * stride_u_d + start, CH)
    delta_rows = delta_ptr + _channel_axis(b * stride_delta_b + d * stride_delta_d + start, CH)
    grad_rows = _channel_axis(channel * seqlen + start, CH)  # du, ddelta, dz
    B_row = B_ptr + b * stride_B_b + group * stride_B_g + start
    C_row = C_ptr + b * stride_C_b + group * stride_C_g + start
    A, B_fixed, C_fixed, D, bias = _channel_params(A_ptr, B_ptr, C_ptr, D_ptr, delta_bias_ptr, d, d_state, offs_n,
                                                   mask_n, HAS_D, HAS_DELTA_BIAS, B_VARIABLE, C_VARIABLE, CH)
    dBC_row = (b * groups + group) * d_state * seqlen + start  # variable dB, dC: (batch, G, N, L)
    n_chunks = tl.cdiv(length, LANES * ITEMS)
    saved = chunk_states_ptr + _column((channel * saved_per_row + save_base) * d_state, CH) + offs_n

    # dL/dh of the state leaving the current chunk, from every later step (and from last_state).
    if HAS_DLAST_STATE:
        dcarry = tl.load(dlast_state_ptr + _column(state, CH) * d_state + offs_n, mask=mask_n,
                         other=0.0)
    else:
        dcarry = tl.zeros(A.shape, tl.float32)
    dA = tl.zeros(A.shape, tl.float32)
    dB_fixed = tl.zeros(A.shape, tl.float32)
    dC_fixed = tl.zeros(A.shape, tl.float32)
    dD = _per_lane_zeros(LANES, CH)
    dbias = _per_lane_zeros(LANES, CH)

    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = _time_offsets(c * LANES * ITEMS, LANES, ITEMS, VEC, CH)
        mask = None if EVEN else _in_sequence(t, first, length, VARLEN)
        h_start = tl.load(saved + c * d_state, mask=mask_n, other=0.0)
        # u, dout, z and d dt / d(pre-activation) are loaded again after the state loop rather
        # than kept live through it (registers)
        u = _load_tile_f32(u_rows, t, mask, LANES, ITEMS, VEC)
        delta = _load_tile_f32(delta_rows, t, mask, LANES, ITEMS, VEC)
        dt = discretize(delta, _on_tiles(bias, CH), dt_scale, HAS_DELTA_BIAS, DELTA_SOFTPLUS, FAST_MATH)[0]
        if not EVEN:
            dt = tl.where(_items_first(mask, LANES, ITEMS, VEC), dt, 0.0)
        dtu = dt * u * b_scale
        dt_lane = tl.sum(dt, 0)
        # sum of each lane's decays toward the next step, a_{t+1}: 1 after the chunk's last step
        dt_first = _item(dt, 0, _item_index(dt))
        dt_after = tl.where(lane == LANES - 1, 0.0, _from_lane(dt_first, tl.minimum(_lanes(dt_first) + 1, LANES - 1)))
        dt_next_lane = dt_lane - dt_first + dt_after
        dy = _load_tile_f32(dout_rows, t, mask, LANES, ITEMS, VEC)
        if HAS_Z:  # out = y * silu(z); dz is computed after the state loop, which accumulates y
            z_rows = z_ptr + _channel_axis(b * stride_z_b + d * stride_z_d + start, CH)
            z = _load_tile_f32(z_rows, t, mask, LANES, ITEMS, VEC)
            dy *= z * sigmoid(z, FAST_MATH)
            y = tl.zeros(dt.shape, tl.float32)
        dyc = dy * c_scale
        dx = tl.zeros(dt.shape, tl.float32)  # sum over n of g_t B_t: du and ddelta through x
        ddt_decay = tl.zeros(dt.shape, tl.float32)  # sum over n of g_t A a_t h_{t-1}
        if B_VARIABLE:
            B = _state_tile(B_row, 0, stride_B_n, d_state, t, mask, LANES, ITEMS, VEC)
        if C_VARIABLE:
            C = _state_tile(C_row, 0, stride_C_n, d_state, t, mask, LANES, ITEMS, VEC)
        # REDUCE_FIXED: state 0's scales of variable dB, dC (elsewhere an unused 0, carried through the loop)
        FIXED_B: tl.constexpr = B_VARIABLE and REDUCE == REDUCE_FIXED
        FIXED_C: tl.constexpr = C_VARIABLE and REDUCE == REDUCE_FIXED
        dB_scale = _scale_tile(dB_scale_ptr, dBC_row, 0, d_state, seqlen, t, mask) if FIXED_B else 0.0
        dC_scale = _scale_tile(dC_scale_ptr, dBC_row, 0, d_state, seqlen, t, mask) if FIXED_C else 0.0
        for n in range(0, d_state):
            if not B_VARIABLE:
                B = tl.expand_dims(_pick(B_fixed, n, LANES), 0)
            A_n = _pick(A, n, LANES)
            A2 = log2_decay_rate(A_n)
            # the chunk's states again, from the saved one
            a = tl.exp2(dt * tl.expand_dims(A2, 0))
            x = dtu * B
            entering, _ = _lane_states(_lane_exp2(dt_lane * A2), _lane_aggregate(a, x), _pick(h_start, n, LANES),
                                       LANES, False)
            h = _scan_items(a, x, entering)
            decayed = a * _shift_to_later(h, entering)  # a_t h_{t-1}
            # adjoint g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}
            a_first = _item(a, 0, _item_index(a))
            a_after = tl.where(lane == LANES - 1, 1.0, _from_lane(a_first, tl.minimum(_lanes(a_first) + 1, LANES - 1)))
            a_next = _shift_to_earlier(a, a_after)
            if C_VARIABLE:  # C is loaded for the next state right after its last use
                v = C * dyc
                if HAS_Z:
                    y += C * h
                C = _state_tile(C_row, n + 1, stride_C_n, d_state, t, mask, LANES, ITEMS, VEC)
            else:
                C_n = tl.expand_dims(_pick(C_fixed, n, LANES), 0)
                v = C_n * dyc
                if HAS_Z:
                    y += C_n * h
            g_entering, g_total = _lane_states(_lane_exp2(dt_next_lane * A2), _lane_aggregate_reverse(a_next, v),
                                               _pick(dcarry, n, LANES), LANES, True)
            g = _scan_items_reverse(a_next, v, g_entering)
            # dL/dh_{t0 - 1} = a_{t0} g_{t0}, carried to the previous chunk
            dcarry = _with_element(dcarry, n, _from_lane(a_first, tl.zeros(a_first.shape, tl.int32)) * g_total,
                                   LANES - 1)

            dB_fixed, dB_scale = _state_matrix_grad(dB_ptr, dB_scale_ptr, dB_fixed, dB_scale, g * dtu, dBC_row, n,
                                                    d_state, seqlen, t, mask, B_VARIABLE, REDUCE, LANES, ITEMS, VEC)
            dC_fixed, dC_scale = _state_matrix_grad(dC_ptr, dC_scale_ptr, dC_fixed, dC_scale, h * dyc, dBC_row, n,
                                                    d_state, seqlen, t, mask, C_VARIABLE, REDUCE, LANES, ITEMS, VEC)
            dx += g * B
            if B_VARIABLE:
                B = _state_tile(B_row, n + 1, stride_B_n, d_state, t, mask, LANES, ITEMS, VEC)
            g_decayed = g * decayed
            ddt_decay += g_decayed * tl.expand_dims(A_n, 0)
            dA = _add_at(dA, n, _sum_all(g_decayed * dt))

        if WRITE_GRADS:
            u = _load_tile_f32(u_rows, t, mask, LANES, ITEMS, VEC)
            ddt = discretize(_load_tile_f32(delta_rows, t, mask, LANES, ITEMS, VEC), _on_tiles(bias, CH), dt_scale,
                              HAS_DELTA_BIAS, DELTA_SOFTPLUS, FAST_MATH)[1]
            if not EVEN:
                ddt = tl.where(_items_first(mask, LANES, ITEMS, VEC), ddt, 0.0)
            dy = _load_tile_f32(dout_rows, t, mask, LANES, ITEMS, VEC)
            if HAS_Z:
                y = y * c_scale
                if HAS_D:
                    y += _on_tiles(D, CH) * u
                z = _load_tile_f32(z_rows, t, mask, LANES, ITEMS, VEC)
                sig = sigmoid(z, FAST_MATH)
                dz = dy * y * sig * (1.0 + z * (1.0 - sig))
                _store_tile(dz_ptr + grad_rows, t, mask, dz, LANES, ITEMS, VEC)
                dy *= z * sig
            du = dx * dt * b_scale
            if HAS_D:
                du += _on_tiles(D, CH) * dy
                dD += tl.sum(dy * u, 0)
            _store_tile(du_ptr + grad_rows, t, mask, du, LANES, ITEMS, VEC)
            dpre = (dx * u * b_scale + ddt_decay) * ddt
            _store_tile(ddelta_ptr + grad_rows, t, mask, dpre * dt_scale, LANES, ITEMS, VEC)
            dbias += tl.sum(dpre, 0)

    if WRITE_GRADS:
        states = _column(state, CH) * d_state + offs_n  # the (batch, dim, N) partials' elements
        tl.store(dinitial_state_ptr + states, dcarry, mask=mask_n)
        tl.store(dA_ptr + states, dA, mask=mask_n)
        if not B_VARIABLE:
            tl.store(dB_ptr + states, dB_fixed, mask=mask_n)
        if not C_VARIABLE:
            tl.store(dC_ptr + states, dC_fixed, mask=mask_n)
        if HAS_D:
            tl.store(dD_ptr + state, _per_channel(dD))
        if HAS_DELTA_BIAS:
            tl.store(ddelta_bias_ptr + state, _per_channel(dbias))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

class Geometry:
    """Tile sizes of one call. On a GPU a lane is a thread and LANES = 32 one warp. The
    interpreter (CPU tensors) runs the same code on small tiles, so that tests of a few dozen
    steps cross several chunks and the forward's chunks differ from the backward's."""

    def __init__(self, seqlen: int, d_state: int, io_dtypes, device: torch.device, num_seqs: int = 0,
                 dim_per_group: int = 1, deterministic: bool = False):
        on_gpu = device.type != "cpu"  # the interpreter runs CPU tensors; "meta" compiles for the GPU
        self.lanes = 32 if on_gpu else 4
        items = triton.next_power_of_2(triton.cdiv(seqlen, self.lanes))
        # The backward keeps about twice as many values per item live as the forward: 8 and 16
        # items per lane fit in 255 registers without spills (benchmarks/tools/compile_for_gpu.py).
        max_fwd, max_bwd = (16, 8) if on_gpu else (8, 4)
        self.items_bwd = min(items, max_bwd)
        self.items_fwd = max(min(items, max_fwd), self.items_bwd)
        # Consecutive steps per vector load: 16 bytes of the widest io dtype, at most 4 steps (8
        # bf16 steps spill registers where rows are not 16-byte aligned); 2 on the CPU, so that
        # the tests cover several vectors per lane.
        vec = min([4] + [16 // dtype.itemsize for dtype in io_dtypes]) if on_gpu else 2
        self.vec = min(vec, self.items_bwd)
        self.block_n = triton.next_power_of_2(d_state)
        self.state_chunk = self.lanes * self.items_bwd  # steps between the states the forward saves
        # saved-state slots per row; packed sequences (num_seqs > 0) start each at its own slot
        self.n_saved = triton.cdiv(seqlen, self.state_chunk) + num_seqs
        self.even_fwd = not num_seqs and seqlen % (self.lanes * self.items_fwd) == 0  # no partial chunk: no masks
        self.even_bwd = not num_seqs and seqlen % self.state_chunk == 0
        self.fast_math = on_gpu
        self.num_warps = 1  # one warp per program: LANES lanes
        # Channels per program, side by side in each lane's registers: they share every load of
        # variable B and C and sum their dB and dC terms before the atomics, so both cost half per
        # channel. Two channels (of one group) where the registers allow it without spills: whole
        # chunks (no masks) and N <= 16, the common Mamba case, and not in the deterministic
        # backward's passes; one elsewhere. docs/kernel_design.md has the designs tried and their
        # figures.
        two = dim_per_group % 2 == 0 and self.block_n <= 16
        self.channels_fwd = 2 if two and self.even_fwd else 1
        self.channels_bwd = 2 if two and self.even_bwd and not deterministic else 1

    @classmethod
    def of(cls, u, B, C, z=None, cu_seqlens=None, groups=1, deterministic=False):
        io_dtypes = [u.dtype] + [t.dtype for t in (B, C, z) if t is not None and t.dim() >= 3]
        return cls(u.shape[2], B.shape[-2] if B.dim() == 4 else B.shape[1], io_dtypes, u.device,
                   0 if cu_seqlens is None else cu_seqlens.numel() - 1, u.shape[1] // groups, deterministic)


def _time_contiguous(t):
    """The tensor itself when its last stride is 1 (any other strides are passed to the
    kernels), else a contiguous copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _state_matrix(X):
    """Fixed B or C contiguous; variable ones in their own dtype with time contiguous (a program
    loads them once for its channels and converts them to fp32 in registers)."""
    return X.contiguous() if X.dim() == 2 else _time_contiguous(X)


def _input_strides(**inputs) -> dict:
    """The kernels' stride keywords: (batch, dim) of each (batch, dim, L) input given by name, and
    (batch, group, n) of B and C when variable (zeros when fixed or absent); time is contiguous."""
    out = {}
    for name, t in inputs.items():
        if name in ("B", "C"):
            out.update(strides(name, t if t.dim() == 4 else None, "bgn"))
        else:
            out.update(strides(name, t, "bd"))
    return out


def selective_scan_fwd_triton(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, initial_state=None, config):
    """Forward. B, C as returned by check_inputs; config a ScanConfig. Returns (out, last_state,
    chunk_states)."""
    groups, cu_seqlens = config.groups, config.cu_seqlens
    batch, dim, seqlen = u.shape
    N = A.shape[1]
    u, delta, z = _time_contiguous(u), _time_contiguous(delta), _time_contiguous(z)
    B, C = _state_matrix(B), _state_matrix(C)
    geo = Geometry.of(u, B, C, z, cu_seqlens, groups)
    rows = state_rows(batch, cu_seqlens)  # programs per channel: a batch row or a packed sequence each
    out = new_buffer(batch, dim, seqlen, dtype=u.dtype, device=u.device)
    last_state = new_buffer(rows, dim, N, dtype=torch.float32, device=u.device)
    # packed: zeros, since the slots between sequences are never written and the op returns every slot
    chunk_states = (new_buffer if cu_seqlens is None else torch.zeros)(batch, dim, geo.n_saved, N,
                                                                       dtype=torch.float32, device=u.device)
    selective_scan_fwd_kernel[(dim // geo.channels_fwd, rows)](
        u_ptr=u, delta_ptr=delta, A_ptr=A.contiguous(), B_ptr=B, C_ptr=C, D_ptr=contiguous(D), z_ptr=z,
        delta_bias_ptr=contiguous(delta_bias), initial_state_ptr=contiguous(initial_state),
        cu_seqlens_ptr=contiguous(cu_seqlens),
        out_ptr=out, last_state_ptr=last_state, chunk_states_ptr=chunk_states,
        dim=dim, seqlen=seqlen, d_state=N, dim_per_group=dim // groups, saved_per_row=geo.n_saved,
        **_input_strides(u=u, delta=delta, z=z, B=B, C=C),
        **config.multipliers,
        DELTA_SOFTPLUS=config.delta_softplus, BLOCK_N=geo.block_n, CH=geo.channels_fwd, LANES=geo.lanes,
        ITEMS=geo.items_fwd, VEC=geo.vec,
        SAVE_LANES=geo.state_chunk // geo.items_fwd, EVEN=geo.even_fwd, FAST_MATH=geo.fast_math,
        num_warps=geo.num_warps,
    )
    return out, last_state, chunk_states


def selective_scan_bwd_triton(dout, dlast_state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                              chunk_states, config):
    """Backward from the saved chunk states; same returns as selective_scan_bwd_torch. Variable
    dB and dC are summed over channels by fp32 atomics, or, under config.deterministic, by the
    two integer passes of _deterministic_state_grads."""
    groups, cu_seqlens, deterministic = config.groups, config.cu_seqlens, config.deterministic
    batch, dim, seqlen = u.shape
    N = A.shape[1]
    dout, u, delta, z = (_time_contiguous(t) for t in (dout, u, delta, z))
    B_dtype, C_dtype = B.dtype, C.dtype
    B, C = _state_matrix(B), _state_matrix(C)
    geo = Geometry.of(u, B, C, z, cu_seqlens, groups, deterministic)
    rows = state_rows(batch, cu_seqlens)  # the partials and states: per row, or per packed sequence
    f32 = dict(dtype=torch.float32, device=u.device)
    du = new_buffer(batch, dim, seqlen, dtype=u.dtype, device=u.device)
    ddelta = new_buffer(batch, dim, seqlen, dtype=delta.dtype, device=u.device)
    dz = None if z is None else new_buffer(batch, dim, seqlen, dtype=z.dtype, device=u.device)
    dA = new_buffer(rows, dim, N, **f32)
    dinitial_state = new_buffer(rows, dim, N, **f32)
    dD = None if D is None else new_buffer(rows, dim, **f32)
    ddelta_bias = None if delta_bias is None else new_buffer(rows, dim, **f32)

    def launch(reduce, dB_target, dC_target, dB_scale=None, dC_scale=None):
        selective_scan_bwd_kernel[(dim // geo.channels_bwd, rows)](
            dout_ptr=dout, dlast_state_ptr=contiguous(dlast_state), u_ptr=u, delta_ptr=delta, A_ptr=A.contiguous(),
            B_ptr=B, C_ptr=C, D_ptr=contiguous(D), z_ptr=z, delta_bias_ptr=contiguous(delta_bias),
            chunk_states_ptr=chunk_states, cu_seqlens_ptr=contiguous(cu_seqlens),
            du_ptr=du, ddelta_ptr=ddelta, dz_ptr=dz, dA_ptr=dA, dB_ptr=dB_target, dC_ptr=dC_target, dD_ptr=dD,
            ddelta_bias_ptr=ddelta_bias, dinitial_state_ptr=dinitial_state,
            dB_scale_ptr=dB_scale, dC_scale_ptr=dC_scale,
            dim=dim, seqlen=seqlen, d_state=N, dim_per_group=dim // groups, saved_per_row=geo.n_saved,
            **_input_strides(dout=dout, u=u, delta=delta, z=z, B=B, C=C),
            **config.multipliers,
            DELTA_SOFTPLUS=config.delta_softplus, BLOCK_N=geo.block_n, CH=geo.channels_bwd, LANES=geo.lanes,
            ITEMS=geo.items_bwd, VEC=geo.vec,
            EVEN=geo.even_bwd, FAST_MATH=geo.fast_math, REDUCE=reduce, num_warps=geo.num_warps,
        )

    def channel_sum_buffer(X, dtype):  # variable dB, dC: (batch, G, N, L), every channel adds to it
        return torch.zeros(batch, groups, N, seqlen, dtype=dtype, device=u.device) if X.dim() == 4 else None

    # fixed dB, dC: per-row partials (rows, dim, N), summed below
    dB_fixed, dC_fixed = (new_buffer(rows, dim, N, **f32) if X.dim() == 2 else None for X in (B, C))
    if deterministic and (B.dim() == 4 or C.dim() == 4):
        dB, dC = _deterministic_state_grads(launch, channel_sum_buffer, (B, C), (dB_fixed, dC_fixed), dim // groups)
    else:  # REDUCE_ATOMIC: one pass
        dB = dB_fixed if dB_fixed is not None else channel_sum_buffer(B, torch.float32)
        dC = dC_fixed if dC_fixed is not None else channel_sum_buffer(C, torch.float32)
        launch(REDUCE_ATOMIC, dB, dC)
    # Fixed-order sums over batch: deterministic.
    def state_matrix_result(dX, X, dtype):
        return (dX.sum(0) if X.dim() == 2 else dX).to(dtype)
    return (du, ddelta, dA.sum(0).to(A.dtype), state_matrix_result(dB, B, B_dtype), state_matrix_result(dC, C, C_dtype),
            None if D is None else dD.sum(0).to(D.dtype), dz,
            None if delta_bias is None else ddelta_bias.sum(0).to(delta_bias.dtype), dinitial_state)


def _deterministic_state_grads(launch, channel_sum_buffer, state_matrices, fixed_partials, dim_per_group):
    """(dB, dC) from two backward passes whose channel sums are integer atomics (their order does
    not change the result): REDUCE_BOUND finds every element's largest |term|, which becomes its
    fixed-point scale; REDUCE_FIXED adds the scaled terms as int64, turned back into fp32 here.
    The int64 sums are the only extra memory (8 bytes per element of variable dB and dC); the
    int32 bounds become the scales, then the results. A fixed B or C keeps its per-row partials."""
    headroom = (dim_per_group - 1).bit_length() + 1  # 2^(headroom - 1) >= the channels summed per element
    bounds = [channel_sum_buffer(X, torch.int32) for X in state_matrices]
    launch(REDUCE_BOUND, *bounds)
    scales = [None if b is None else _fixed_point_scales(b, headroom) for b in bounds]
    sums = [channel_sum_buffer(X, torch.int64) for X in state_matrices]
    launch(REDUCE_FIXED, *(fixed if total is None else total for fixed, total in zip(fixed_partials, sums)), *scales)
    return tuple(fixed if total is None else _fixed_point_to_float(total, scale)
                 for fixed, total, scale in zip(fixed_partials, sums, scales))


def _fixed_point_scales(bound, headroom, block=1024):
    scale = bound.view(torch.float32)
    fixed_point_scale_kernel[(triton.cdiv(bound.numel(), block),)](
        bound_ptr=bound, scale_ptr=scale, numel=bound.numel(), headroom=headroom, BLOCK=block)
    return scale


def _fixed_point_to_float(total, scale, block=1024):
    fixed_point_to_float_kernel[(triton.cdiv(total.numel(), block),)](
        sum_ptr=total, scale_ptr=scale, numel=total.numel(), BLOCK=block)
    return scale


def triton_chunk_size(seqlen: int, device: torch.device) -> int:
    """Steps between the states the forward saves for the backward."""
    return Geometry(seqlen, 1, [torch.float32], device).state_chunk
