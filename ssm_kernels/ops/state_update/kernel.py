"""selective_state_update in Triton: one program per (BLOCK_D channels, batch row); the state tile
[BLOCK_D, BLOCK_N] is read once, updated in fp32 and written back in place. dt, its softplus and
the decay use the scan kernels' helpers (ops/triton_helpers.py), so a decode step and a scan step round alike."""

import triton
import triton.language as tl

from ..triton_helpers import contiguous, discretize, has, log2_decay_rate, sigmoid, strides


@triton.heuristics({
    "HAS_D": has("D_ptr"), "HAS_Z": has("z_ptr"), "HAS_DT_BIAS": has("dt_bias_ptr"),
    "HAS_INDICES": has("indices_ptr"),
})
@triton.jit
def state_update_kernel(
    # the state (updated in place), inputs and output
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, indices_ptr, out_ptr,
    # sizes
    dim, d_state, dim_per_group,
    # strides: any layout (a decoding step's tensors are often views of larger buffers)
    stride_state_b, stride_state_d, stride_state_n, stride_x_b, stride_x_d, stride_dt_b, stride_dt_d,
    stride_A_d, stride_A_n, stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    stride_z_b, stride_z_d, stride_out_b, stride_out_d,
    # width multipliers
    dt_scale, b_scale, c_scale,
    # meta
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
    dt, _ = discretize(delta, bias, dt_scale, HAS_DT_BIAS, DT_SOFTPLUS, FAST_MATH)
    A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :] * stride_A_n, mask=mask, other=0.0).to(tl.float32)
    g = (d // dim_per_group)[:, None]  # each channel's group of B and C
    Bt = tl.load(B_ptr + b * stride_B_b + g * stride_B_g + n[None, :] * stride_B_n, mask=mask, other=0.0)
    Ct = tl.load(C_ptr + b * stride_C_b + g * stride_C_g + n[None, :] * stride_C_n, mask=mask, other=0.0)

    h = tl.exp2(log2_decay_rate(A) * dt[:, None]) * h + (dt * x)[:, None] * (Bt.to(tl.float32) * b_scale)
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(h * (Ct.to(tl.float32) * c_scale), axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + b * stride_z_b + d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= zv * sigmoid(zv, FAST_MATH)
    tl.store(out_ptr + b * stride_out_b + d * stride_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def state_update_triton(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, indices=None, out, config):
    """B, C as (batch, G, N) views, indices checked (or None); writes state (in place) and out."""
    batch, dim = x.shape
    N = A.shape[1]
    block_n = triton.next_power_of_2(N)
    block_d = max(1, min(triton.next_power_of_2(dim), 4096 // block_n, 64))  # a few registers per thread
    on_gpu = x.device.type == "cuda"
    state_update_kernel[(triton.cdiv(dim, block_d), batch)](
        state_ptr=state, x_ptr=x, dt_ptr=dt, A_ptr=A, B_ptr=B, C_ptr=C, D_ptr=contiguous(D), z_ptr=z,
        dt_bias_ptr=contiguous(dt_bias),
        indices_ptr=indices, out_ptr=out, dim=dim, d_state=N, dim_per_group=dim // B.shape[1],
        **strides("state", state, "bdn"), **strides("x", x, "bd"), **strides("dt", dt, "bd"), **strides("A", A, "dn"),
        **strides("B", B, "bgn"), **strides("C", C, "bgn"), **strides("z", z, "bd"), **strides("out", out, "bd"),
        **config.multipliers,
        DT_SOFTPLUS=config.delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n, FAST_MATH=on_gpu,
        num_warps=4 if block_d * block_n >= 1024 else 1,
    )
    return out
