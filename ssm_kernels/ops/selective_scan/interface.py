"""Public selective scan: backend choice, torch.library registration and autograd.

The forward and the backward are each one custom op (`ssm_kernels::selective_scan_fwd`,
`ssm_kernels::selective_scan_bwd`), so `torch.compile(fullgraph=True)` sees an opaque call
with known output shapes instead of tracing into Triton or a Python loop. The op's `backend`
argument names the implementation, an entry of the registry in backends.py.
"""

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import BACKENDS, check_backend_limits, resolve_backend
from .checks import check_cu_seqlens, check_inputs, check_multipliers, state_rows
from .config import ScanConfig
from .naive import selective_scan_ref

DETERMINISTIC_ENV = "SSM_KERNELS_DETERMINISTIC"


def deterministic_mode() -> bool:
    """$SSM_KERNELS_DETERMINISTIC=1 or torch.use_deterministic_algorithms(True)."""
    flag = os.environ.get(DETERMINISTIC_ENV, "0").lower() not in ("", "0", "false")
    return flag or torch.are_deterministic_algorithms_enabled()


# The ops take the ScanConfig's fields one by one (a custom op's arguments are tensors and
# scalars); each op builds the config back at once and passes it on by keyword. The forward op has
# no `deterministic`: the forward does not depend on it, and the autograd context records it.

def _op_config(groups, delta_softplus, dt_scale, b_scale, c_scale, backend, deterministic, cu_seqlens) -> ScanConfig:
    return ScanConfig(groups=groups, delta_softplus=delta_softplus, dt_scale=dt_scale, b_scale=b_scale,
                      c_scale=c_scale, backend=backend, deterministic=deterministic, cu_seqlens=cu_seqlens)


def _op_fields(config: ScanConfig, forward: bool = False) -> dict:
    fields = dict(groups=config.groups, delta_softplus=config.delta_softplus, **config.multipliers,
                  backend=config.backend, deterministic=config.deterministic, cu_seqlens=config.cu_seqlens)
    if forward:
        del fields["deterministic"]
    return fields


@torch.library.custom_op("ssm_kernels::selective_scan_fwd", mutates_args=())
def selective_scan_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                          z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                          groups: int, delta_softplus: bool, dt_scale: float, b_scale: float, c_scale: float,
                          backend: str, cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out, last_state, chunk_states); chunk_states[:, :, c] is the state entering chunk c
    (with cu_seqlens, sequence s's first chunk is at c = cu_seqlens[s] // chunk + s)."""
    config = _op_config(groups, delta_softplus, dt_scale, b_scale, c_scale, backend, False, cu_seqlens)
    return BACKENDS[backend].forward(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                                     config=config)


@selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, groups, delta_softplus, dt_scale, b_scale, c_scale,
      backend, cu_seqlens=None):
    batch, dim, seqlen = u.shape
    N = A.shape[1]
    entry = BACKENDS[backend]
    acc = entry.state_dtype(u, A, B, C, initial_state)
    n_chunks = -(-seqlen // entry.chunk_size(seqlen, u.device)) + (0 if cu_seqlens is None else
                                                                    state_rows(batch, cu_seqlens))
    return (u.new_empty(u.shape), u.new_empty(state_rows(batch, cu_seqlens), dim, N, dtype=acc),
            u.new_empty(batch, dim, n_chunks, N, dtype=acc))


