"""What the device can do at best, to put the scan's times in proportion: the bandwidth of a
plain copy and the throughput of exp2 (the scan's one special function per element-state).
The static GPU model's floors (docs/kernel_design.md) assume 3.0 TB/s and 16 exp2 per clock per SM;
these measure them."""

import torch
import triton
import triton.language as tl

from .workload import median_ms


def copy_bandwidth(device, nbytes=1 << 30, rounds=10):
    """GB/s of dst.copy_(src) over nbytes (bytes read + bytes written, per second)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = median_ms(lambda: dst.copy_(src), device, rounds) / 1e3
    return dict(bytes=2 * nbytes, seconds=seconds, gbps=2 * nbytes / seconds / 1e9)


@triton.jit
def exp2_floor_kernel(x_ptr, out_ptr, REPEATS: tl.constexpr, BLOCK: tl.constexpr):
    """Four independent chains of REPEATS exp2 each per element: nearly nothing but MUFU.EX2."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    a, b, c, d = x, x + 0.25, x + 0.5, x + 0.75
    for _ in tl.static_range(REPEATS):  # exp2 of a value in [-1, 0) stays in (0.5, 1]: no overflow
        a = tl.exp2(a) - 1.0
        b = tl.exp2(b) - 1.0
        c = tl.exp2(c) - 1.0
        d = tl.exp2(d) - 1.0
    tl.store(out_ptr + offs, a + b + c + d)


def exp2_throughput(device, elements=1 << 24, repeats=64, rounds=10, block=1024):
    """exp2 per second of exp2_floor_kernel over `elements` values (4 * repeats each)."""
    device = torch.device(device)
    elements = triton.cdiv(elements, block) * block
    x = -torch.rand(elements, device=device)
    out = torch.empty_like(x)

    def run():
        exp2_floor_kernel[(elements // block,)](x, out, REPEATS=repeats, BLOCK=block)
    seconds = median_ms(run, device, rounds) / 1e3
    if not torch.isfinite(out).all():
        raise RuntimeError("exp2_floor_kernel gave a non-finite value")
    count = elements * repeats * 4
    return dict(exp2=count, seconds=seconds, exp2_per_s=count / seconds)
