"""Context (sequence) parallelism: the selective scan and the causal conv's halo with the sequence
split over the ranks of a torch.distributed process group.

Each rank of `group` holds a contiguous shard of time, in rank order; shards may have any
length (different per rank, 0 included). What crosses ranks never grows with L:

- scan: every rank but the first scans its shard from a zero state. Its summary is the shard's
  total decay exp(A * sum_t dt_t) and that final state, (batch, dim, N) each. One all-gather
  shares the summaries; each rank folds the ones before it (h -> decay * h + final, an
  exclusive scan over ranks) into its incoming state and reruns its shard from there. The
  first rank starts from `initial_state` and needs no rerun. Cost: about two local scans
  (forward and backward) on ranks after the first, plus 2 * world * batch * dim * N numbers.
- conv: the last d_conv - 1 inputs before the shard (the halo), from the ranks before it.

Communication: torch.distributed's all_gather in the forward and reduce_scatter in the
backward, wrapped in one small autograd Function (`_AllGather`), so autograd carries
d(state) backwards across ranks. Collectives rather than point-to-point: every rank sees
every summary, so each can also form the global last state, and a shard shorter than the
halo is handled instead of deadlocking; gloo (CPU) and NCCL both implement these two.
This file is at the ops layer: it builds on the scan's run_scan and knows no module.
"""

from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..ops.selective_scan.backends import BACKENDS
from ..ops.selective_scan.config import ScanConfig
from ..ops.selective_scan.interface import run_scan, scan_config
from ..ops.selective_scan.naive import discretize_dt


class _AllGather(torch.autograd.Function):
    """(shape) on each rank -> (world, *shape) on every rank, rank order; the gradient of a
    rank's slice is the sum over ranks of their gradients for it (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        ctx.group = group
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad[0])
        dist.reduce_scatter(out, list(grad.unbind(0)), group=ctx.group)
        return out, None


class _Tied(torch.autograd.Function):
    """out, unchanged, made to depend on a gathered tensor, so that every rank's backward enters
    that gather's collective, also where the output does not need it (the first rank's halo and
    scan, an empty shard). Collectives must be entered by all ranks alike, in the same order: on
    every rank a layer's backward then runs the scan's collective, then the conv's."""

    @staticmethod
    def forward(ctx, out: Tensor, gathered: Tensor) -> Tensor:
        ctx.gathered_shape = gathered.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, grad.new_zeros(ctx.gathered_shape)


def _tied(out: Tensor, gathered: Tensor) -> Tensor:
    return _Tied.apply(out, gathered) if torch.is_grad_enabled() and gathered.requires_grad else out


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Every rank's `x` (same shape everywhere), stacked in rank order; differentiable."""
    return _AllGather.apply(x, group)


def _require_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialized "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return group if group is not None else dist.group.WORLD


def shard_lengths(seqlen: int, device: torch.device, group=None) -> List[int]:
    """The shard length of every rank of `group`, rank order (one tiny all-gather)."""
    group = _require_group(group)
    mine = torch.tensor([seqlen], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [int(p.item()) for p in parts]


def previous_inputs(x: Tensor, width: int, group=None) -> Tensor:
    """The `width` steps of the sequence just before this rank's shard x (batch, dim, L_local):
    the causal conv's halo, (batch, dim, width), zeros before the start of the sequence. Taken
    from as many earlier ranks as it needs, so shards shorter than `width` are fine.
    Differentiable: the halo's gradient goes back to the ranks it came from."""
    group = _require_group(group)
    if x.dim() != 3:
        raise ValueError(f"x: expected (batch, dim, L), got shape {tuple(x.shape)}")
    batch, dim, seqlen = x.shape
    if width == 0:
        return x.new_zeros(batch, dim, 0)
    lengths = shard_lengths(seqlen, x.device, group)
    tail = x[..., -width:] if seqlen >= width else F.pad(x, (width - seqlen, 0))
    tails = all_gather_with_grad(tail, group)  # (world, batch, dim, width)
    rank = dist.get_rank(group)
    pieces = [tails[j][..., width - min(lengths[j], width):] for j in range(rank)]
    before = torch.cat(pieces, dim=-1)[..., -width:] if pieces else x.new_zeros(batch, dim, 0)
    return _tied(F.pad(before, (width - before.shape[-1], 0)), tails)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _layout(X) -> int:
    """B or C: 0 fixed (dim, N), 1 variable (batch, N, L), G + 1 grouped (batch, G, N, L)."""
    if not isinstance(X, Tensor):
        return -1
    return {2: 0, 3: 1}.get(X.dim(), X.shape[1] + 1 if X.dim() == 4 else -1)


def _check_ranks_agree(group, device, fields: dict) -> None:
    """What every rank of the group must share (sizes, dtypes, layouts, flags, multipliers), in one
    small all-gather: a rank that differs would otherwise leave the collectives below mismatched
    (a gloo abort, or a hang). Raises the same ValueError, naming the argument, on every rank."""
    mine = torch.tensor([float(v) for v in fields.values()], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu()
    for i, name in enumerate(fields):
        column = table[:, i]
        if not bool((column == column[0]).all()):
            shown = [_DTYPES[int(v)] if "dtype" in name and v >= 0 else int(v) if v.is_integer() else v
                     for v in column.tolist()]
            raise ValueError(f"{name}: must be the same on every rank of the context-parallel group, got "
                             + ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown)))


