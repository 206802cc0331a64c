"""The "cuda" backend: the time-parallel CUDA kernels of csrc/cuda/ in ssm_kernels._C, built only on
request (SSM_KERNELS_BUILD_EXT=1 where nvcc and a CUDA build of torch are present; csrc/README.md).

This module lays the inputs out as csrc/cuda/scan_cuda.cu expects, allocates every output, and sums
the backward's partials (variable dB/dC per block of 32 channels, the other gradients per
sequence and channel) in a fixed order: the backend gives the same bits every run. The kernels
have run only through the CPU emulation of the tests (tests/test_cuda_emulated.py), never on a GPU.
"""

import contextlib

import torch

from ..utils import new_buffer
from .compiled import _extension, _sequence_table, extension_unavailable_reason

CHUNK_SIZE = 128  # steps between the saved states (kSegmentedChunk)
MAX_D_STATE = 64  # the largest d_state the kernels are instantiated for
CHANNELS_PER_BLOCK = 32  # of the backward: its variable dB/dC partials are per block of these


def _ext():
    ext, error = _extension()
    if ext is None or not hasattr(ext, "cuda_forward"):
        raise RuntimeError(cuda_unavailable(torch.device("cuda"))) from error
    return ext


def cuda_unavailable(device):
    """None when the "cuda" backend runs on tensors of `device`, else why not."""
    if device.type != "cuda":
        return f"runs on CUDA tensors only, got {device.type} tensors"
    reason = extension_unavailable_reason()
    if reason is not None:
        return reason
    ext, _ = _extension()
    if not hasattr(ext, "cuda_forward"):
        return ("needs the extension built with its CUDA part, which this build lacks (built without nvcc or "
                "without a CUDA build of torch); rebuild with `SSM_KERNELS_BUILD_EXT=1 pip install -e . "
                "--no-build-isolation` where both are present")
    return None


def _inputs(u, delta, A, B, C, D, z, delta_bias, config, chunk=CHUNK_SIZE):
    """The kernels' layout (the binding's keyword arguments): activations and variable B/C contiguous
    in one dtype (float32 when they differ, so that nothing is rounded), fixed B/C and A, D,
    delta_bias float32, the sequence table for states every `chunk` steps."""
    variable = [X.dtype for X in (B, C) if X.dim() == 4]
    act = u.dtype if all(dt == u.dtype for dt in variable) else torch.float32

    def activation(t):
        return None if t is None else t.to(act).contiguous()

    def param(t):
        return None if t is None else t.float().contiguous()
    batch, _, seqlen = u.shape
    return dict(u=activation(u), delta=activation(delta), z=activation(z), A=param(A),
                B=activation(B) if B.dim() == 4 else param(B), C=activation(C) if C.dim() == 4 else param(C),
                D=param(D), delta_bias=param(delta_bias),
                seqs=_sequence_table(batch, seqlen, config.cu_seqlens, chunk).to(u.device),
                groups=config.groups, softplus=bool(config.delta_softplus), **config.multipliers)


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def forward_buffers(x, chunk=CHUNK_SIZE, packed=False):
    """The forward's outputs for the layout x (_inputs): states every `chunk` steps, out, last_state."""
    u, N, rows = x["u"], x["A"].shape[1], x["seqs"].shape[1]
    batch, dim, seqlen = u.shape
    f32 = dict(dtype=torch.float32, device=u.device)
    n_slots = -(-seqlen // chunk) + (rows if packed else 0)
    # packed: zeros, since the slots between sequences are never written and the op returns every slot
    return dict(states=(torch.zeros if packed else new_buffer)(batch, dim, n_slots, N, **f32),
                out=new_buffer(batch, dim, seqlen, dtype=u.dtype, device=u.device),
                last_state=new_buffer(rows, dim, N, **f32))


def gradient_buffers(x, blocks):
    """The backward's outputs for the layout x: du, ddelta, dz in the activations' dtype; fp32
    partials of dA, dinitial_state, fixed dB/dC, dD, ddelta_bias per (sequence, channel) and of
    variable dB/dC per block of channels (`blocks` per group)."""
    u, N, rows, groups = x["u"], x["A"].shape[1], x["seqs"].shape[1], x["groups"]
    batch, dim, seqlen = u.shape
    f32 = dict(dtype=torch.float32, device=u.device)

    def activation():
        return new_buffer(batch, dim, seqlen, dtype=u.dtype, device=u.device)

    def state_matrix_partials(X):
        return new_buffer(rows, dim, N, **f32) if X.dim() == 2 else new_buffer(blocks, batch, groups, N, seqlen, **f32)
    return dict(du=activation(), ddelta=activation(), dz=None if x["z"] is None else activation(),
                dA=new_buffer(rows, dim, N, **f32), dB=state_matrix_partials(x["B"]), dC=state_matrix_partials(x["C"]),
                dD=None if x["D"] is None else new_buffer(rows, dim, **f32),
                ddelta_bias=None if x["delta_bias"] is None else new_buffer(rows, dim, **f32),
                dinitial_state=new_buffer(rows, dim, N, **f32))


def summed_gradients(g):
    """The nine gradients from gradient_buffers' partials, summed in a fixed order (the backward's
    return order, in the kernels' dtypes)."""
    def total(name):
        return None if g[name] is None else g[name].sum(0)
    return (g["du"], g["ddelta"], total("dA"), total("dB"), total("dC"), total("dD"), g["dz"], total("ddelta_bias"),
            g["dinitial_state"])


def selective_scan_fwd_cuda(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, initial_state=None, config):
    """Forward. B, C as returned by check_inputs; config a ScanConfig. Returns (out, last_state,
    chunk_states), the states every CHUNK_SIZE steps."""
    x = _inputs(u, delta, A, B, C, D, z, delta_bias, config)
    buffers = forward_buffers(x, packed=config.cu_seqlens is not None)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        _ext().cuda_forward(**x, **buffers, initial_state=h0, stream=_stream(u.device))
    return buffers["out"].to(u.dtype), buffers["last_state"], buffers["states"]


def selective_scan_bwd_cuda(dout, dlast_state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None, chunk_states,
                            config):
    """Backward from the forward's saved states; deterministic (partials summed in a fixed order).
    Same returns as selective_scan_bwd_torch."""
    x = _inputs(u, delta, A, B, C, D, z, delta_bias, config)
    g = gradient_buffers(x, blocks=-(-(u.shape[1] // config.groups) // CHANNELS_PER_BLOCK))
    dlast = None if dlast_state is None else dlast_state.float().contiguous()
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        _ext().cuda_backward(**x, states=chunk_states.contiguous(), dout=dout.to(x["u"].dtype).contiguous(),
                             dlast_state=dlast, **g, stream=_stream(u.device))
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    grads = summed_gradients(g)
    return (*(None if t is None else grad.to(t.dtype) for t, grad in zip(inputs, grads[:8])), grads[8])
