"""transformers' MambaForCausalLM / FalconMambaForCausalLM and mamba_ssm's modules on our kernels
(ssm_kernels.integrations), and ssm_kernels.mup on them. The real libraries, tiny random configs,
no download. transformers comes with the test extra; mamba_ssm's sdist (installed without its CUDA
build, README's test command) imports only beside a stand-in for its missing `selective_scan_cuda`,
which these tests provide: that is the situation apply_to_mamba_ssm is for."""

import sys
import types

import pytest
import torch

from ssm_kernels.integrations import apply_to_mamba_ssm, apply_to_transformers, restore_multipliers
from ssm_kernels.modules import MambaLM
from ssm_kernels.mup import Parameterization, parameter_roles

transformers = pytest.importorskip("transformers")
from transformers import (FalconMambaConfig, FalconMambaForCausalLM, MambaConfig,  # noqa: E402
                          MambaForCausalLM)
from transformers.models.falcon_mamba import modeling_falcon_mamba  # noqa: E402
from transformers.models.mamba import modeling_mamba  # noqa: E402

transformers.logging.set_verbosity_error()
HF = [pytest.param(MambaForCausalLM, MambaConfig, id="mamba"),
      pytest.param(FalconMambaForCausalLM, FalconMambaConfig, id="falcon_mamba")]
VOCAB = 48  # a multiple of 8: MambaLM pads the vocabulary to one


@pytest.fixture
def patched():
    patch = apply_to_transformers()
    yield patch
    patch.undo()


def hf_model(cls, config_cls, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    config = config_cls(**dict(dict(vocab_size=VOCAB, hidden_size=16, state_size=5, num_hidden_layers=2, expand=2,
                                    conv_kernel=4, time_step_rank="auto", use_conv_bias=True), **overrides))
    return cls(config).to(dtype)


def logits_and_grads(model, ids, train):
    model.train(train)
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls,config_cls", HF)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_transformers_patched_equals_its_own_slow_path(cls, config_cls, dtype):
    """Logits and every parameter gradient, patched (training path and eval path) against
    transformers' own PyTorch path, unpatched; odd length 13. transformers returns fp32 logits
    (compared at fp32 tolerance), and FalconMamba's B/C/dt norms compute in fp32 whatever the
    model's dtype: its gradients are as precise as fp32, Mamba's in float64 as float64."""
    model = hf_model(cls, config_cls, dtype)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = logits_and_grads(model, ids, train=False)
    patch = apply_to_transformers()
    try:
        fp64 = dtype == torch.float64 and cls is MambaForCausalLM
        tol = dict(rtol=1e-9, atol=1e-9) if fp64 else dict(rtol=2e-4, atol=2e-5)
        for train in (True, False):
            logits, grads = logits_and_grads(model, ids, train)
            torch.testing.assert_close(logits, ref_logits, rtol=2e-6, atol=1e-6)
            for name, g in grads.items():
                assert torch.isfinite(g).all(), name
                torch.testing.assert_close(g, ref_grads[name], **tol, msg=name)
    finally:
        patch.undo()


@pytest.mark.parametrize("cls,config_cls", HF)
def test_transformers_patched_training_keeps_the_padding_mask(cls, config_cls):
    """A left-padded batch in training mode: the patched model zeroes the padded positions as
    transformers' own path does (mamba_ssm's fused call, which takes no mask, would not)."""
    model = hf_model(cls, config_cls)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    model.eval()
    expected = model(ids, attention_mask=mask).logits
    patch = apply_to_transformers()
    try:
        model.train()
        got = model(ids, attention_mask=mask).logits
        unmasked = model(ids).logits
    finally:
        patch.undo()
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)
    assert not torch.allclose(unmasked[1], expected[1])  # the mask matters for this batch


@pytest.mark.parametrize("cls,config_cls", HF)
def test_transformers_generate_gives_the_same_tokens(cls, config_cls):
    model = hf_model(cls, config_cls, torch.float32).eval()
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    patch = apply_to_transformers()
    try:
        got = model.generate(prompt, max_new_tokens=8, do_sample=False)
    finally:
        patch.undo()
    assert torch.equal(got, expected)


