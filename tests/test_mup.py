"""Parameterization presets: base-shape reduction to SP, param groups, the abc symmetry behind
x_proj's shared learning rate, init idempotence, LR schedulers."""

import math

import pytest
import torch

from ssm_kernels.modules import Mamba, MambaLM
from ssm_kernels.mup import PRESETS, ROLES, Parameterization, keep_lr_scale, parameter_roles
from ssm_kernels.mup.presets import DECAYED, Rule, check_table, share_learning_rate

CASES = [(p, o) for p in PRESETS for o in ("adam", "sgd")]


def lm(d_model=32, d_state=8, n_layer=2, tie=False):
    return MambaLM(d_model, n_layer, 40, d_state=d_state, tie_embeddings=tie, backend="torch")


@pytest.mark.parametrize("preset,optimizer", CASES)
def test_every_preset_is_sp_at_the_base_shape(preset, optimizer):
    model, sp_model = lm(), lm()
    p = Parameterization(preset, optimizer, base_d_inner=64, base_d_state=8)
    sp = Parameterization("sp", optimizer, base_d_inner=64, base_d_state=8)
    p.parameterize_(model, torch.Generator().manual_seed(0))
    sp.parameterize_(sp_model, torch.Generator().manual_seed(0))
    for (name, a), (_, b) in zip(model.named_parameters(), sp_model.named_parameters()):
        assert torch.equal(a, b), name  # the same draws: identical tensors
    assert all(v == 1.0 for v in p.multipliers(64, 8).values())
    assert (model.embedding_multiplier, model.readout_multiplier) == (1.0, 1.0)
    mixer = model.backbone.layers[0].mixer
    assert (mixer.scan.dt_scale, mixer.scan.b_scale, mixer.scan.c_scale) == (1.0, 1.0, 1.0)
    groups = p.param_groups(model, lr=1e-3, weight_decay=0.1)
    assert all(g["lr"] == 1e-3 and g["lr_scale"] == 1.0 for g in groups)


def test_sp_init_at_the_base_shape_is_mamba_ssms():
    """SP draws what MambaLM.reset_parameters (mamba_ssm's init) draws: the same constants, and
    uniform draws in the same bounds whose std is bound/sqrt(3) to sampling error (5 sigma)."""
    torch.manual_seed(0)
    d_model, d_state, n_layer = 64, 16, 2
    model = lm(d_model=d_model, d_state=d_state, n_layer=n_layer)
    ref = {n: t.clone() for n, t in model.state_dict().items()}
    Parameterization("sp", "adam", 2 * d_model, d_state).init_(model, torch.Generator().manual_seed(3))
    d_inner, dt_rank = 2 * d_model, 4
    bounds = {"in_proj.weight": d_model ** -0.5, "x_proj.weight": d_inner ** -0.5, "conv1d.weight": 0.5,
              "conv1d.bias": 0.5, "dt_proj.weight": dt_rank ** -0.5, "out_proj.weight": (d_inner * n_layer) ** -0.5,
              "lm_head.weight": d_model ** -0.5}
    for name, t in model.state_dict().items():
        if name.endswith(("A_log", ".D", "norm.weight", "norm_f.weight")):
            assert torch.equal(t, ref[name]), name
        elif name.endswith("dt_proj.bias"):
            for x in (t, ref[name]):
                dt = torch.nn.functional.softplus(x)
                assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        elif name.endswith("embedding.weight"):
            for x in (t, ref[name]):
                assert abs(x.std().item() / 0.02 - 1) < 5 * 0.71 / x.numel() ** 0.5, name
        else:
            bound = bounds[name.split("mixer.")[-1]]
            for x in (t, ref[name]):
                assert x.abs().max().item() <= bound * (1 + 1e-6), name
                assert abs(x.std().item() * 3 ** 0.5 / bound - 1) < 5 * 0.45 / x.numel() ** 0.5, name


