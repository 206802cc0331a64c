"""selective_state_update in Triton: one program per (BLOCK_D channels, batch row); the state tile
[BLOCK_D, BLOCK_N] is read once, updated in fp32 and written back in place. dt, its softplus and
the decay use the scan kernels' helpers (chunk.py), so a decode step and a scan step round alike."""

import triton
import triton.language as tl

from ..selective_scan.chunk import _contiguous, _discretize, _has, _log2_decay_rate, _sigmoid


@triton.heuristics({
    "HAS_D": _has("D_ptr"), "HAS_Z": _has("z_ptr"), "HAS_DT_BIAS": _has("dt_bias_ptr"),
    "HAS_INDICES": _has("indices_ptr"),
})
@triton.jit
def state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, indices_ptr, out_ptr,
    dim, d_state, dim_per_group,
    stride_state_b, stride_state_d, stride_state_n, stride_x_b, stride_x_d, stride_dt_b, stride_dt_d,
    stride_A_d, stride_A_n, stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    stride_z_b, stride_z_d, stride_out_b, stride_out_d,
    dt_scale, b_scale, c_scale,
    DT_SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, FAST_MATH: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_INDICES: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask_d = d < dim
    mask = mask_d[:, None] & (n[None, :] < d_state)
    row = tl.load(indices_ptr + b).to(tl.int64) if HAS_INDICES else b

    state_ptrs = state_ptr + row * stride_state_b + d[:, None] * stride_state_d + n[None, :] * stride_state_n
    h = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * stride_x_b + d * stride_x_d, mask=mask_d, other=0.0).to(tl.float32)
    delta = tl.load(dt_ptr + b * stride_dt_b + d * stride_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(dt_bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32) if HAS_DT_BIAS else 0.0
    dt, _ = _discretize(delta, bias, dt_scale, HAS_DT_BIAS, DT_SOFTPLUS, FAST_MATH)
    A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :] * stride_A_n, mask=mask, other=0.0).to(tl.float32)
    g = (d // dim_per_group)[:, None]  # each channel's group of B and C
    Bt = tl.load(B_ptr + b * stride_B_b + g * stride_B_g + n[None, :] * stride_B_n, mask=mask, other=0.0)
    Ct = tl.load(C_ptr + b * stride_C_b + g * stride_C_g + n[None, :] * stride_C_n, mask=mask, other=0.0)

    h = tl.exp2(_log2_decay_rate(A) * dt[:, None]) * h + (dt * x)[:, None] * (Bt.to(tl.float32) * b_scale)
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(h * (Ct.to(tl.float32) * c_scale), axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + b * stride_z_b + d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= zv * _sigmoid(zv, FAST_MATH)
    tl.store(out_ptr + b * stride_out_b + d * stride_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_scale, b_scale, c_scale, indices,
                        out):
    """B, C as (batch, G, N) views; writes state (in place) and out."""
    batch, dim = x.shape
    N = A.shape[1]
    block_n = triton.next_power_of_2(N)
    block_d = max(1, min(triton.next_power_of_2(dim), 4096 // block_n, 64))  # a few registers per thread
    on_gpu = x.device.type == "cuda"

    def strides(t, n):
        return (0,) * n if t is None else tuple(t.stride())
    state_update_kernel[(triton.cdiv(dim, block_d), batch)](
        state_ptr=state, x_ptr=x, dt_ptr=dt, A_ptr=A, B_ptr=B, C_ptr=C, D_ptr=_contiguous(D), z_ptr=z,
        dt_bias_ptr=_contiguous(dt_bias),
        indices_ptr=indices, out_ptr=out, dim=dim, d_state=N, dim_per_group=dim // B.shape[1],
        **dict(zip(("stride_state_b", "stride_state_d", "stride_state_n"), state.stride())),
        **dict(zip(("stride_x_b", "stride_x_d"), x.stride())), **dict(zip(("stride_dt_b", "stride_dt_d"), dt.stride())),
        **dict(zip(("stride_A_d", "stride_A_n"), A.stride())),
        **dict(zip(("stride_B_b", "stride_B_g", "stride_B_n"), B.stride())),
        **dict(zip(("stride_C_b", "stride_C_g", "stride_C_n"), C.stride())),
        **dict(zip(("stride_z_b", "stride_z_d"), strides(z, 2))),
        **dict(zip(("stride_out_b", "stride_out_d"), out.stride())),
        dt_scale=dt_scale, b_scale=b_scale, c_scale=c_scale,
        DT_SOFTPLUS=bool(dt_softplus), BLOCK_D=block_d, BLOCK_N=block_n, FAST_MATH=on_gpu,
        num_warps=4 if block_d * block_n >= 1024 else 1,
    )
    return out