def test_transformers_patch_is_idempotent_and_undone():
    originals = {name: getattr(modeling_mamba, name) for name in ("mamba_inner_fn", "mamba_selective_scan",
                                                                  "mamba_selective_state_update")}
    forward = modeling_falcon_mamba.FalconMambaMixer.forward
    patch = apply_to_transformers()
    try:
        assert apply_to_transformers() is patch
        assert modeling_mamba.mamba_selective_scan.__module__ == "ssm_kernels.integrations.transformers_models"
        assert modeling_falcon_mamba.FalconMambaMixer.forward is not forward
        with pytest.raises(ValueError, match="backend"):
            apply_to_transformers(backend="torch")
    finally:
        patch.undo()
    assert {name: getattr(modeling_mamba, name) for name in originals} == originals
    assert modeling_falcon_mamba.FalconMambaMixer.forward is forward
    assert not patch.active


def test_undo_is_refused_while_a_parameterized_model_needs_the_patch():
    """undo() used to drop a mup_ssm model's dt/b/c multipliers silently while its embedding and
    readout multipliers stayed: neither the muP model nor SP. It is refused while such a model
    lives; setting its multipliers to 1 (the SP preset) or deleting it lets undo() through."""
    import gc
    patch = apply_to_transformers()
    try:
        hf = hf_model(MambaForCausalLM, MambaConfig)
        p = Parameterization("mup_ssm", "adam", base_d_inner=16, base_d_state=3)
        p.parameterize_(hf, torch.Generator().manual_seed(3))
        ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
        expected = hf.eval()(ids).logits
        with pytest.raises(RuntimeError, match=r"undo\(\): 2 mixer\(s\) of live models \(MambaMixer\)"):
            patch.undo()
        assert patch.active and modeling_mamba.mamba_selective_scan.__module__.startswith("ssm_kernels")
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=0)  # the model still computes its function
        Parameterization("sp", "adam", base_d_inner=16, base_d_state=3).apply_multipliers(hf)
        other = hf_model(FalconMambaForCausalLM, FalconMambaConfig)
        p.apply_multipliers(other)
        with pytest.raises(RuntimeError, match="FalconMambaMixer"):
            patch.undo()
        del other
        gc.collect()
    finally:
        patch.undo()
    assert not patch.active


def test_an_unknown_backend_is_refused_when_patching():
    from ssm_kernels.integrations import patching
    for apply in (apply_to_transformers, apply_to_mamba_ssm):
        with pytest.raises(ValueError, match="unknown backend 'bogus'"):
            apply(backend="bogus")
    assert not patching._ACTIVE


def test_falcon_mamba_inner_fn_declines_so_training_runs_transformers_path(patched):
    """transformers normalizes FalconMamba's dt before dt_proj, mamba_ssm's fused function after it.
    5.24 still calls the fused function in training: our stand-in declines it, so the model computes
    one function in train and eval. 5.25 has no fused path for FalconMamba: nothing is added."""
    if "mamba_inner_fn" in patched_names(patched, modeling_falcon_mamba):
        assert modeling_falcon_mamba.mamba_inner_fn(None) is None
    else:
        assert not hasattr(modeling_falcon_mamba, "mamba_inner_fn")
    assert modeling_mamba.mamba_inner_fn.__module__ == "ssm_kernels.integrations.transformers_models"


def patched_names(patch, module):
    return {attr for owner, attr, _ in patch._saved if owner is module}


def test_every_hook_point_the_version_has_is_patched(patched):
    """The required functions in both modeling modules, mamba_inner_fn where the version has it,
    and both mixers' forward; undo restores each."""
    from ssm_kernels.integrations.transformers_models import REQUIRED_HOOKS
    for module in (modeling_mamba, modeling_falcon_mamba):
        names = patched_names(patched, module)
        assert set(REQUIRED_HOOKS) <= names
        assert ("mamba_inner_fn" in names) == ("mamba_inner_fn" in vars(module))
        for name in names - {"MambaMixer", "FalconMambaMixer"}:
            assert getattr(module, name).__module__.startswith("ssm_kernels."), name
    assert modeling_mamba.MambaMixer in {owner for owner, attr, _ in patched._saved if attr == "forward"}


def test_a_modeling_module_without_a_hook_point_is_refused_before_anything_is_patched(monkeypatch):
    from ssm_kernels.integrations import patching
    monkeypatch.delattr(modeling_falcon_mamba, "causal_conv1d_update")
    before = (modeling_mamba.mamba_selective_scan, modeling_mamba.MambaMixer.forward)
    with pytest.raises(RuntimeError, match="modeling_falcon_mamba: has no causal_conv1d_update.*nothing was patched"):
        apply_to_transformers()
    assert (modeling_mamba.mamba_selective_scan, modeling_mamba.MambaMixer.forward) == before
    assert "transformers" not in patching._ACTIVE


