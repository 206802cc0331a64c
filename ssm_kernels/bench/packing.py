"""Workloads of packed training and decoding: a packed batch of variable-length sequences against
the same batch padded to its longest, and one MambaLM decoding step."""

import math
from typing import Callable, List

import torch

from ..modules import InferenceParams, MambaLM
from ..ops.selective_scan import selective_scan_fn


def log_uniform_lengths(num_seqs: int, low: int, high: int, seed: int = 0) -> List[int]:
    """num_seqs lengths drawn log-uniformly from [low, high] (a realistic mix of short and long)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num_seqs, generator=g, dtype=torch.float64)
    return [int(round(math.exp(math.log(low) + x * (math.log(high) - math.log(low))))) for x in u.tolist()]


def packing_step(lengths: List[int], d_inner: int, d_state: int, dtype: torch.dtype, device, backend: str,
                 layout: str) -> Callable[[], object]:
    """A forward + backward of the scan (Mamba layer inputs: z, D, delta_bias, softplus, variable
    B/C) over the sequences: "packed" in one row with cu_seqlens, or "padded" to the longest as a
    batch. Returns the step; it returns (out, last_state)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    total, longest, n = sum(lengths), max(lengths), len(lengths)
    shape = (1, d_inner, total) if layout == "packed" else (n, d_inner, longest)
    bc_shape = (shape[0], d_state, shape[2])

    def leaf(*s, scale=1.0, offset=0.0):
        return (torch.randn(*s, generator=g) * scale + offset).to(device=device, dtype=dtype).requires_grad_()
    u, z = leaf(*shape), leaf(*shape)
    delta = (torch.rand(*shape, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    B, C = leaf(*bc_shape), leaf(*bc_shape)
    A = (-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)).to(device).requires_grad_()
    D, bias = (torch.randn(d_inner, generator=g).to(device).requires_grad_() for _ in range(2))
    cu = None
    if layout == "packed":
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    dout = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def step():
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True,
                                      backend=backend, cu_seqlens=cu)
        out.backward(dout)
        return out.detach(), last.detach()
    return step


def decode_step(d_model: int, n_layer: int, batch: int, dtype: torch.dtype, device, backend: str):
    """One token of MambaLM decoding after a one-token prefill: returns the step (it returns the logits)."""
    torch.manual_seed(0)
    model = MambaLM(d_model, n_layer, vocab_size=256, backend=backend).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, 256, (batch, 1), device=device)
    params = InferenceParams(max_seqlen=1 << 30, max_batch_size=batch)
    with torch.no_grad():
        model(ids, params)
    params.seqlen_offset = 1

    @torch.no_grad()
    def step():
        logits = model(ids, params)
        params.seqlen_offset += 1
        return logits
    return step
