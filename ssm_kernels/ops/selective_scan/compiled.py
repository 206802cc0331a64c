"""The "cpp" backend: the compiled CPU kernels of csrc/ (ssm_kernels._C), built only on request
(SSM_KERNELS_BUILD_EXT=1 at install time; see csrc/README.md).

This module lays the inputs out as csrc/cpu/scan_args.h expects, allocates every output and
reduces the kernels' partial sums in a fixed order, so results do not depend on the thread
count. The kernels compute in float32 (float64 when any of u, A, B, C, initial_state is
float64); float16/bfloat16 activations are converted on the way in and out, a pass that costs
little beside the scan's d_state-times-larger work.
"""

import functools

import torch

from ..utils import new_buffer
from .chunk_torch import compute_dtype

CHUNK_SIZE = 64  # steps between the saved states
LANE_BYTES = 64  # the kernels' state loops run over whole 64-byte vectors
MAX_BLOCKS = 8  # backward tasks per (sequence, group): the variable dB/dC partials kept


@functools.lru_cache(maxsize=None)
def _extension():
    """(ssm_kernels._C, None), or (None, the ImportError); tried once, since the default backend
    asks on every CPU call and a failing import searches the file system each time."""
    try:
        from ... import _C
    except ImportError as e:
        return None, e
    return _C, None


def extension_unavailable_reason():
    """None when ssm_kernels._C imports, else why not (with how to build it)."""
    ext, error = _extension()
    if ext is not None:
        return None
    return (f"needs the compiled extension, which is not built ({error}); build it with "
            "`SSM_KERNELS_BUILD_EXT=1 pip install -e . --no-build-isolation`")


def cpp_unavailable(device):
    if device.type != "cpu":
        return f"runs on CPU tensors only, got {device.type} tensors"
    return extension_unavailable_reason()


def _ext():
    ext, error = _extension()
    if ext is None:
        raise RuntimeError(extension_unavailable_reason()) from error
    return ext