def test_init_is_idempotent():
    model = lm()
    p = Parameterization("mup_ssm", "adam", 32, 4)
    p.init_(model, torch.Generator().manual_seed(1))
    first = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        for t in model.parameters():
            t.mul_(3.0).add_(1.0)
    p.init_(model, torch.Generator().manual_seed(1))
    p.init_(model, torch.Generator().manual_seed(1))
    for n, t in model.state_dict().items():
        assert torch.equal(t, first[n]), n


def expected_factor(p, role, kind, d_inner, d_state):
    e = getattr(p.table[role], kind)
    return (d_inner / p.base_d_inner) ** e[0] * (d_state / p.base_d_state) ** e[1]


@pytest.mark.parametrize("preset,optimizer", CASES)
def test_param_groups_follow_the_table(preset, optimizer):
    model = lm(d_model=128, d_state=32)  # d_inner 256 = 4x the base, d_state 32 = 4x the base
    p = Parameterization(preset, optimizer, base_d_inner=64, base_d_state=8)
    groups = p.param_groups(model, lr=0.01, weight_decay=0.1)
    roles = parameter_roles(model)
    where = {id(t): g for g in groups for t in g["params"]}
    assert len(where) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name, t in model.named_parameters():
        role = roles[name]
        g = where[id(t)]
        table_role = "x_proj_dt" if role == "x_proj" else role
        assert g["lr"] == pytest.approx(0.01 * expected_factor(p, table_role, "lr", 256, 32)), name
        assert g["lr"] == pytest.approx(0.01 * g["lr_scale"])
        wd = 0.1 * expected_factor(p, table_role, "wd", 256, 32) if table_role in DECAYED else 0.0
        assert g["weight_decay"] == pytest.approx(wd), name
        assert role in g["roles"]
    # Every group is usable by a plain torch optimizer.
    torch.optim.AdamW(groups).step()


def test_param_groups_of_mup_ssm_adam_by_hand():
    """Spot values: hidden matrices 1/N_u, vectors and the embedding Theta(1)."""
    model = lm(d_model=128, d_state=8)
    groups = Parameterization("mup_ssm", "adam", 64, 8).param_groups(model, lr=1.0)
    by_role = {r: g["lr"] for g in groups for r in g["roles"]}
    assert by_role["in_proj"] == by_role["out_proj"] == by_role["x_proj"] == by_role["dt_proj_weight"] == 0.25
    assert by_role["A_log"] == by_role["D"] == by_role["embedding"] == by_role["norm"] == 1.0


def test_roles_come_from_structure_and_unknown_parameters_are_refused():
    roles = parameter_roles(lm(tie=True))
    assert "lm_head.weight" not in roles and roles["backbone.embedding.weight"] == "embedding"
    assert roles["backbone.layers.1.mixer.x_proj.weight"] == "x_proj"
    assert set(roles.values()) - {"x_proj"} <= set(ROLES)
    model = lm()
    model.extra = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="extra.weight"):
        parameter_roles(model)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="preset"):
        Parameterization("ntk", "adam", 64, 16)
    with pytest.raises(ValueError, match="optimizer"):
        Parameterization("sp", "lion", 64, 16)
    table = dict(PRESETS["sp"]["adam"], A_log=Rule(init=(1, 0)))
    with pytest.raises(ValueError, match="A_log"):
        check_table(table)
    table = dict(PRESETS["sp"]["adam"], in_proj=Rule(mult=(1, 0)))
    with pytest.raises(ValueError, match="in_proj"):
        check_table(table)