@pytest.mark.parametrize("cls,config_cls", HF)
def test_a_mixer_that_bypasses_our_functions_raises(patched, monkeypatch, cls, config_cls):
    """What a later transformers (or kernelize() with a hub mapping) could do: the mixer runs a scan
    that is not ours. The multipliers would be dropped, so the patched forward refuses."""
    module = modeling_mamba if cls is MambaForCausalLM else modeling_falcon_mamba
    original = next(old for owner, attr, old in patched._saved if owner is module and attr == "mamba_selective_scan")
    monkeypatch.setattr(module, "mamba_selective_scan", original)
    model = hf_model(cls, config_cls, torch.float32).eval()
    with pytest.raises(RuntimeError, match="not ssm_kernels'"):
        model(torch.zeros(1, 4, dtype=torch.long))


def prefill_and_steps(model, ids, prompt, stop):
    """Logits of ids[:, prompt:stop] fed in one forward that continues from the prompt's cache, and
    fed token by token from another copy of that cache; then one more token on each cache."""
    one = model(ids[:, :prompt], use_cache=True).cache
    prefill = model(ids[:, prompt:stop], cache=one, use_cache=True).logits
    two = model(ids[:, :prompt], use_cache=True).cache
    steps = torch.cat([model(ids[:, t:t + 1], cache=two, use_cache=True).logits for t in range(prompt, stop)], 1)
    after = [model(ids[:, stop:stop + 1], cache=c, use_cache=True).logits for c in (one, two)]
    return prefill, steps, after


@pytest.mark.parametrize("cls,config_cls", HF)
def test_prefill_continuing_from_a_cache_equals_token_by_token_decoding(patched, cls, config_cls):
    """transformers' own chunked scan starts from zero when the cache already holds a state (its
    code says so); the patched scan takes the cache's state as initial_state. A mup_ssm model, so
    the multipliers are on: 6 tokens prefilled after a 5-token prompt equal 6 decoding steps and
    the uncached forward, and the cache the prefill leaves decodes the next token the same."""
    model = hf_model(cls, config_cls)
    Parameterization("mup_ssm", "adam", base_d_inner=16, base_d_state=3).parameterize_(
        model, torch.Generator().manual_seed(11))
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        prefill, steps, (after_prefill, after_steps) = prefill_and_steps(model, ids, 5, 11)
        full = model(ids).logits
    tol = dict(rtol=2e-6, atol=1e-6)  # transformers' logits are fp32
    torch.testing.assert_close(prefill, steps, **tol)
    torch.testing.assert_close(prefill, full[:, 5:11], **tol)
    torch.testing.assert_close(after_prefill, after_steps, **tol)
    torch.testing.assert_close(after_prefill, full[:, 11:12], **tol)


# -- muP-SSM on transformers' models ---------------------------------------------------------
def hf_to_ours(hf) -> MambaLM:
    c = hf.config
    ours = MambaLM(c.hidden_size, c.num_hidden_layers, c.vocab_size, d_state=c.state_size, expand=c.expand,
                   d_conv=c.conv_kernel, tie_embeddings=c.tie_word_embeddings).to(hf.dtype)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state)
    return ours


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("tied", [True, False])
def test_parameterized_transformers_step_equals_mamba_lm(patched, optimizer, tied):
    """mup_ssm at 2x the base width and N_x: roles from transformers' structure, the kernel
    multipliers through the integration, embedding/readout multipliers on its modules; one step
    gives what the same step gives on our MambaLM with the same weights. transformers' RMSNorm
    computes in fp32 whatever the model's dtype, and its logits are fp32: the comparison is at fp32
    tolerance (the loss of both on fp32 logits)."""
    hf = hf_model(MambaForCausalLM, MambaConfig, tie_word_embeddings=tied)
    p = Parameterization("mup_ssm", optimizer, base_d_inner=16, base_d_state=3)
    p.parameterize_(hf, torch.Generator().manual_seed(3))
    ours = hf_to_ours(hf)
    p.apply_multipliers(ours)
    assert parameter_roles(hf)["backbone.layers.1.mixer.x_proj.weight"] == "x_proj"
    assert ("lm_head.weight" in parameter_roles(hf)) is not tied
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    for model in (hf, ours):
        model.train()
        opt = opt_cls(p.param_groups(model, lr=1e-2))
        loss = hf(ids, labels=ids).loss if model is hf else ours.loss(ids)
        loss.backward()
        opt.step()
    after = hf_to_ours(hf)
    p.apply_multipliers(after)
    for (name, a), b in zip(ours.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    hf.eval()
    torch.testing.assert_close(hf(ids).logits, ours(ids).float(), rtol=2e-6, atol=1e-6)


def test_parameterized_falcon_mamba_sends_its_multipliers_to_the_kernel(patched, monkeypatch):
    """FalconMamba: every parameter has a role, and training, prefill and decoding steps hand the
    mixer's dt/b/c multipliers to our kernels (in its train path too)."""
    from ssm_kernels.integrations import transformers_models as tm
    hf = hf_model(FalconMambaForCausalLM, FalconMambaConfig)
    p = Parameterization("mup_ssm", "adam", base_d_inner=16, base_d_state=3)
    p.parameterize_(hf, torch.Generator().manual_seed(8))
    roles = parameter_roles(hf)
    assert set(roles.values()) >= {"embedding", "in_proj", "x_proj", "dt_proj_weight", "A_log", "D", "out_proj", "norm"}
    expected = {k: v for k, v in p.multipliers(32, 5).items() if k.endswith("_scale")}
    assert expected["c_scale"] != 1.0
    seen = []
    for name in ("selective_scan_fn", "selective_state_update"):
        real = getattr(tm, name)
        monkeypatch.setattr(tm, name, lambda *a, _real=real, **k: (seen.append(
            {key: k[key] for key in expected}), _real(*a, **k))[1])
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(9))
    hf.train()
    hf(ids, labels=ids).loss.backward()
    hf.eval()
    hf.generate(ids, max_new_tokens=3, do_sample=False)
    assert len(seen) >= 2 * 3 and all(call == expected for call in seen)


