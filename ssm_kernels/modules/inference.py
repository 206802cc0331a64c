"""Decoding state and sampling: mamba_ssm's InferenceParams, and top-k / top-p sampling."""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class InferenceParams:
    """Per-generation cache, as mamba_ssm's: `key_value_memory_dict[layer_idx]` holds each Mamba
    layer's (conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, N)); seqlen_offset
    is the number of tokens already processed (0: the next forward is the prefill)."""
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int):
        self.max_seqlen, self.max_batch_size, self.seqlen_offset = max_seqlen, max_batch_size, 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


def sample(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Next tokens (batch,) from logits (batch, vocab): greedy when temperature == 0 or top_k == 1;
    otherwise softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the
    smallest set whose probability reaches top_p (0: all)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    # shifted to max 0 and in fp64: a tiny temperature (1e-40) gives -inf, never inf - inf
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the tokens before the mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
