"""Triton pieces shared by the kernels of ops/ (the selective scan's chunk.py, the decoding step's
state_update/kernel.py): the discretization of dt and the math it needs, the decay rate, and the
launch heuristics that read which optional tensors a call has. Sharing them makes a decoding step
and a scan step round alike."""

import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


# -- launch heuristics: constexpr flags from the arguments of a launch ---------------------------

def has(name):
    return lambda args: args[name] is not None


def is_variable(name):
    return lambda args: args[name].dim() == 4


def scan_heuristics(**more):
    """The flags of the scan kernels' optional inputs (pointers named NAME_ptr), plus `more`."""
    return {"HAS_D": has("D_ptr"), "HAS_Z": has("z_ptr"), "HAS_DELTA_BIAS": has("delta_bias_ptr"),
            "B_VARIABLE": is_variable("B_ptr"), "C_VARIABLE": is_variable("C_ptr"), "VARLEN": has("cu_seqlens_ptr"),
            **more}


def strides(name: str, t, axes: str) -> dict:
    """The stride keywords of a launch, {"stride_<name>_<axis>": ...} for the leading len(axes)
    dims of t; zeros when t is None (an absent tensor, or a layout without those dims)."""
    values = (0,) * len(axes) if t is None else t.stride()[:len(axes)]
    return {f"stride_{name}_{axis}": value for axis, value in zip(axes, values)}


def contiguous(t):
    """t.contiguous(), None for None (an absent optional tensor)."""
    return None if t is None else t.contiguous()


# -- math -----------------------------------------------------------------------------------------

@triton.jit
def fast_log(x, FAST_MATH: tl.constexpr):
    """Natural log: the GPU's approximate instruction (2^-22 relative error) when FAST_MATH,
    else Triton's accurate one (the interpreter runs the same formulas with exact operations)."""
    if FAST_MATH:
        y = libdevice.fast_logf(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def reciprocal(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        y = libdevice.fast_dividef(1.0, x)
    else:
        y = 1.0 / x
    return y


@triton.jit
def sigmoid(x, FAST_MATH: tl.constexpr):
    return reciprocal(1.0 + tl.exp2(-x * LOG2E), FAST_MATH)


@triton.jit
def discretize(delta, bias, dt_scale, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
               FAST_MATH: tl.constexpr):
    """dt = softplus(dt_scale * delta + bias) (threshold 20) and d dt / d(pre-activation)."""
    pre = delta * dt_scale
    if HAS_DELTA_BIAS:
        pre += bias
    if DELTA_SOFTPLUS:
        e = tl.exp2(tl.minimum(pre, 20.0) * LOG2E)
        w = 1.0 + e
        r = reciprocal(w, FAST_MATH)
        # log1p(e) = log(w) + log(1 + err / w), err = e - (w - 1) the rounding error of w (exact)
        log1p_e = fast_log(w, FAST_MATH) + (e - (w - 1.0)) * r
        dt = tl.where(pre <= 20.0, log1p_e, pre)
        ddt = tl.where(pre <= 20.0, e * r, 1.0)
    else:
        dt = pre
        ddt = tl.full(pre.shape, 1.0, tl.float32)
    return dt, ddt


@triton.jit
def log2_decay_rate(A):
    """A * log2(e), the exponent of exp2 per unit dt, kept finite: A below -FLT_MAX / log2(e)
    would give -inf, and -inf * (dt = 0) is NaN."""
    return tl.maximum(A * LOG2E, -FLT_MAX)