def test_multipliers_reach_the_kernel_and_the_readout():
    model = lm(d_model=128, d_state=32)
    p = Parameterization("mup_ssm", "adam", 64, 8)
    p.apply_multipliers(model)
    m = p.multipliers(256, 32)
    scan = model.backbone.layers[1].mixer.scan
    assert (scan.dt_scale, scan.b_scale, scan.c_scale) == (m["dt_scale"], m["b_scale"], m["c_scale"])
    assert model.readout_multiplier == pytest.approx(0.25)  # muP readout: 1 / (N_u / N_u0)
    assert m["c_scale"] != 1.0  # mup_ssm's C rows differ from the dt rows in learning rate


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_shared_learning_rate_trains_like_per_row_learning_rates(optimizer):
    """The abc-symmetry move of share_learning_rate changes nothing: one optimizer step with the
    B/C rows at their own learning rate (applied by hand) gives the same function as the resolved
    preset's shared learning rate plus kernel multipliers."""
    torch.manual_seed(0)
    d_model, d_state, lr = 32, 8, 1e-2
    table = dict(PRESETS["mup"][optimizer],
                 x_proj_B=Rule(init=(-0.5, 0), lr=(-1.5, 0)), x_proj_C=Rule(init=(-0.5, 0), lr=(0.5, 0)))
    p = Parameterization("mup", optimizer, 16, d_state)
    p.table, p.resolved = table, share_learning_rate(table, optimizer)
    d_inner = 2 * d_model
    model = Mamba(d_model, d_state=d_state, backend="torch").double()
    p.parameterize_(model, torch.Generator().manual_seed(1))
    x = torch.randn(2, 9, d_model, dtype=torch.float64)
    target = torch.randn(2, 9, d_model, dtype=torch.float64)

    # (a) raw table: effective W = mult * w at the table's own (unresolved) learning rate per row.
    raw = {n: t.detach().clone() for n, t in model.named_parameters()}
    mult = p.multipliers(d_inner, d_state)
    r = model.dt_rank
    W = raw["x_proj.weight"].clone()
    W[r:r + d_state] *= mult["b_scale"]
    W[r + d_state:] *= mult["c_scale"]
    ref = Mamba(d_model, d_state=d_state, backend="torch").double()
    ref.load_state_dict(dict(raw, **{"x_proj.weight": W}))
    ref.scan.dt_scale = model.scan.dt_scale
    ((ref(x) - target) ** 2).mean().backward()
    g = ref.x_proj.weight.grad
    row_lr = torch.full_like(W[:, :1], lr * p.factor(table["x_proj_dt"].lr, d_inner, d_state))
    row_lr[r:r + d_state] = lr * p.factor(table["x_proj_B"].lr, d_inner, d_state)
    row_lr[r + d_state:] = lr * p.factor(table["x_proj_C"].lr, d_inner, d_state)
    step = g if optimizer == "sgd" else g / (g.abs() + 1e-30)  # Adam's first step is lr * sign(g)
    with torch.no_grad():
        ref.x_proj.weight -= row_lr * step

    # (b) resolved: shared learning rate, multipliers in the kernel, the optimizer on x_proj only.
    groups = p.param_groups(model, lr)
    x_group = [g for g in groups if any(t is model.x_proj.weight for t in g["params"])][0]
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls([{"params": [model.x_proj.weight], "lr": x_group["lr"]}], **({} if optimizer == "sgd" else
                                                                              {"eps": 1e-30}))
    ((model(x) - target) ** 2).mean().backward()
    opt.step()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-12)


def test_keep_lr_scale_under_a_scheduler():
    w1, w2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [w1], "lr": 0.5 * 0.25, "lr_scale": 0.25},
                           {"params": [w2], "lr": 0.5 * 4.0, "lr_scale": 4.0}])
    keep_lr_scale(opt)
    keep_lr_scale(opt)  # twice is once
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10, cycle_momentum=False)
    for _ in range(4):
        base = sched.get_last_lr()
        assert base[0] == base[1]  # the scheduler sees the unscaled lr
        before1, before2 = w1.detach().clone(), w2.detach().clone()
        w1.grad, w2.grad = torch.ones(3), torch.ones(3)
        opt.step()
        assert torch.allclose(before1 - w1, torch.full((3,), base[0] * 0.25))
        assert torch.allclose(before2 - w2, torch.full((3,), base[1] * 4.0))
        sched.step()


