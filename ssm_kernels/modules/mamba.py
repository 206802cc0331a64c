"""The Mamba-1 mixer (in_proj -> causal depthwise conv -> SiLU -> x_proj -> dt_proj -> selective
scan with z gating -> out_proj) and `mamba_inner_fn`, both on `ssm_kernels.selective_scan_fn`.

Parameter names, shapes and initialization follow mamba_ssm's `Mamba`, so its state dicts load.
The width multipliers dt_scale, b_scale, c_scale live on the parameterless `SelectiveScan`
submodule (`mixer.scan`): they are set by `ssm_kernels.mup`, saved in the state dict when not 1
(`declarations.persist_multipliers`), and go to the kernel, which applies them inside the recurrence.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed.context_parallel import previous_inputs, scan_cp
from ..ops.selective_scan import selective_scan_fn
from ..ops.selective_scan.checks import check_cu_seqlens
from ..ops.selective_scan.interface import run_scan, scan_config
from ..ops.state_update import selective_state_update
from .declarations import Declaration, MixerShape, init_ssm_parameters_, persist_multipliers
from .inference import InferenceParams


def _causal_conv1d_cuda():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # not installed, or its extension does not load
        return None
    return causal_conv1d_fn


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
                  cu_seqlens: Optional[Tensor] = None):
    """Depthwise causal conv over (batch, dim, L) with weight (dim, width), then SiLU (or nothing).

    Uses causal-conv1d's kernel for CUDA tensors when it is installed, F.conv1d otherwise; the
    two give the same result. cu_seqlens: packed sequences (batch 1), as in selective_scan_fn;
    no tap reaches across a sequence start."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() == 3:  # (dim, 1, width), as stored by nn.Conv1d
        weight = weight.squeeze(1)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x)  # the first user of cu_seqlens in a Mamba layer: its errors name it
        return _packed_causal_conv1d(x, weight, bias, activation, cu_seqlens)
    fast = _causal_conv1d_cuda() if x.is_cuda else None
    if fast is not None:
        return fast(x, weight, bias, activation)
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out) if activation is not None else out


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None) -> Tensor:
    """The causal conv over new inputs x (batch, dim) or (batch, dim, L) that follow the inputs held in
    conv_state (batch, dim, state_len >= width - 1), which is updated in place to the last state_len
    inputs; returns the outputs at the new positions, x's shape (causal-conv1d's convention)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    one = x.dim() == 2
    x3 = x.unsqueeze(-1) if one else x
    width, new = weight.shape[-1], x3.shape[-1]
    full = torch.cat([conv_state.to(x3.dtype), x3], dim=-1)
    conv_state.copy_(full[..., -conv_state.shape[-1]:])
    window = full[..., -(new + width - 1):].to(weight.dtype)
    out = F.conv1d(window, weight.unsqueeze(1), bias, groups=x3.shape[1]).to(x.dtype)
    out = F.silu(out) if activation is not None else out
    return out.squeeze(-1) if one else out


def _packed_causal_conv1d(x, weight, bias, activation, cu_seqlens):
    """The causal conv as a sum over taps, each masked where it would read the sequence before."""
    seqlen, width = x.shape[-1], weight.shape[-1]
    t = torch.arange(seqlen, device=x.device)
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    position = t - cu[torch.searchsorted(cu[1:], t, right=True)]  # steps since the sequence start
    padded = F.pad(x, (width - 1, 0))
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype)[:, None].expand_as(x).clone()
    for k in range(width):
        back = width - 1 - k  # tap k reads x[t - back]
        out = out + weight[:, k, None] * padded[..., k:k + seqlen] * (position >= back)
    return F.silu(out) if activation is not None else out


class SelectiveScan(nn.Module):
    """selective_scan_fn as a module: holds the kernel multipliers, and is where forward hooks
    see the scan's output and last state (the coordinate check uses them). With a `cp_group`
    the sequence is split over its ranks (selective_scan_cp's scan_cp)."""

    def __init__(self, backend: Optional[str] = None, cp_group=None):
        super().__init__()
        self.dt_scale, self.b_scale, self.c_scale = 1.0, 1.0, 1.0
        self.backend = backend
        self.cp_group = cp_group

    def multipliers(self) -> dict:
        return dict(dt_scale=self.dt_scale, b_scale=self.b_scale, c_scale=self.c_scale)

    def forward(self, u, delta, A, B, C, D, z, delta_bias, cu_seqlens=None):
        """(out, last_state) of the scan with softplus on dt (Mamba's), this module's multipliers
        and backend, in one ScanConfig."""
        if self.cp_group is not None and cu_seqlens is not None:
            raise ValueError("cu_seqlens: packed sequences are not supported under context parallelism")
        config = scan_config(u, delta_softplus=True, backend=self.backend, cu_seqlens=cu_seqlens, **self.multipliers())
        call = dict(D=D, z=z, delta_bias=delta_bias, return_last_state=True, config=config)
        if self.cp_group is None:
            return run_scan(u, delta, A, B, C, **call)
        return scan_cp(u, delta, A, B, C, group=self.cp_group, **call)

    def extra_repr(self):
        return f"dt_scale={self.dt_scale:g}, b_scale={self.b_scale:g}, c_scale={self.c_scale:g}"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / RMS(x) * weight over the last dim; fp16/bf16 normalize in fp32, fp64 stays fp64."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    return (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)


def _rms(x: Tensor, weight: Optional[Tensor], eps: float):
    return x if weight is None else rms_norm(x, weight, eps)


@dataclass(frozen=True)
class MixerWeights:
    """The tensors of one Mamba-1 mixer call, named as in mamba_inner_fn (None: absent; B, C None:
    projected from x by x_proj). dt_proj's weight is delta_proj_weight, its bias delta_bias."""
    conv1d_weight: Tensor
    conv1d_bias: Optional[Tensor]
    x_proj_weight: Tensor
    delta_proj_weight: Tensor
    out_proj_weight: Tensor
    out_proj_bias: Optional[Tensor]
    A: Tensor
    B: Optional[Tensor] = None
    C: Optional[Tensor] = None
    D: Optional[Tensor] = None
    delta_bias: Optional[Tensor] = None
    B_proj_bias: Optional[Tensor] = None
    C_proj_bias: Optional[Tensor] = None
    b_rms_weight: Optional[Tensor] = None
    c_rms_weight: Optional[Tensor] = None
    dt_rms_weight: Optional[Tensor] = None
    eps: float = 1e-6  # of the three RMS norms


def _inner(xz, w: MixerWeights, *, scan, conv=causal_conv1d, cache=None, cu_seqlens=None):
    """The shared body of mamba_inner_fn and Mamba.forward; scan(u, delta, A, B, C, D, z, delta_bias,
    cu_seqlens), conv(x, weight, bias, activation, cu_seqlens=). cache: a (conv_state, ssm_state) pair that the
    prefill fills with the last d_conv conv inputs and the scan's last state. cu_seqlens: packed
    sequences (batch 1) for the conv and the scan."""
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise ValueError(f"xz: expected (batch, 2*d_inner, L), got {tuple(xz.shape)}")
    batch, _, seqlen = xz.shape
    d_state = w.A.shape[-1]
    dt_rank = w.delta_proj_weight.shape[1]
    B, C, eps = w.B, w.C, w.eps
    x, z = xz.chunk(2, dim=1)
    if cache is not None:
        width = cache[0].shape[-1]
        cache[0].copy_(F.pad(x, (max(0, width - seqlen), 0))[..., -width:])
    x = conv(x, w.conv1d_weight, w.conv1d_bias, "silu", cu_seqlens=cu_seqlens)
    d_inner = x.shape[1]  # sizes spelled out below: a context-parallel shard may hold 0 steps
    x_dbl = F.linear(x.transpose(1, 2).reshape(batch * seqlen, d_inner), w.x_proj_weight)  # (b*l, r + 2N)
    for name, size in (("dt_rms_weight", d_inner), ("b_rms_weight", d_state), ("c_rms_weight", d_state)):
        weight = getattr(w, name)
        if weight is not None and tuple(weight.shape) != (size,):
            raise ValueError(f"{name}: expected shape ({size},), got {tuple(weight.shape)}")
    delta = w.delta_proj_weight @ x_dbl[:, :dt_rank].t()  # (d, b*l)
    if w.dt_rms_weight is not None:  # mamba_ssm's meaning: delta normalized over d_inner after dt_proj
        delta = rms_norm(delta.t(), w.dt_rms_weight, eps).t()
    delta = delta.reshape(d_inner, batch, seqlen).transpose(0, 1)  # (b, d, l), d-major view
    if B is None:
        B = x_dbl[:, dt_rank:dt_rank + d_state]
        if w.B_proj_bias is not None:
            B = B + w.B_proj_bias.to(B.dtype)
        B = _rms(B, w.b_rms_weight, eps).reshape(batch, seqlen, d_state).transpose(1, 2)  # (b, N, l)
    if C is None:
        C = x_dbl[:, -d_state:]
        if w.C_proj_bias is not None:
            C = C + w.C_proj_bias.to(C.dtype)
        C = _rms(C, w.c_rms_weight, eps).reshape(batch, seqlen, d_state).transpose(1, 2)
    y, last_state = scan(x, delta, w.A, B, C, w.D, z, w.delta_bias, cu_seqlens)
    if cache is not None:
        cache[1].copy_(last_state)
    return F.linear(y.transpose(1, 2), w.out_proj_weight, w.out_proj_bias)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
                   A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6, *, dt_scale=1.0, b_scale=1.0, c_scale=1.0, backend=None, cu_seqlens=None):
    """mamba_ssm's mamba_inner_fn (same arguments) on our scan, plus the kernel multipliers.

    xz: (batch, 2*d_inner, L), the in_proj output; returns (batch, L, d_model). Autograd runs
    through ordinary torch ops and our scan's custom op. `checkpoint_lvl` is accepted and
    ignored: our scan never saves a (batch, d_inner, L, N) tensor, so nothing is recomputed.
    cu_seqlens: packed sequences (batch 1), as in selective_scan_fn; the conv does not reach
    across them either. b_rms_weight, c_rms_weight (d_state,) and dt_rms_weight (d_inner,): the
    RMS norms of mamba_ssm's FalconMamba path, with its meaning: B and C over the states, delta
    over d_inner after dt_proj (before delta_bias).
    """
    def scan(u, delta, A, B, C, D, z, delta_bias, cu_seqlens):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
                                 return_last_state=True, dt_scale=dt_scale, b_scale=b_scale, c_scale=c_scale,
                                 backend=backend, cu_seqlens=cu_seqlens)
    weights = MixerWeights(conv1d_weight=conv1d_weight, conv1d_bias=conv1d_bias, x_proj_weight=x_proj_weight,
                           delta_proj_weight=delta_proj_weight, out_proj_weight=out_proj_weight,
                           out_proj_bias=out_proj_bias, A=A, B=B, C=C, D=D, delta_bias=delta_bias,
                           B_proj_bias=B_proj_bias, C_proj_bias=C_proj_bias, b_rms_weight=b_rms_weight,
                           c_rms_weight=c_rms_weight, dt_rms_weight=dt_rms_weight, eps=b_c_dt_rms_eps)
    return _inner(xz, weights, scan=scan, cu_seqlens=cu_seqlens)