def test_multipliers_on_an_unpatched_transformers_model_are_refused():
    hf = hf_model(MambaForCausalLM, MambaConfig)
    with pytest.raises(RuntimeError, match="apply_to_transformers"):
        Parameterization("mup_ssm", "adam", 16, 3).apply_multipliers(hf)


def test_transformers_save_pretrained_keeps_the_multipliers(patched, tmp_path):
    """save_pretrained writes the multipliers; plain from_pretrained does not apply them (it reports
    the entries as unused: not silent), restore_multipliers does: the same logits."""
    hf = hf_model(MambaForCausalLM, MambaConfig, torch.float32)
    Parameterization("mup_ssm", "adam", 16, 3).parameterize_(hf, torch.Generator().manual_seed(5))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    expected = hf.eval()(ids).logits
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "backbone.layers.0.mixer.ssm_kernels_multipliers" in saved and "ssm_kernels_multipliers" in saved
    fresh = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert not torch.allclose(fresh(ids).logits, expected)  # what a user without the multipliers gets
    restore_multipliers(fresh, saved)
    torch.testing.assert_close(fresh(ids).logits, expected)
    with pytest.raises(RuntimeError, match="ssm_kernels_multipliers"):
        MambaForCausalLM(hf.config).load_state_dict(hf.state_dict())  # an unparameterized model refuses


# -- save / load of our own models ---------------------------------------------------------
def test_mamba_lm_save_load_keeps_the_function(tmp_path):
    torch.manual_seed(0)
    model = MambaLM(32, 2, VOCAB, d_state=8, tie_embeddings=False).double()
    Parameterization("mup_ssm", "adam", 16, 4).parameterize_(model, torch.Generator().manual_seed(1))
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = MambaLM(32, 2, VOCAB, d_state=8, tie_embeddings=False).double()
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert fresh.readout_multiplier == model.readout_multiplier != 1.0
    assert fresh.backbone.layers[1].mixer.scan.c_scale == model.backbone.layers[1].mixer.scan.c_scale != 1.0
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    # An SP model's state dict has no extra entries (mamba_ssm's own keys), and loading it into a
    # parameterized model warns: its multipliers stay, the function is not the checkpoint's.
    sp = MambaLM(32, 2, VOCAB, d_state=8, tie_embeddings=False).double()
    assert not any("ssm_kernels" in k for k in sp.state_dict())
    with pytest.warns(UserWarning, match="no width multipliers"):
        model.load_state_dict(sp.state_dict())


def test_a_deepcopy_saves_its_own_multipliers():
    import copy
    model = MambaLM(16, 1, VOCAB, d_state=4)
    twin = copy.deepcopy(model)
    Parameterization("mup_ssm", "adam", 8, 2).apply_multipliers(twin)
    assert "ssm_kernels_multipliers" in twin.state_dict() and "ssm_kernels_multipliers" not in model.state_dict()


