"""A small Mamba language model with mamba_ssm's `MambaLMHeadModel` layout and state-dict keys:
backbone.embedding -> backbone.layers[i] (pre-norm residual blocks: norm, mixer) -> backbone.norm_f
-> lm_head. Small enough to train on the CPU at d_model 32-256.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .declarations import Declaration, declare_norm, mamba_init_, persist_multipliers
from .inference import InferenceParams, sample
from .mamba import Mamba, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def declaration(self) -> Declaration:
        return declare_norm(self)


class Block(nn.Module):
    """h + mixer(norm(h)), with mamba_ssm's names (`norm`, `mixer`)."""

    def __init__(self, d_model: int, norm_epsilon: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_epsilon)
        self.mixer = Mamba(d_model, **mixer_kwargs)

    def forward(self, hidden_states: Tensor, inference_params: Optional[InferenceParams] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        return hidden_states + self.mixer(self.norm(hidden_states), inference_params, cu_seqlens)


class _Backbone(nn.Module):
    def __init__(self, d_model, n_layer, vocab_size, norm_epsilon, mixer_kwargs):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            Block(d_model, norm_epsilon, layer_idx=i, **mixer_kwargs) for i in range(n_layer))
        self.norm_f = RMSNorm(d_model, eps=norm_epsilon)


class MambaLM(nn.Module):
    """embedding -> n_layer Mamba blocks -> RMSNorm -> readout; logits (batch, L, padded_vocab_size).

    `embedding_multiplier` and `readout_multiplier` (plain floats, 1 by default, set by
    `ssm_kernels.mup`, in the state dict when not 1) scale the embedding output and the logits.
    The embedding and readout tables are padded to `padded_vocab_size`, a multiple of
    `pad_vocab_size_multiple`, as in mamba_ssm (so are the logits); `vocab_size` stays the real
    vocabulary, and `generate` never samples a padded id. Initialization is mamba_ssm's:
    embedding N(0, 0.02), Linear biases zero, out_proj rescaled by 1/sqrt(n_layer).
    Mixer arguments (e.g. `cp_group` for context parallelism) pass through to every `Mamba`.
    """

    def __init__(self, d_model: int, n_layer: int, vocab_size: int, d_state: int = 16, expand: int = 2,
                 d_conv: int = 4, norm_epsilon: float = 1e-5, tie_embeddings: bool = True,
                 pad_vocab_size_multiple: int = 8, backend: Optional[str] = None, **mixer_kwargs):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_layer", n_layer), ("vocab_size", vocab_size),
                            ("pad_vocab_size_multiple", pad_vocab_size_multiple)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        # vocab_size: the real vocabulary (what generate samples from); the tables have padded_vocab_size rows
        self.d_model, self.n_layer, self.vocab_size = d_model, n_layer, vocab_size
        self.padded_vocab_size = -(-vocab_size // pad_vocab_size_multiple) * pad_vocab_size_multiple
        self.tie_embeddings = tie_embeddings
        mixer_kwargs = dict(d_state=d_state, expand=expand, d_conv=d_conv, backend=backend, **mixer_kwargs)
        self.backbone = _Backbone(d_model, n_layer, self.padded_vocab_size, norm_epsilon, mixer_kwargs)
        self.lm_head = nn.Linear(d_model, self.padded_vocab_size, bias=False)
        self.embedding_multiplier = 1.0
        self.readout_multiplier = 1.0
        if tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.reset_parameters()
        persist_multipliers(self)

    def declaration(self) -> Declaration:
        return Declaration(roles={"backbone.embedding.weight": "embedding", "lm_head.weight": "readout"},
                           n_layer=self.n_layer, tied_readout=self.lm_head.weight is self.backbone.embedding.weight,
                           slots={"embedding": (self, "embedding_multiplier"), "readout": (self, "readout_multiplier")})

    def reset_parameters(self, generator=None):
        """mamba_ssm's MambaLMHeadModel init (its _init_weights with rescale_prenorm_residual)."""
        mamba_init_(self, generator=generator)

    def forward(self, input_ids: Tensor, inference_params: Optional[InferenceParams] = None,
                num_last_tokens: int = 0, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Logits (batch, L, vocab); only the last num_last_tokens positions when > 0. With
        inference_params: the prefill, then one token per call (see generate). cu_seqlens:
        packed sequences along L with batch 1, each processed as if alone."""
        h = self.backbone.embedding(input_ids)
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        for layer in self.backbone.layers:
            h = layer(h, inference_params, cu_seqlens)
        if num_last_tokens > 0:
            h = h[:, -num_last_tokens:]
        h = self.backbone.norm_f(h)
        logits = F.linear(h, self.lm_head.weight)
        return logits * self.readout_multiplier if self.readout_multiplier != 1.0 else logits

    def loss(self, input_ids: Tensor, labels: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
        """Next-token cross-entropy. Without labels: over input_ids (batch, L), input_ids[:, 1:]
        predicted from input_ids[:, :-1]. With labels (batch, L), the logits of input_ids against
        them (-100 is ignored), e.g. a context-parallel shard from
        ssm_kernels.distributed.shard_for_next_token with reduction="sum"."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (batch, L), got {tuple(input_ids.shape)}")
        if labels is None:
            if input_ids.shape[1] < 2:
                raise ValueError(f"input_ids: next-token loss needs L >= 2 tokens per sequence, got L = "
                                 f"{input_ids.shape[1]}")
            input_ids, labels = input_ids[:, :-1], input_ids[:, 1:]
        elif labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        logits = self(input_ids)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 stays
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction)

    # -- generation -------------------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None):
        """{layer_idx: (conv_state, ssm_state)} for every layer, zeros."""
        return {i: layer.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype)
                for i, layer in enumerate(self.backbone.layers)}

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 0.0, eos_token_id: Optional[int] = None, progress: bool = False,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Continues input_ids (batch, L >= 1) by max_new_tokens tokens: one prefill through the
        scan, then one selective_state_update step per token. Greedy when temperature == 0 or
        top_k == 1, else sampling (top_k: 0 = all tokens; top_p: 0 = no nucleus cut). A sequence
        that produced eos_token_id keeps emitting it. progress: a tqdm bar over the new tokens.
        Returns (batch, L + max_new_tokens)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected (batch, L) with L >= 1, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0, got {temperature}")
        if not (isinstance(top_k, int) and top_k >= 0):
            raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}")
        if not (0.0 <= top_p <= 1.0):
            raise ValueError(f"top_p: expected a number in [0, 1], got {top_p}")
        batch, prompt = input_ids.shape
        params = InferenceParams(max_seqlen=prompt + max_new_tokens, max_batch_size=batch)
        tokens, done = [input_ids], torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        step_ids = input_ids
        from tqdm import tqdm
        for _ in tqdm(range(max_new_tokens), desc="generate", unit="token", disable=not progress, leave=False):
            logits = self(step_ids, params, num_last_tokens=1)[:, -1, :self.vocab_size]  # no padded id
            params.seqlen_offset += step_ids.shape[1]
            nxt = sample(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            step_ids = nxt[:, None]
            tokens.append(step_ids)
        return torch.cat(tokens, dim=1)