def _padded(d_state, acc):
    lanes = LANE_BYTES // torch.empty((), dtype=acc).element_size()
    return -(-d_state // lanes) * lanes


def _pad_states(X, P, value: float = 0.0):
    """(..., N) -> (..., P) contiguous, padded with `value` (0 unless said)."""
    N = X.shape[-1]
    if N == P:
        return X.contiguous()
    return torch.nn.functional.pad(X, (0, P - N), value=value).contiguous()


class _Inputs:
    """The kernels' layout of a call's tensors (compute dtype R, contiguous, states padded to P)."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, acc, cu_seqlens, chunk):
        batch, dim, seqlen = u.shape
        self.N = A.shape[1]
        self.P = _padded(self.N, acc)

        def act(t):
            return None if t is None else t.to(acc).contiguous()
        self.u, self.delta, self.z = act(u), act(delta), act(z)
        # A's padding is -1, not 0: dt = +inf times 0 would be NaN in the padded decays, and the
        # backward's lane sums would carry it (the padded states and B, C stay 0 either way)
        self.A = _pad_states(A.to(acc), self.P, value=-1.0)
        # fixed (dim, N) -> (dim, P); variable (batch, G, N, L) -> (batch, G, L, P): states last
        self.B, self.C = (_pad_states(X.to(acc) if X.dim() == 2 else X.to(acc).transpose(-1, -2), self.P)
                          for X in (B, C))
        self.D = None if D is None else D.to(acc).contiguous()
        self.bias = None if delta_bias is None else delta_bias.to(acc).contiguous()
        self.seqs = _sequence_table(batch, seqlen, cu_seqlens, chunk)

    def common(self, config, chunk):
        return dict(u=self.u, delta=self.delta, A=self.A, B=self.B, C=self.C, D=self.D, z=self.z,
                    delta_bias=self.bias, seqs=self.seqs, groups=config.groups, chunk=chunk,
                    softplus=bool(config.delta_softplus), **config.multipliers)


def _sequence_table(batch, seqlen, cu_seqlens, chunk):
    """(4, n_seqs) int64: batch row, first step, end step, first saved-state slot of each sequence
    (a batch row each, or the packed sequences of row 0 with the torch backend's slot layout)."""
    if cu_seqlens is None:
        rows = torch.arange(batch, dtype=torch.int64)
        return torch.stack([rows, torch.zeros_like(rows), torch.full_like(rows, seqlen), torch.zeros_like(rows)])
    bounds = cu_seqlens.to(device="cpu", dtype=torch.int64)
    starts, ends = bounds[:-1], bounds[1:]
    index = torch.arange(starts.shape[0], dtype=torch.int64)
    return torch.stack([torch.zeros_like(starts), starts, ends, starts // chunk + index]).contiguous()


def _n_slots(seqlen, cu_seqlens, chunk):
    return -(-seqlen // chunk) + (0 if cu_seqlens is None else cu_seqlens.shape[0] - 1)


def selective_scan_fwd_cpp(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, initial_state=None, config,
                           chunk_size: int = CHUNK_SIZE):
    """Forward. B, C as returned by check_inputs; config a ScanConfig. Returns (out, last_state,
    chunk_states)."""
    cu_seqlens = config.cu_seqlens
    acc = compute_dtype(u, A, B, C, initial_state)
    batch, dim, seqlen = u.shape
    x = _Inputs(u, delta, A, B, C, D, z, delta_bias, acc, cu_seqlens, chunk_size)
    rows = x.seqs.shape[1]
    out = new_buffer(batch, dim, seqlen, dtype=acc, device=u.device)
    last_state = new_buffer(rows, dim, x.N, dtype=acc, device=u.device)
    # packed: zeros, since the slots between sequences are never written and the op returns every slot
    states = (new_buffer if cu_seqlens is None else torch.zeros)(batch, dim, _n_slots(seqlen, cu_seqlens, chunk_size),
                                                                  x.N, dtype=acc, device=u.device)
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    _ext().cpu_forward(**x.common(config, chunk_size),
                       initial_state=h0, out=out, last_state=last_state, states=states)
    return out.to(u.dtype), last_state, states


def selective_scan_bwd_cpp(dout, dlast_state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None, chunk_states,
                           config, chunk_size: int = CHUNK_SIZE):
    """Backward from the saved chunk states; always deterministic (partials summed in a fixed
    order). Same returns as selective_scan_bwd_torch."""
    cu_seqlens, groups = config.cu_seqlens, config.groups
    acc = chunk_states.dtype
    batch, dim, seqlen = u.shape
    x = _Inputs(u, delta, A, B, C, D, z, delta_bias, acc, cu_seqlens, chunk_size)
    rows, P, N = x.seqs.shape[1], x.P, x.N
    dpg = dim // groups
    block = -(-dpg // min(dpg, MAX_BLOCKS))
    n_blocks = -(-dpg // block)

    def buf(*shape):
        return new_buffer(*shape, dtype=acc, device=u.device)

    def state_grad(X):  # partials: per (sequence, channel) when fixed, per channel block when variable
        return buf(rows, dim, P) if X.dim() == 2 else buf(n_blocks, batch, groups, seqlen, P)
    grads = dict(du=buf(batch, dim, seqlen), ddelta=buf(batch, dim, seqlen),
                 dz=None if z is None else buf(batch, dim, seqlen), dA=buf(rows, dim, P), dB=state_grad(B),
                 dC=state_grad(C), dD=None if D is None else buf(rows, dim),
                 ddelta_bias=None if delta_bias is None else buf(rows, dim), dinitial_state=buf(rows, dim, N))
    dlast = None if dlast_state is None else dlast_state.to(acc).contiguous()
    _ext().cpu_backward(**x.common(config, chunk_size),
                        states=chunk_states.contiguous(), dout=dout.to(acc).contiguous(), dlast_state=dlast,
                        block=block, **grads)

    def state_matrix_grad(part, X):
        if X.dim() == 2:
            return part.sum(0)[:, :N].to(X.dtype).contiguous()
        return part.sum(0)[..., :N].transpose(-1, -2).to(X.dtype).contiguous()
    g = grads
    return (g["du"].to(u.dtype), g["ddelta"].to(delta.dtype), g["dA"].sum(0)[:, :N].to(A.dtype).contiguous(),
            state_matrix_grad(g["dB"], B), state_matrix_grad(g["dC"], C),
            None if D is None else g["dD"].sum(0).to(D.dtype), None if z is None else g["dz"].to(z.dtype),
            None if delta_bias is None else g["ddelta_bias"].sum(0).to(delta_bias.dtype), g["dinitial_state"])


def cpu_isa():
    """The instruction set the CPU kernels run with (generic, avx2 or avx512)."""
    return _ext().cpu_isa()
