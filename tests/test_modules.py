"""Mamba, mamba_inner_fn and MambaLM against a plain PyTorch Mamba written here (float64 loops),
and state-dict compatibility with mamba_ssm's layout."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssm_kernels.modules import Mamba, MambaLM, causal_conv1d, causal_conv1d_update, mamba_inner_fn
from ssm_kernels.testing import MULTIPLIERS, TOLERANCE, relative_error


def reference_conv(x, weight, bias):
    """Causal depthwise conv as an explicit sum over taps: out[t] = bias + sum_k w[k] x[t - (W-1) + k]."""
    width = weight.shape[-1]
    out = torch.zeros_like(x) + (bias[:, None] if bias is not None else 0)
    for k in range(width):
        shift = width - 1 - k
        out[..., shift:] += weight[:, k, None] * x[..., :x.shape[-1] - shift]
    return out


def reference_mamba(m, p, hidden, dt_scale=1.0, b_scale=1.0, c_scale=1.0):
    """mamba_ssm's Mamba forward, step by step in float64; p: the module's parameters by name."""
    batch, seqlen, _ = hidden.shape
    xz = hidden @ p["in_proj.weight"].t()
    if "in_proj.bias" in p:
        xz = xz + p["in_proj.bias"]
    x, z = xz.transpose(1, 2).chunk(2, dim=1)                       # (b, d, l)
    x = F.silu(reference_conv(x, p["conv1d.weight"].squeeze(1), p.get("conv1d.bias")))
    x_dbl = x.transpose(1, 2) @ p["x_proj.weight"].t()              # (b, l, r + 2N)
    r, N = m.dt_rank, m.d_state
    dt_low, B, C = x_dbl.split([r, N, N], dim=-1)
    dt = F.softplus(dt_scale * (dt_low @ p["dt_proj.weight"].t()) + p["dt_proj.bias"])  # (b, l, d)
    A = -torch.exp(p["A_log"])                                       # (d, N)
    h = torch.zeros(batch, m.d_inner, N, dtype=hidden.dtype)
    ys = []
    for t in range(seqlen):
        dt_t = dt[:, t, :, None]                                     # (b, d, 1)
        h = torch.exp(dt_t * A) * h + dt_t * (b_scale * B[:, t, None, :]) * x[:, :, t, None]
        ys.append((h * (c_scale * C[:, t, None, :])).sum(-1) + p["D"] * x[:, :, t])
    y = torch.stack(ys, dim=-1) * F.silu(z)                          # (b, d, l)
    out = y.transpose(1, 2) @ p["out_proj.weight"].t()
    return out + p["out_proj.bias"] if "out_proj.bias" in p else out


def reference_lm(model, p, ids):
    """MambaLM's forward from the reference blocks; p: its parameters by name (a tied lm_head is the
    embedding)."""
    h = p["backbone.embedding.weight"][ids] * model.embedding_multiplier
    for i, layer in enumerate(model.backbone.layers):
        pre = f"backbone.layers.{i}."
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * p[pre + "norm.weight"]
        mixer_p = {k[len(pre + "mixer."):]: v for k, v in p.items() if k.startswith(pre + "mixer.")}
        s = layer.mixer.scan
        h = h + reference_mamba(layer.mixer, mixer_p, normed, s.dt_scale, s.b_scale, s.c_scale)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * p["backbone.norm_f.weight"]
    readout = p["lm_head.weight"] if "lm_head.weight" in p else p["backbone.embedding.weight"]
    return (h @ readout.t()) * model.readout_multiplier


def perturbed(module, seed=0):
    """Random values in every parameter (D and biases are not left at their constant init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("dt_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) - 3.0)
            else:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def assert_module_matches(module, reference_fn, inputs, tol):
    """Output and the gradient of every parameter (and of the float input) against reference_fn."""
    g = torch.Generator().manual_seed(7)
    if inputs.is_floating_point():
        inputs = inputs.detach().requires_grad_()
    out = module(inputs)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    params = dict(module.named_parameters())
    leaves = list(params.values()) + ([inputs] if inputs.is_floating_point() else [])
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    ref_params = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    ref_in = inputs.detach().double().requires_grad_() if inputs.is_floating_point() else inputs
    ref_out = reference_fn(ref_params, ref_in)
    ref_leaves = list(ref_params.values()) + ([ref_in] if inputs.is_floating_point() else [])
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out, allow_unused=True)
    assert relative_error(out, ref_out) <= tol
    names = list(params) + (["input"] if inputs.is_floating_point() else [])
    for name, got, want in zip(names, grads, ref_grads):
        assert want is not None, name
        assert relative_error(got, want) <= tol, (name, relative_error(got, want))


@pytest.mark.parametrize("seqlen", [1, 63, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_mamba_matches_the_plain_pytorch_mamba_in_float64(seqlen, bias):
    torch.manual_seed(0)
    m = perturbed(Mamba(24, d_state=5, d_conv=3, bias=bias, backend="torch").double())
    m.scan.dt_scale, m.scan.b_scale, m.scan.c_scale = 0.7, 1.5, 0.4
    x = torch.randn(2, seqlen, 24, dtype=torch.float64)
    assert_module_matches(m, lambda p, h: reference_mamba(m, p, h, 0.7, 1.5, 0.4), x, TOLERANCE[torch.float64])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_mamba_in_float32_against_the_float64_reference(backend):
    torch.manual_seed(1)
    m = perturbed(Mamba(16, d_state=4, backend=backend))
    x = torch.randn(2, 21, 16)
    assert_module_matches(m, lambda p, h: reference_mamba(m, p, h), x, TOLERANCE[torch.float32])


def test_mamba_inner_fn_is_the_mixer_and_takes_the_multipliers():
    torch.manual_seed(2)
    m = perturbed(Mamba(16, d_state=4, backend="torch").double())
    for name, value in MULTIPLIERS.items():
        setattr(m.scan, name, value)
    h = torch.randn(2, 37, 16, dtype=torch.float64)
    xz = (h @ m.in_proj.weight.t()).transpose(1, 2)
    out = mamba_inner_fn(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight,
                         m.out_proj.bias, -torch.exp(m.A_log), D=m.D, delta_bias=m.dt_proj.bias,
                         **MULTIPLIERS, backend="torch")
    torch.testing.assert_close(out, m(h), rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(out.sum(), [m.x_proj.weight, m.A_log])
    g_ref = torch.autograd.grad(m(h).sum(), [m.x_proj.weight, m.A_log])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mamba_inner_fn_with_fixed_B_and_proj_biases():
    torch.manual_seed(3)
    d, N, r = 8, 3, 2
    xz = torch.randn(1, 2 * d, 9, dtype=torch.float64)
    args = dict(conv1d_weight=torch.randn(d, 1, 4, dtype=torch.float64), conv1d_bias=torch.randn(d, dtype=torch.float64),
                x_proj_weight=torch.randn(r + 2 * N, d, dtype=torch.float64),
                delta_proj_weight=torch.randn(d, r, dtype=torch.float64),
                out_proj_weight=torch.randn(5, d, dtype=torch.float64), out_proj_bias=None,
                A=-torch.rand(d, N, dtype=torch.float64) - 0.5)
    fixed_B = torch.randn(d, N, dtype=torch.float64)
    out = mamba_inner_fn(xz, **args, B=fixed_B, C_proj_bias=torch.ones(N, dtype=torch.float64), backend="torch")
    # The same by hand: the fixed B replaces the B rows, the bias shifts the C rows.
    x, z = xz.chunk(2, dim=1)
    x = F.silu(reference_conv(x, args["conv1d_weight"].squeeze(1), args["conv1d_bias"]))
    x_dbl = x.transpose(1, 2) @ args["x_proj_weight"].t()
    delta = (x_dbl[..., :r] @ args["delta_proj_weight"].t()).transpose(1, 2)
    C = (x_dbl[..., -N:] + 1).transpose(1, 2)
    from ssm_kernels import selective_scan_ref
    y = selective_scan_ref(x, delta, args["A"], fixed_B, C, z=z, delta_softplus=True)
    torch.testing.assert_close(out, y.transpose(1, 2) @ args["out_proj_weight"].t(), rtol=1e-10, atol=1e-12)


def test_mamba_inner_fn_rms_weights_mean_what_mamba_ssm_means():
    """FalconMamba's norms as mamba_ssm applies them: B and C (d_state,) over the states, delta
    (d_inner,) over d_inner after dt_proj and before delta_bias; every gradient against float64
    by hand, weights that are not ones; a (dt_rank,) dt weight is refused, not reinterpreted."""
    torch.manual_seed(5)
    d, N, r, L = 8, 3, 2, 11
    xz = torch.randn(2, 2 * d, L, dtype=torch.float64, requires_grad=True)
    w = dict(conv1d_weight=torch.randn(d, 1, 4, dtype=torch.float64), conv1d_bias=torch.randn(d, dtype=torch.float64),
             x_proj_weight=torch.randn(r + 2 * N, d, dtype=torch.float64) / 3,
             delta_proj_weight=torch.randn(d, r, dtype=torch.float64),
             out_proj_weight=torch.randn(5, d, dtype=torch.float64), out_proj_bias=None,
             A=-torch.rand(d, N, dtype=torch.float64) - 0.5, D=torch.randn(d, dtype=torch.float64),
             delta_bias=torch.randn(d, dtype=torch.float64) - 1,
             b_rms_weight=torch.rand(N, dtype=torch.float64) + 0.5, c_rms_weight=torch.rand(N, dtype=torch.float64) + 0.5,
             dt_rms_weight=torch.rand(d, dtype=torch.float64) + 0.5)
    for t in w.values():
        if t is not None:
            t.requires_grad_()
    eps = 1e-6

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight

    x, z = xz.chunk(2, dim=1)
    x = F.silu(reference_conv(x, w["conv1d_weight"].squeeze(1), w["conv1d_bias"]))
    x_dbl = x.transpose(1, 2) @ w["x_proj_weight"].t()                          # (b, l, r + 2N)
    delta = rms(x_dbl[..., :r] @ w["delta_proj_weight"].t(), w["dt_rms_weight"])  # (b, l, d): after dt_proj
    B = rms(x_dbl[..., r:r + N], w["b_rms_weight"]).transpose(1, 2)
    C = rms(x_dbl[..., -N:], w["c_rms_weight"]).transpose(1, 2)
    from ssm_kernels import selective_scan_ref
    y = selective_scan_ref(x, delta.transpose(1, 2), w["A"], B, C, w["D"], z, w["delta_bias"], delta_softplus=True)
    want = y.transpose(1, 2) @ w["out_proj_weight"].t()
    got = mamba_inner_fn(xz, **w, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    leaves = [xz] + [t for t in w.values() if t is not None]
    cot = torch.randn(want.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, leaves, cot), torch.autograd.grad(want, leaves, cot)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match=r"dt_rms_weight: expected shape \(8,\)"):
        mamba_inner_fn(xz, **dict(w, dt_rms_weight=torch.ones(r, dtype=torch.float64)), backend="torch")


def test_causal_conv1d_update_continues_the_causal_conv():
    """Token by token (and two at a time), from a conv_state of the last inputs, the outputs of the
    full causal conv; the state ends as the last state_len inputs."""
    torch.manual_seed(6)
    x, w, b = torch.randn(2, 6, 9, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    full = causal_conv1d(x, w, b)
    for state_len in (3, 4):
        state = torch.zeros(2, 6, state_len, dtype=torch.float64)
        outs = [causal_conv1d_update(x[..., t], state, w, b, "silu") for t in range(5)]
        outs.append(causal_conv1d_update(x[..., 5:7], state, w, b, "silu"))
        outs.append(causal_conv1d_update(x[..., 7:], state, w.unsqueeze(1), b, "silu"))
        torch.testing.assert_close(torch.cat([o if o.dim() == 3 else o[..., None] for o in outs], -1), full)
        torch.testing.assert_close(state, x[..., -state_len:])


def test_causal_conv1d_matches_taps_and_refuses_bad_activation():
    torch.manual_seed(4)
    x, w, b = torch.randn(2, 6, 11, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(causal_conv1d(x, w, b, None), reference_conv(x, w, b))
    torch.testing.assert_close(causal_conv1d(x, w.unsqueeze(1), b), F.silu(reference_conv(x, w, b)))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, b, "relu")


def test_mamba_refuses_a_wrong_input_width():
    with pytest.raises(ValueError, match="hidden_states"):
        Mamba(16)(torch.randn(1, 5, 8))


def test_mamba_default_init_is_mamba_ssms():
    torch.manual_seed(5)
    m = Mamba(64, d_state=8, dt_min=0.001, dt_max=0.1)
    assert m.d_inner == 128 and m.dt_rank == 4
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 9, dtype=torch.float32)).repeat(128, 1))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.dt_proj.weight.abs().max() <= 4 ** -0.5
    assert dt.log().std() > 0.5  # log-uniform over two decades, not a constant


@pytest.mark.parametrize("tie", [False, True])
def test_mamba_lm_matches_the_reference_blocks(tie):
    torch.manual_seed(6)
    model = perturbed(MambaLM(16, 2, 30, d_state=4, tie_embeddings=tie, backend="torch").double())
    model.embedding_multiplier, model.readout_multiplier = 1.5, 0.5
    ids = torch.randint(0, 30, (2, 19))
    assert model(ids).shape == (2, 19, 32)  # vocab padded to a multiple of 8
    assert_module_matches(model, lambda p, i: reference_lm(model, p, i), ids, TOLERANCE[torch.float64])


def test_mamba_lm_trains_on_the_cpu():
    torch.manual_seed(7)
    model = MambaLM(32, 2, 50, d_state=8)
    ids = torch.randint(0, 50, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.loss(ids).item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(ids).backward()
        opt.step()
    assert model.loss(ids).item() < 0.8 * first


def mamba_ssm_state_dict(d_model, n_layer, vocab, d_state=16, d_conv=4, expand=2, seed=0):
    """The keys and shapes of mamba_ssm's MambaLMHeadModel (Mamba-1 mixer, RMSNorm, tied lm_head),
    written out here from its layout, with random values."""
    g = torch.Generator().manual_seed(seed)
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    shapes = {"backbone.embedding.weight": (vocab, d_model)}
    for i in range(n_layer):
        pre = f"backbone.layers.{i}."
        shapes.update({
            pre + "mixer.A_log": (d_inner, d_state), pre + "mixer.D": (d_inner,),
            pre + "mixer.in_proj.weight": (2 * d_inner, d_model),
            pre + "mixer.conv1d.weight": (d_inner, 1, d_conv), pre + "mixer.conv1d.bias": (d_inner,),
            pre + "mixer.x_proj.weight": (dt_rank + 2 * d_state, d_inner),
            pre + "mixer.dt_proj.weight": (d_inner, dt_rank), pre + "mixer.dt_proj.bias": (d_inner,),
            pre + "mixer.out_proj.weight": (d_model, d_inner), pre + "norm.weight": (d_model,)})
    shapes.update({"backbone.norm_f.weight": (d_model,), "lm_head.weight": (vocab, d_model)})
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # tied, as mamba_ssm saves it
    return sd


def test_mamba_lm_loads_a_mamba_ssm_checkpoint():
    sd = mamba_ssm_state_dict(d_model=32, n_layer=2, vocab=48, d_state=16)
    model = MambaLM(32, 2, 48, d_state=16)
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_mamba_loads_a_mamba_ssm_mixer_state_dict():
    sd = {k[len("backbone.layers.0.mixer."):]: v for k, v in mamba_ssm_state_dict(24, 1, 16).items()
          if k.startswith("backbone.layers.0.mixer.")}
    m = Mamba(24)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.x_proj.weight, sd["x_proj.weight"])