def _empty_output(u, D, z, B, C) -> Tensor:
    """An empty shard's output, (batch, dim, 0), computed from D, z and fixed B/C, so that autograd
    reaches them on this rank too (zero gradients): DDP expects every parameter's gradient on
    every rank. Only empty tensors and sums over nothing are involved, never a value."""
    out = u.clone() if D is None else u * D.to(u.dtype)[:, None]
    for X in (B, C):
        if X.dim() == 2:  # fixed (dim, N): a sum over a zero-length slice is 0
            out = out + X[:, :0].sum(-1).to(u.dtype)[:, None]
    return out if z is None else out * F.silu(z)


def selective_scan_cp(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, dt_scale=1.0, b_scale=1.0, c_scale=1.0, initial_state=None,
                      group=None, backend=None):
    """selective_scan_fn with the sequence split over the ranks of `group` (default: the world).

    Each rank passes its own contiguous shard of time, rank order = time order: u, delta, z
    (batch, dim, L_rank) and variable/grouped B, C (batch, [G,] N, L_rank); L_rank may differ
    between ranks and may be 0. A, D, delta_bias, fixed B/C and the multipliers are the same on
    every rank. `initial_state` (batch, dim, N), the state before the whole sequence, is read
    on the group's first rank only (others may pass None).

    Returns this rank's shard of `out`, and with return_last_state the state after the whole
    sequence, the same on every rank. Forward and backward are exact (up to rounding): each
    rank reruns its shard from the true incoming state. Gradients of sharded inputs are this
    shard's; replicated inputs (A, D, delta_bias, fixed B/C) get this rank's share, so sum them
    over the group, as DDP/FSDP do for parameters. The last state's gradient is taken on
    every rank where it is used.
    """
    config = scan_config(u, delta_softplus=delta_softplus, dt_scale=dt_scale, b_scale=b_scale, c_scale=c_scale,
                         backend=backend)
    return scan_cp(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                   return_last_state=return_last_state, group=group, config=config)


def scan_cp(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, initial_state=None, return_last_state=False,
            group=None, config: ScanConfig):
    """selective_scan_cp for a config that scan_config made (without cu_seqlens)."""
    group = _require_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError(f"u: expected (batch, dim, L) on each rank, got {getattr(u, 'shape', type(u).__name__)}")
    h0 = initial_state if rank == 0 else None
    state_dtype = BACKENDS[config.backend].state_dtype(u, A, B, C, h0)
    batch, dim, seqlen = u.shape
    d_state = A.shape[-1]
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
    _check_ranks_agree(group, u.device, {
        "u (batch)": batch, "u (dim)": dim, "A (d_state)": d_state, "u (dtype)": _dtype_code(u.dtype),
        "initial_state (the state's dtype)": _dtype_code(state_dtype), "B (layout)": _layout(B),
        "C (layout)": _layout(C), "D (given)": D is not None, "z (given)": z is not None,
        "delta_bias (given)": delta_bias is not None, "delta_softplus": config.delta_softplus, **config.multipliers,
        "requires_grad (of any input)": needs_grad})

    def scan(D_, z_, start, last_state):
        return run_scan(u, delta, A, B, C, D=D_, z=z_, delta_bias=delta_bias, initial_state=start,
                        return_last_state=last_state, config=config)

    # 1. this shard's summary: (total decay, final state from this rank's start)
    out = None
    if seqlen == 0:
        final = h0.to(state_dtype) if h0 is not None else u.new_zeros(batch, dim, d_state, dtype=state_dtype)
        out = _empty_output(u, D, z, B, C)
    elif rank == 0:
        out, final = scan(D, z, h0, True)
    else:
        _, final = scan(None, None, None, True)  # only its final state is needed
    # exp(A * sum dt), from the inputs even for an empty shard (then 1), so that autograd reaches the
    # collective below from every rank's parameters; a growing shard stops at the largest float
    total_dt = discretize_dt(delta.to(state_dtype), None if delta_bias is None else delta_bias.to(state_dtype),
                             config.delta_softplus, config.dt_scale).sum(-1)  # (batch, dim)
    decay = torch.exp(A.to(state_dtype) * total_dt[..., None]).clamp(max=torch.finfo(state_dtype).max)
    summary = torch.stack([decay, final.to(state_dtype)])
    if needs_grad and not summary.requires_grad:  # an empty shard: still part of every rank's backward
        summary.requires_grad_()
    summaries = all_gather_with_grad(summary, group)  # (world, 2, batch, dim, N)

    # 2. the incoming state: fold the ranks before this one
    def fold(upto):
        h = None
        for j in range(upto):
            h = summaries[j, 1] if h is None else summaries[j, 0] * h + summaries[j, 1]
        return h

    if out is None:  # ranks after the first rerun their shard from the true incoming state
        out = scan(D, z, fold(rank), False)
    out = _tied(out, summaries)
    if not return_last_state:
        return out
    return out, fold(world)


def shard_for_next_token(input_ids: Tensor, group=None):
    """(inputs, labels) of this rank for next-token training on input_ids (batch, L), the same
    tensor on every rank: inputs = input_ids[:, :-1] and labels = input_ids[:, 1:], both cut
    along time into world contiguous shards (torch.tensor_split: sizes differ by at most one).
    Sum the per-token losses over ranks and divide by batch * (L - 1) for the mean."""
    group = _require_group(group)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected (batch, L) with L >= 2, got shape {tuple(input_ids.shape)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    inputs = input_ids[:, :-1].tensor_split(world, dim=1)[rank]
    labels = input_ids[:, 1:].tensor_split(world, dim=1)[rank]
    return inputs, labels