# mamba_ssm's Mamba (and transformers' MambaMixer): parameter name -> parameterization role.
MAMBA_ROLES = {"in_proj.weight": "in_proj", "in_proj.bias": "in_proj_bias", "conv1d.weight": "conv_weight",
               "conv1d.bias": "conv_bias", "x_proj.weight": "x_proj", "dt_proj.weight": "dt_proj_weight",
               "dt_proj.bias": "dt_proj_bias", "A_log": "A_log", "D": "D", "out_proj.weight": "out_proj",
               "out_proj.bias": "out_proj_bias"}


class Mamba(nn.Module):
    """Mamba-1 mixer with mamba_ssm's constructor arguments, defaults and parameter names.

    forward: (batch, L, d_model) -> (batch, L, d_model); with `inference_params`, the prefill
    and then one token per call (`step`, on selective_state_update). With `cp_group` (a torch.distributed process group) each rank passes its
    contiguous shard of the sequence, rank order = time order: the conv takes its halo from the
    ranks before, and the scan runs context-parallel (ssm_kernels.distributed).
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False, use_fast_path=True,
                 layer_idx=None, device=None, dtype=None, backend=None, cp_group=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not (isinstance(expand, (int, float)) and not isinstance(expand, bool) and int(expand * d_model) >= 1):
            raise ValueError(f"expand: d_inner = int(expand * d_model) must be at least 1, got expand {expand!r} "
                             f"with d_model {d_model}")
        if dt_rank != "auto" and (isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"dt_rank: expected 'auto' or a positive int, got {dt_rank!r}")
        if not (0 < dt_min < dt_max):
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min < dt_max, got {dt_min}, {dt_max}")
        factory = dict(device=device, dtype=dtype)
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        # mamba_ssm's `dt_scale` keyword scales dt_proj's *init*; inside the code it is dt_init_scale,
        # apart from the kernel multiplier dt_scale (self.scan.dt_scale, set by ssm_kernels.mup)
        self.dt_min, self.dt_max, self.dt_init, self.dt_init_scale = dt_min, dt_max, dt_init, dt_scale
        self.dt_init_floor = dt_init_floor
        self.use_fast_path = use_fast_path  # accepted for compatibility; there is one path
        self.layer_idx = layer_idx
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=torch.float32))
        self.A_log._no_weight_decay = True  # mamba_ssm's flag; our param groups do not read it
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.scan = SelectiveScan(backend, cp_group)
        self.reset_ssm_parameters()
        persist_multipliers(self)

    @torch.no_grad()
    def reset_ssm_parameters(self, generator=None):
        """mamba_ssm's init of dt_proj, A_log and D (in_proj, conv1d, x_proj, out_proj keep
        PyTorch's defaults): dt_proj.weight uniform in +-dt_rank^-0.5 * dt_init_scale (or that
        constant), dt_proj.bias = softplus^-1 of dt log-uniform in [dt_min, dt_max] floored at
        dt_init_floor, A_log[:, n] = log(n + 1) (S4D-real), D = 1."""
        init_ssm_parameters_(dict(self.named_parameters()), self.shape(), self.dt_rank ** -0.5 * self.dt_init_scale,
                             generator)

    def shape(self) -> MixerShape:
        return MixerShape(d_model=self.d_model, d_inner=self.d_inner, d_state=self.d_state, d_conv=self.d_conv,
                          dt_rank=self.dt_rank, dt_init=self.dt_init, dt_init_scale=self.dt_init_scale,
                          dt_min=self.dt_min, dt_max=self.dt_max, dt_init_floor=self.dt_init_floor)

    def declaration(self) -> Declaration:
        """Roles of mamba_ssm's Mamba parameters, the shape, and the kernel multiplier slots."""
        return Declaration(roles=dict(MAMBA_ROLES), mixer=self.shape(),
                           slots={name: (self.scan, name) for name in ("dt_scale", "b_scale", "c_scale")})

    def forward(self, hidden_states: Tensor, inference_params: Optional[InferenceParams] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """hidden_states (batch, L, d_model). With inference_params: the prefill when its
        seqlen_offset is 0 (fills this layer's cache), else one decoding step per call (L = 1).
        cu_seqlens: packed sequences along L with batch 1 (selective_scan_fn's convention)."""
        if cu_seqlens is not None and inference_params is not None:
            raise ValueError("cu_seqlens: packed sequences are for training and scoring, not with inference_params")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states: expected (batch, L, {self.d_model}), got {tuple(hidden_states.shape)}")
        cache = None
        if inference_params is not None:
            cache = self._cache(inference_params, hidden_states.shape[0])
            if inference_params.seqlen_offset > 0:
                return self.step(hidden_states, *cache)[0]
        xz = F.linear(hidden_states, self.in_proj.weight, self.in_proj.bias).transpose(1, 2)  # (b, 2d, l)
        A = -torch.exp(_at_least_fp32(self.A_log))
        weights = MixerWeights(conv1d_weight=self.conv1d.weight, conv1d_bias=self.conv1d.bias,
                               x_proj_weight=self.x_proj.weight, delta_proj_weight=self.dt_proj.weight,
                               out_proj_weight=self.out_proj.weight, out_proj_bias=self.out_proj.bias, A=A,
                               D=_at_least_fp32(self.D), delta_bias=_at_least_fp32(self.dt_proj.bias))
        return _inner(xz, weights, scan=self.scan,
                      conv=causal_conv1d if self.scan.cp_group is None else self._conv_with_halo, cache=cache,
                      cu_seqlens=cu_seqlens)

    # -- decoding ----------------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 0, dtype=None, **kwargs):
        """(conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, N)), zeros; the ssm
        state in fp32 (fp64 for an fp64 model), as the scan keeps it."""
        weight = self.out_proj.weight
        conv_dtype = dtype or self.conv1d.weight.dtype
        ssm_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        return (torch.zeros(batch_size, self.d_inner, self.d_conv, device=weight.device, dtype=conv_dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=weight.device, dtype=ssm_dtype))

    def _cache(self, inference_params: InferenceParams, batch: int):
        if self.layer_idx is None:
            raise ValueError("Mamba: decoding with inference_params needs layer_idx (the key of its cache)")
        store = inference_params.key_value_memory_dict
        fresh = inference_params.seqlen_offset == 0  # a prefill starts from zero states
        if self.layer_idx not in store or fresh:
            store[self.layer_idx] = self.allocate_inference_cache(batch, inference_params.max_seqlen)
        cache = store[self.layer_idx]
        if cache[0].shape[0] != batch:
            raise ValueError(f"hidden_states: batch {batch} differs from the cache's {cache[0].shape[0]}")
        return cache

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """One token: hidden_states (batch, 1, d_model) -> (out (batch, 1, d_model), conv_state,
        ssm_state), the two states updated in place; the multipliers as in training."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"hidden_states: a decoding step takes one token, (batch, 1, {self.d_model}); got "
                             f"{tuple(hidden_states.shape)}")
        xz = F.linear(hidden_states.squeeze(1), self.in_proj.weight, self.in_proj.bias)  # (b, 2d)
        x, z = xz.chunk(2, dim=-1)
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight, self.conv1d.bias, "silu").to(xz.dtype)
        dt, B, C = F.linear(x, self.x_proj.weight).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias goes in with the softplus, as in the scan
        y = selective_state_update(ssm_state, x, dt, -torch.exp(_at_least_fp32(self.A_log)), B, C,
                                   D=_at_least_fp32(self.D), z=z, dt_bias=_at_least_fp32(self.dt_proj.bias),
                                   dt_softplus=True, backend=self.scan.backend, **self.scan.multipliers())
        return F.linear(y, self.out_proj.weight, self.out_proj.bias).unsqueeze(1), conv_state, ssm_state

    def _conv_with_halo(self, x, weight, bias, activation, cu_seqlens=None):
        """The causal conv of this rank's shard, led by the d_conv - 1 inputs before it. Packed
        sequences are refused under context parallelism (by the scan, SelectiveScan)."""
        halo = previous_inputs(x, self.d_conv - 1, group=self.scan.cp_group)
        return causal_conv1d(torch.cat([halo, x], dim=-1), weight, bias, activation)[..., halo.shape[-1]:]


def _at_least_fp32(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (what the scan takes for A, D, delta_bias); fp32 and fp64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