# -- mamba_ssm ---------------------------------------------------------------------------------
@pytest.fixture
def mamba_ssm(monkeypatch):
    """mamba_ssm as a plain pip install leaves it: no CUDA build (the stand-in module has no kernels)."""
    if "selective_scan_cuda" not in sys.modules:
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    module = pytest.importorskip("mamba_ssm")
    patch = apply_to_mamba_ssm()
    yield module
    patch.undo()


def test_mamba_ssm_mixer_equals_ours_and_decodes(mamba_ssm):
    from mamba_ssm.modules.mamba_simple import Mamba as TheirMamba
    from mamba_ssm.utils.generation import InferenceParams as TheirParams

    from ssm_kernels.modules import InferenceParams, Mamba
    # mamba_ssm casts A, D and dt_proj.bias to fp32 before the scan, whatever the model's dtype:
    # outputs and gradients agree at fp32 precision.
    tol = dict(rtol=2e-5, atol=1e-7)
    torch.manual_seed(0)
    theirs = TheirMamba(16, d_state=5, layer_idx=0).double()
    ours = Mamba(16, d_state=5, layer_idx=0).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    for use_fast_path in (True, False):
        theirs.use_fast_path = use_fast_path
        out = theirs(x)
        expected = ours(x)
        torch.testing.assert_close(out, expected, **tol)
        g_theirs = torch.autograd.grad(out.square().sum(), [x] + list(theirs.parameters()))
        g_ours = torch.autograd.grad(expected.square().sum(), [x] + list(ours.parameters()))
        for a, b in zip(g_theirs, g_ours):
            torch.testing.assert_close(a, b, **tol)
    # prefill 6 tokens, then 5 steps, against our decoding
    theirs_cache, ours_cache = TheirParams(max_seqlen=11, max_batch_size=2), InferenceParams(11, 2)
    for start, stop in ((0, 6),) + tuple((t, t + 1) for t in range(6, 11)):
        a = theirs(x[:, start:stop].detach(), inference_params=theirs_cache)
        b = ours(x[:, start:stop].detach(), inference_params=ours_cache)
        torch.testing.assert_close(a, b, **tol)
        theirs_cache.seqlen_offset += stop - start
        ours_cache.seqlen_offset += stop - start


def test_parameterized_mamba_ssm_lm_equals_mamba_lm(mamba_ssm):
    """mamba_ssm's MambaLMHeadModel (RMSNorm, fused add-norm: its Triton norms, here their PyTorch
    stand-in) parameterized by mup_ssm: logits and one Adam step equal our MambaLM's (at fp32
    tolerance: mamba_ssm casts A, D and dt_proj.bias to fp32)."""
    from mamba_ssm.models.config_mamba import MambaConfig as TheirConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    torch.manual_seed(0)
    config = TheirConfig(d_model=16, n_layer=2, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba1", "d_state": 5},
                         rms_norm=True, fused_add_norm=True, residual_in_fp32=True, pad_vocab_size_multiple=8)
    theirs = MambaLMHeadModel(config).double()
    p = Parameterization("mup_ssm", "adam", base_d_inner=16, base_d_state=3)
    p.parameterize_(theirs, torch.Generator().manual_seed(1))
    ours = MambaLM(16, 2, VOCAB, d_state=5).double()
    ours.load_state_dict(theirs.state_dict())  # the multipliers come with the state dict
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=2e-5, atol=1e-7)
    for model in (theirs, ours):
        opt = torch.optim.Adam(p.param_groups(model, lr=1e-2))
        logits = model(ids).logits if model is theirs else model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        opt.step()
    torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=2e-5, atol=1e-7)


def test_mamba_ssm_unpatched_needs_its_cuda_build(monkeypatch):
    if "selective_scan_cuda" not in sys.modules:
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    pytest.importorskip("mamba_ssm")
    from mamba_ssm.modules.mamba_simple import Mamba as TheirMamba
    with pytest.raises(Exception):
        TheirMamba(16, d_state=5).double()(torch.randn(1, 4, 16, dtype=torch.float64))


def test_apply_to_mamba_ssm_says_when_mamba_ssm_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm.modules.mamba_simple", None)  # import raises ImportError
    with pytest.raises(ImportError, match="mamba_ssm: does not import"):
        apply_to_mamba_ssm()
    monkeypatch.undo()
    from ssm_kernels.integrations import patching
    assert "mamba_ssm" not in patching._ACTIVE  # the failed attempt left nothing behind
