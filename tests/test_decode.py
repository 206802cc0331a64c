"""Decoding: step-by-step and prefill + decode equal the full forward (float64, every position),
for plain and parameterized models; generate; sampling; bad input."""

import pytest
import torch

from ssm_kernels.testing import TOLERANCE, relative_error
from ssm_kernels.modules import InferenceParams, Mamba, MambaLM
from ssm_kernels.modules.inference import sample
from ssm_kernels.mup import Parameterization


def _model(parameterized, dtype=torch.float64, backend="torch", d_model=16):
    torch.manual_seed(0)
    model = MambaLM(d_model, 2, 32, d_state=4, backend=backend).to(dtype)
    if parameterized:  # wider than the base: multipliers != 1, reaching the decode kernel too
        Parameterization("mup_ssm", "sgd", base_d_inner=d_model // 2, base_d_state=4).parameterize_(
            model, torch.Generator().manual_seed(1))
        assert model.backbone.layers[0].mixer.scan.b_scale != 1.0
    return model


def _decode(model, ids, prefill):
    """Logits of every position: the first `prefill` tokens in one forward, then one per call."""
    params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=ids.shape[0])
    outs = [model(ids[:, :prefill], params)]
    params.seqlen_offset += prefill
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], params))
        params.seqlen_offset += 1
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("parameterized", [False, True])
@pytest.mark.parametrize("prefill", [1, 5])
def test_decoding_equals_the_full_forward(parameterized, prefill):
    model = _model(parameterized)
    ids = torch.randint(0, 32, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        decoded = _decode(model, ids, prefill)
    assert relative_error(decoded, full) <= TOLERANCE[torch.float64]


def test_decoding_on_triton_fp32():
    """The Triton scan for the prefill and the Triton state update for the steps (interpreted),
    against the "torch" backend's full forward."""
    model = _model(True, torch.float32, backend="triton", d_model=8)
    reference = _model(True, torch.float32, backend="torch", d_model=8)
    ids = torch.randint(0, 32, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(_decode(model, ids, 1), reference(ids)) <= TOLERANCE[torch.float32]


def test_greedy_generate_follows_the_full_forward():
    model = _model(True)
    prompt = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[:, 3:].argmax(-1), out[:, 4:])


def test_sampled_generate_is_reproducible_and_eos_sticks():
    model = _model(False)
    prompt = torch.randint(0, 32, (4, 3), generator=torch.Generator().manual_seed(5))
    a = model.generate(prompt, 8, temperature=1.5, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 8, temperature=1.5, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    eos = int(a[0, 5])
    c = model.generate(prompt, 8, temperature=1.5, top_k=10, top_p=0.9, eos_token_id=eos,
                       generator=torch.Generator().manual_seed(0))
    first = (c[0, 3:] == eos).nonzero()[0, 0] + 3
    assert (c[0, first:] == eos).all()


def test_sample_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {1}  # token 1 alone has p > 0.5
    assert set(sample(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}
    assert torch.equal(sample(logits, 0.0), torch.ones(200, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"), (dict(max_new_tokens=2, top_k=-2), "top_k"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
])
def test_generate_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(False).generate(torch.zeros(1, 2, dtype=torch.long), **kwargs)


def test_step_takes_one_token_and_a_layer_index():
    mixer = Mamba(8, d_state=4, layer_idx=0).double()
    conv, ssm = mixer.allocate_inference_cache(2, 5)
    with pytest.raises(ValueError, match="one token"):
        mixer.step(torch.zeros(2, 3, 8, dtype=torch.float64), conv, ssm)
    with pytest.raises(ValueError, match="needs layer_idx"):
        Mamba(8, d_state=4)(torch.zeros(2, 3, 8), InferenceParams(5, 2))


def test_generate_never_samples_a_padded_vocabulary_id(monkeypatch):
    """vocab_size 37 pads the tables to 40 (mamba_ssm's convention); the model keeps its real size
    and sampling (which drew ids 37-39 before) stays below it, even where the padded logits win."""
    torch.manual_seed(0)
    model = MambaLM(16, 1, 37, d_state=4, backend="torch")
    assert (model.vocab_size, model.padded_vocab_size) == (37, 40)
    assert model.lm_head.weight.shape[0] == model.backbone.embedding.weight.shape[0] == 40
    forward = model.forward
    boost = torch.cat([torch.zeros(37), torch.full((3,), 100.0)])  # the padded logits win by far
    monkeypatch.setattr(model, "forward", lambda *a, **k: forward(*a, **k) + boost)
    prompt = torch.randint(0, 37, (4, 3), generator=torch.Generator().manual_seed(1))
    assert model(prompt).argmax(-1).min() >= 37
    for kwargs in (dict(temperature=1.0), dict(temperature=0.0), dict(temperature=2.0, top_k=5)):
        out = model.generate(prompt, 40, generator=torch.Generator().manual_seed(2), **kwargs)
        assert int(out.max()) < 37, kwargs


def test_a_tiny_temperature_samples_the_argmax():
    """temperature 1e-40 (below fp32's normal range) used to end in 'probability tensor contains
    inf, nan'; it is the greedy limit."""
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0], [5.0, 1.0, 4.999, 0.0]])
    for temperature in (1e-40, 1e-300):
        assert sample(logits, temperature, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]
    model = _model(False, torch.float32)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    assert torch.equal(model.generate(prompt, 4, temperature=1e-40), model.generate(prompt, 4, temperature=0))


def test_generate_names_input_ids_when_they_are_not_token_ids():
    for prompt in (torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool)):
        with pytest.raises(TypeError, match="input_ids"):
            _model(False).generate(prompt, 2)