def test_keep_lr_scale_survives_a_failing_step_and_add_param_group():
    """A step that raises leaves the base lr (no compounding); a group added afterwards (with or
    without lr_scale) steps at its own scaled lr and the others keep theirs."""
    w1, w2, w3 = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = keep_lr_scale(torch.optim.SGD([{"params": [w1], "lr": 0.1 * 0.5, "lr_scale": 0.5}], lr=0.1))
    w1.grad = torch.ones(2)

    def boom(*args, **kwargs):
        raise RuntimeError("inf in a gradient")
    hook = opt.register_step_pre_hook(lambda *a: boom())
    for _ in range(2):
        with pytest.raises(RuntimeError, match="inf"):
            opt.step()
    hook.remove()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # the base lr, not 0.1 * 0.5 ** k
    opt.add_param_group({"params": [w2], "lr": 0.2 * 4.0, "lr_scale": 4.0})
    opt.add_param_group({"params": [w3]})  # no lr_scale: 1, the optimizer's default lr
    w2.grad, w3.grad = torch.ones(2), torch.ones(2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    opt.step()
    sched.step()
    assert torch.allclose(-w1, torch.full((2,), 0.1 * 0.5))
    assert torch.allclose(-w2, torch.full((2,), 0.2 * 4.0))
    assert torch.allclose(-w3, torch.full((2,), 0.1))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.2, 0.1])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_tied_readout_follows_the_presets_tied_rule(preset):
    """A tied lm_head is the embedding for init, lr and wd; the logits get presets.TIED's multiplier."""
    from ssm_kernels.mup.presets import TIED
    p = Parameterization(preset, "adam", 32, 8)
    model = lm(d_model=64, d_state=8, tie=True)  # d_inner 128: 4x the base
    p.parameterize_(model, torch.Generator().manual_seed(0))
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.readout_multiplier == pytest.approx(4.0 ** TIED[preset][0])
    assert model.backbone.embedding.weight.std().item() == pytest.approx(0.02 * p.factors("embedding", 128, 8)["init"],
                                                                         rel=0.05)
    groups = p.param_groups(model, lr=1.0, weight_decay=0.1)
    tied_group = [g for g in groups if any(t is model.lm_head.weight for t in g["params"])]
    assert len(tied_group) == 1 and tied_group[0]["roles"][0] == "embedding"
    assert tied_group[0]["lr_scale"] == pytest.approx(p.factors("embedding", 128, 8)["lr"])
    untied = lm(d_model=64, d_state=8, tie=False)
    p.apply_multipliers(untied)
    assert untied.readout_multiplier == pytest.approx(p.multipliers(128, 8)["readout"])


def test_spectral_tied_rule_is_the_abc_image_of_its_readout():
    """spectral's untied readout (init, mult, lr) moved by the abc symmetry onto the embedding's
    init and lr: the same t for both, and the multiplier that results is TIED's."""
    from ssm_kernels.mup.presets import TIED
    for optimizer, per_lr in (("adam", 1.0), ("sgd", 2.0)):
        table = PRESETS["spectral"][optimizer]
        readout, embedding = table["readout"], table["embedding"]
        t = embedding.init[0] - readout.init[0]
        assert readout.lr[0] + per_lr * t == embedding.lr[0]
        assert readout.mult[0] - t == TIED["spectral"][0]


def test_init_std_follows_the_table_across_widths():
    """mup_ssm at 4x N_u and 4x N_x: the C rows' std moves by the resolved exponents."""
    p = Parameterization("mup_ssm", "adam", 64, 8)
    model = lm(d_model=128, d_state=32)
    p.init_(model, torch.Generator().manual_seed(0))
    mixer = model.backbone.layers[0].mixer
    r = mixer.dt_rank
    c_rows = mixer.x_proj.weight[r + 32:]
    e = p.resolved["x_proj_C"].init
    expected = (1 / math.sqrt(3 * 64)) * 4 ** e[0] * 4 ** e[1]
    assert c_rows.std().item() == pytest.approx(expected, rel=0.05)
    in_std = mixer.in_proj.weight.std().item()
    assert in_std == pytest.approx(1 / math.sqrt(3 * 32) * 4 ** -0.5, rel=0.05)  # SP-like: 1/sqrt(3 fan_in)


def test_docs_presets_md_is_the_code():
    from pathlib import Path

    from ssm_kernels.mup.presets import presets_markdown
    doc = Path(__file__).resolve().parents[1] / "docs" / "presets.md"
    assert doc.read_text() == presets_markdown(), "regenerate with python -m ssm_kernels docs"