@torch.library.custom_op("ssm_kernels::selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(dout: Tensor, dlast_state: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
                          B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                          delta_bias: Optional[Tensor], chunk_states: Tensor, groups: int, delta_softplus: bool,
                          dt_scale: float, b_scale: float, c_scale: float, backend: str,
                          deterministic: bool, cu_seqlens: Optional[Tensor] = None
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); the gradient of an
    absent optional input is an empty tensor (custom ops cannot return None)."""
    config = _op_config(groups, delta_softplus, dt_scale, b_scale, c_scale, backend, deterministic, cu_seqlens)
    optional = dict(D=D, z=z, delta_bias=delta_bias)
    grads = BACKENDS[backend].backward(dout, dlast_state, u, delta, A, B, C, **optional, chunk_states=chunk_states,
                                       config=config)
    if chunk_states.dtype == torch.float32 and not _all_finite(grads):
        grads = _float64_backward(grads, dout, dlast_state, u, delta, A, B, C, **optional,
                                  chunk_states=chunk_states, config=config)
    return tuple(u.new_empty(0) if g is None else g for g in grads)


def _all_finite(grads) -> bool:
    """One device sync; under CUDA graph capture (where a sync is not allowed) the check is skipped."""
    present = [g for g in grads if g is not None and g.numel()]
    if not present or (present[0].is_cuda and torch.cuda.is_current_stream_capturing()):
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in present]).all())


def _float64_backward(grads, dout, dlast_state, u, delta, A, B, C, *, D, z, delta_bias, chunk_states, config):
    """The gradients again, in float64 on the "torch" backend, from the state entering each row
    (its first saved slot), cast back to `grads`' dtypes. Only when an fp32 backward gave a
    non-finite value: a growing scan (A > 0, or dt < 0 without softplus) can overflow its fp32
    adjoint where every gradient is within range (the adjoint's inf times an exact 0 of u, h or
    dt; a huge adjoint times a tiny state), and then this gives what the float64 reference gives.
    Where the gradient itself overflows fp32, the cast gives inf, as it should."""
    from .chunk_torch import _sequences, selective_scan_bwd_torch, selective_scan_fwd_torch
    if config.cu_seqlens is None:
        h0 = chunk_states[:, :, 0]
    else:  # each sequence's first slot, at the spacing of the backend that saved the states
        seqs = _sequences(config.cu_seqlens, BACKENDS[config.backend].chunk_size(u.shape[2], u.device))
        h0 = chunk_states[0, :, [slot for _, _, _, slot, _ in seqs]].transpose(0, 1)

    def f64(t):
        return None if t is None else t.to(torch.float64)
    u, delta, A, B, C = (f64(t) for t in (u, delta, A, B, C))
    optional = dict(D=f64(D), z=f64(z), delta_bias=f64(delta_bias))
    torch_config = config.replace(backend="torch")
    _, _, states = selective_scan_fwd_torch(u, delta, A, B, C, **optional, initial_state=f64(h0), config=torch_config)
    exact = selective_scan_bwd_torch(f64(dout), f64(dlast_state), u, delta, A, B, C, **optional, chunk_states=states,
                                     config=torch_config)
    return tuple(None if g is None else e.to(g.dtype) for g, e in zip(grads, exact))


@selective_scan_bwd_op.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, groups, delta_softplus, dt_scale,
      b_scale, c_scale, backend, deterministic, cu_seqlens=None):
    dim = u.shape[1]

    def like(t):
        return u.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return (like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias),
            u.new_empty(state_rows(u.shape[0], cu_seqlens), dim, A.shape[1], dtype=chunk_states.dtype))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, *fields, cu_seqlens = inputs
    config = _op_config(*fields, deterministic_mode(), cu_seqlens)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2], config.cu_seqlens)
    ctx.config = config.replace(cu_seqlens=None)  # the saved tensor goes back in at the backward
    ctx.has_initial_state = initial_state is not None


def _backward(ctx, dout, dlast_state, _dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, chunk_states, cu_seqlens = ctx.saved_tensors
    config = ctx.config.replace(cu_seqlens=cu_seqlens)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = selective_scan_bwd_op(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, **_op_fields(config))
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    grads = (du, ddelta, dA, dB, dC, dD, dz, dbias)
    return (*(None if t is None else g for t, g in zip(inputs, grads)), dh0 if ctx.has_initial_state else None,
            *(None,) * len(_op_fields(config, forward=True)))


torch.library.register_autograd("ssm_kernels::selective_scan_fwd", _backward, setup_context=_setup_context)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, dt_scale=1.0, b_scale=1.0, c_scale=1.0,
                      initial_state=None, backend=None, cu_seqlens=None):
    """Selective scan (Mamba-1 / S6), a drop-in replacement for mamba_ssm's `selective_scan_fn`.

    For batch b, channel d, state n and step t:
        dt_t = dt_scale * delta_t + delta_bias          (then softplus if delta_softplus, threshold 20)
        h_t  = exp(dt_t * A) * h_{t-1} + dt_t * (b_scale * B_t) * u_t,   h_{-1} = initial_state or 0
        y_t  = sum_n (c_scale * C_t[n]) * h_t[n] + D * u_t;   out = y * silu(z) when z is given

    Args:
        u, delta: (batch, dim, L), float32 / float16 / bfloat16 (float64 on the "torch", "cpp" and "ref"
            backends).
        A: (dim, N), real float32.
        B, C: fixed (dim, N), variable (batch, N, L) or grouped (batch, G, N, L); channel d uses
            group d // (dim // G).
        D, delta_bias: (dim,) float32, optional.
        z: (batch, dim, L) like u, optional.
        delta_softplus: apply softplus to dt.
        return_last_state: also return the state after the last step, (batch, dim, N) float32.
        dt_scale, b_scale, c_scale: width-dependent multipliers (keyword-only; Python floats or
            0-dim tensors), applied inside the recurrence. 1.0 gives the plain scan.
        initial_state: (batch, dim, N), optional; gradients flow into it.
        backend: a name in the registry (ops/selective_scan/backends.py): "triton", "torch", "cpp"
            (the compiled CPU kernels of csrc/, when built) or "ref";
            default $SSM_KERNELS_BACKEND, else "triton" for CUDA tensors, "cpp" for CPU tensors when
            the extension is built, and "torch" otherwise.
        cu_seqlens: packed variable-length sequences (flash-linear-attention's convention): u, delta,
            z and variable B/C hold num_seqs sequences one after another along L with batch 1;
            cu_seqlens (num_seqs + 1,) int32/int64 gives their boundaries (0, ..., L, non-decreasing;
            empty sequences allowed). The state restarts at each sequence; initial_state and
            last_state are then (num_seqs, dim, N), one per sequence.

    Returns:
        out (batch, dim, L) in u's dtype, or (out, last_state) when return_last_state.
        Gradients flow back through last_state too.
    """
    config = scan_config(u, delta_softplus=delta_softplus, dt_scale=dt_scale, b_scale=b_scale, c_scale=c_scale,
                         backend=backend, cu_seqlens=cu_seqlens)
    return run_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                    return_last_state=return_last_state, config=config)


def scan_config(u, *, delta_softplus=False, dt_scale=1.0, b_scale=1.0, c_scale=1.0, backend=None,
                cu_seqlens=None) -> ScanConfig:
    """A public boundary's ScanConfig (selective_scan_fn, selective_scan_cp, the Mamba modules): the
    backend resolved for u's device, the multipliers checked, cu_seqlens checked against u. Its
    groups are filled in by run_scan from B and C."""
    backend = resolve_backend(backend, u)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, u)
    return ScanConfig(delta_softplus=bool(delta_softplus), backend=backend, cu_seqlens=cu_seqlens,
                      **check_multipliers(dt_scale, b_scale, c_scale))


def run_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, initial_state=None, return_last_state=False,
             config: ScanConfig):
    """selective_scan_fn for a config that scan_config made: checks the tensors against each other,
    then runs the config's backend (the custom ops, or autograd through the reference)."""
    num_seqs = None if config.cu_seqlens is None else state_rows(u.shape[0], config.cu_seqlens)
    if BACKENDS[config.backend].forward is None:  # "ref": the sequential loop, differentiated by autograd
        call = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=config.delta_softplus,
                    initial_state=initial_state, **config.multipliers)
        if config.cu_seqlens is None:
            return selective_scan_ref(u, delta, A, B, C, return_last_state=return_last_state, **call)
        out, last_state = _packed_ref(u, delta, A, B, C, cu_seqlens=config.cu_seqlens, num_seqs=num_seqs, **call)
        return (out, last_state) if return_last_state else out
    B, C, groups = check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, state_rows=num_seqs)
    check_backend_limits(config.backend, A.shape[1], dict(u=u, A=A, B=B, C=C, D=D, delta_bias=delta_bias,
                                                          initial_state=initial_state))
    out, last_state, _ = selective_scan_fwd_op(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                               **_op_fields(config.replace(groups=groups), forward=True))
    return (out, last_state) if return_last_state else out


def _packed_ref(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, num_seqs,
                **multipliers):
    """(out, last_state) of the reference on packed sequences: one sequential scan per sequence."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, state_rows=num_seqs)
    bounds = cu_seqlens.tolist()
    outs, lasts = [], []
    for s in range(num_seqs):
        a, b = bounds[s], bounds[s + 1]
        h0 = None if initial_state is None else initial_state[s:s + 1]
        if a == b:
            lasts.append(h0 if h0 is not None else u.new_zeros(1, u.shape[1], A.shape[1],
                                                               dtype=torch.promote_types(u.dtype, torch.float32)))
            continue

        def cut(t):
            return t if t is None or t.dim() < 3 else t[..., a:b]
        out_s, last_s = selective_scan_ref(cut(u), cut(delta), A, cut(B), cut(C), D=D, z=cut(z),
                                           delta_bias=delta_bias, delta_softplus=delta_softplus,
                                           return_last_state=True, initial_state=h0, **multipliers)
        outs.append(out_s)
        lasts.append(last_s)
    out = torch.cat(outs, dim=-1) if outs else u.new_empty(u.shape)
    return out, torch.cat(lasts, dim=0)
