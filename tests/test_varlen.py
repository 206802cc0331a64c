"""Packed variable-length sequences (cu_seqlens): the packed scan equals each sequence run on its
own (out, last states, every gradient, initial states included), on every backend; bad cu_seqlens."""

import pytest
import torch

from scan_cases import SLOW, as_leaves, assert_matches, cpp_case, make_inputs, triton_case
from ssm_kernels import selective_scan_fn, selective_scan_ref
from ssm_kernels.testing import MULTIPLIERS

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# empty sequences, a single step, and lengths that straddle the "torch" (64) and interpreted
# Triton (16 / 32) chunk boundaries
LENGTHS = [0, 5, 1, 70, 0, 17]


def _packed_inputs(bc, initial_state, lengths=LENGTHS, seed=0):
    master = make_inputs(batch=1, dim=4, seqlen=sum(lengths), d_state=3, B=bc, C=bc, groups=2,
                         initial_state=False, seed=seed)
    if initial_state:
        master["initial_state"] = torch.randn(len(lengths), 4, 3, generator=torch.Generator().manual_seed(seed + 1),
                                              dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return master, cu


def _loss(out, last, rounding=None, seed=2):
    """A random linear function of out and last; cotangents rounded to `rounding` (default out's
    dtype), so that the float64 reference sees the same values."""
    g = torch.Generator().manual_seed(seed)
    rounding = rounding or out.dtype
    w_out, w_last = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(rounding) for t in (out, last))
    return (out * w_out.to(out)).sum() + (last * w_last.to(last)).sum()


def _separately(leaves, cu):
    """The float64 reference, one sequence at a time."""
    bounds = cu.tolist()
    outs, lasts = [], []
    h0 = leaves.get("initial_state")
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        start = None if h0 is None else h0[s:s + 1]
        if a == b:
            lasts.append(start if start is not None else torch.zeros(1, 4, 3, dtype=torch.float64))
            continue
        cut = {n: (t[..., a:b] if n in ("u", "delta", "z") or (n in "BC" and t.dim() > 2) else t)
               for n, t in leaves.items() if n != "initial_state"}
        out, last = selective_scan_ref(*(cut.get(n) for n in ARGS), delta_softplus=True, return_last_state=True,
                                       initial_state=start, **MULTIPLIERS)
        outs.append(out)
        lasts.append(last)
    return torch.cat(outs, dim=-1), torch.cat(lasts, dim=0)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), triton_case(torch.float32),
                                            ("ref", torch.float64), cpp_case(torch.float64), cpp_case(torch.float32)])
@pytest.mark.parametrize("bc, initial_state", [("grouped", True), ("fixed", False), ("variable", True)])
def test_packed_equals_each_sequence_alone(backend, dtype, bc, initial_state):
    master, cu = _packed_inputs(bc, initial_state)
    leaves = as_leaves(master, dtype)
    out, last = selective_scan_fn(*(leaves.get(n) for n in ARGS), delta_softplus=True, return_last_state=True,
                                  initial_state=leaves.get("initial_state"), backend=backend, cu_seqlens=cu, **MULTIPLIERS)
    grads = torch.autograd.grad(_loss(out, last), list(leaves.values()))
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref_out, ref_last = _separately(ref_leaves, cu)
    ref_grads = torch.autograd.grad(_loss(ref_out, ref_last, rounding=dtype), list(ref_leaves.values()))
    assert last.shape == (len(LENGTHS), 4, 3)
    assert_matches("out", out, ref_out, dtype)
    assert_matches("last_state", last, ref_last, dtype)
    for name, g, r in zip(leaves, grads, ref_grads):
        assert g.dtype == leaves[name].dtype, name
        assert_matches(f"d{name}", g, r, dtype)


@SLOW
def test_packed_triton_deterministic(monkeypatch):
    monkeypatch.setenv("SSM_KERNELS_DETERMINISTIC", "1")
    master, cu = _packed_inputs("grouped", True, lengths=[3, 0, 9], seed=4)
    runs = []
    for _ in range(2):
        leaves = as_leaves(master, torch.float32)
        out, last = selective_scan_fn(*(leaves.get(n) for n in ARGS), delta_softplus=True, return_last_state=True,
                                      initial_state=leaves["initial_state"], backend="triton", cu_seqlens=cu)
        runs.append(torch.autograd.grad(_loss(out, last), [leaves["B"], leaves["C"], leaves["initial_state"]]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _bad(**change):
    master, cu = _packed_inputs("variable", True, lengths=[2, 3])
    args = {n: t for n, t in master.items()}
    args["cu_seqlens"] = cu
    args.update(change)
    return selective_scan_fn(*(args.get(n) for n in ARGS), initial_state=args["initial_state"],
                             cu_seqlens=args["cu_seqlens"], backend="torch")


@pytest.mark.parametrize("change, error, match", [
    (dict(cu_seqlens=torch.tensor([0.0, 2.0, 5.0])), TypeError, "int32 or int64"),
    (dict(cu_seqlens=torch.tensor([1, 2, 5])), ValueError, "start at 0 and end at L=5"),
    (dict(cu_seqlens=torch.tensor([0, 2, 4])), ValueError, "start at 0 and end at L=5"),
    (dict(cu_seqlens=torch.tensor([0, 4, 2, 5])), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0])), ValueError, r"num_seqs \+ 1"),
    (dict(cu_seqlens=torch.tensor([[0, 2, 5]])), ValueError, r"num_seqs \+ 1"),
    (dict(u=torch.randn(2, 4, 5, dtype=torch.float64)), ValueError, "take batch 1"),
    (dict(initial_state=torch.randn(3, 4, 3, dtype=torch.float64)), ValueError, r"initial_state: expected shape \(2"),
])
def test_bad_cu_seqlens(change, error, match):
    with pytest.raises(error, match=match):
        _bad(**change)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), triton_case(torch.float32), cpp_case(torch.float64)])
def test_packed_model_equals_each_sequence_alone(backend, dtype):
    """MambaLM (its Mamba layers' conv and scan) with cu_seqlens: logits and every parameter
    gradient equal the model run on each sequence by itself (on the "torch" backend); no conv tap
    leaks across."""
    from ssm_kernels.modules import MambaLM
    from ssm_kernels.mup import Parameterization
    torch.manual_seed(0)
    d_model, n_layer = (4, 1) if backend == "triton" else (8, 2)  # the interpreter is slow
    model = MambaLM(d_model, n_layer, 16, d_state=3, backend=backend).to(dtype)
    Parameterization("mup_ssm", "adam", base_d_inner=d_model, base_d_state=3).parameterize_(model)
    lengths = [2, 0, 1, 6] if backend == "triton" else [2, 0, 1, 70, 4]
    ids = torch.randint(0, 16, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    weights = torch.randn(1, sum(lengths), model.padded_vocab_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    packed = model(ids, cu_seqlens=cu)
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for layer in model.backbone.layers:  # the sequences alone on the "torch" backend (fast in CI)
        layer.mixer.scan.backend = "torch"
    alone = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            alone.append(model(ids[:, a:b]))
    alone = torch.cat(alone, dim=1)
    (alone * weights).sum().backward()
    assert_matches("logits", packed, alone, dtype)
    for n, p in model.named_parameters():
        assert_matches(f"d {n}", packed_grads[n], p.grad, dtype)


def test_packed_mamba_inner_fn_equals_each_sequence_alone():
    from ssm_kernels.modules import Mamba, mamba_inner_fn
    torch.manual_seed(0)
    m = Mamba(8, d_state=3).double()
    lengths = [3, 0, 1, 7]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    xz = torch.randn(1, 2 * m.d_inner, sum(lengths), dtype=torch.float64)
    args = (m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight, m.out_proj.bias,
            -torch.exp(m.A_log))
    kwargs = dict(D=m.D, delta_bias=m.dt_proj.bias, **MULTIPLIERS, backend="torch")
    packed = mamba_inner_fn(xz, *args, cu_seqlens=cu, **kwargs)
    alone = torch.cat([mamba_inner_fn(xz[..., a:b], *args, **kwargs)
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a], dim=1)
    assert_matches("out", packed, alone, torch.float64)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), triton_case(torch.float32), cpp_case(torch.float64)])
def test_packed_forward_writes_every_saved_state_slot(backend, dtype):
    """The slots between sequences used to stay as allocated (NaN here, garbage outside tests):
    two eager calls returned different chunk_states, and opcheck's dynamic-shape test failed.
    Every slot is now written, so the op's outputs are finite and the same call to call."""
    from ssm_kernels.ops.selective_scan.checks import check_inputs
    master, cu = _packed_inputs("variable", True, lengths=[0, 5, 5, 70] if backend != "triton" else [0, 5, 5, 20])
    leaves = as_leaves(master, dtype)
    B, C, groups = check_inputs(*(leaves[n] for n in ARGS), initial_state=leaves["initial_state"], state_rows=len(cu) - 1)
    args = (leaves["u"], leaves["delta"], leaves["A"], B, C, leaves["D"], leaves["z"], leaves["delta_bias"],
            leaves["initial_state"], groups, True, 0.5, 2.0, 0.25, backend, cu)
    first = torch.ops.ssm_kernels.selective_scan_fwd(*args)
    second = torch.ops.ssm_kernels.selective_scan_fwd(*args)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    if backend == "torch":
        torch.library.opcheck(torch.ops.ssm_kernels.selective_scan_fwd.default, args)


@pytest.mark.parametrize("bad, error", [
    (torch.tensor([[0, 2, 5]]), ValueError), (torch.tensor(5), ValueError), (torch.tensor([], dtype=torch.int64),
                                                                             ValueError),
    (torch.tensor([0, 2, 5], device="meta"), ValueError), ([0, 2, 5], TypeError)])
def test_modules_name_a_malformed_cu_seqlens(bad, error):
    """Mamba, MambaLM and mamba_inner_fn run the packed conv before the scan: its validation comes
    first, so the error names cu_seqlens (it used to be searchsorted's, an IndexError, ...)."""
    from ssm_kernels.modules import Mamba, MambaLM, mamba_inner_fn
    torch.manual_seed(0)
    lm = MambaLM(8, 1, 16, d_state=3, backend="torch")
    mixer = lm.backbone.layers[0].mixer
    xz = torch.randn(1, 2 * mixer.d_inner, 5)
    calls = [lambda: lm(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=bad),
             lambda: Mamba(8, d_state=3)(torch.randn(1, 5, 8), cu_seqlens=bad),
             lambda: mamba_inner_fn(xz, mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight,
                                    mixer.dt_proj.weight, mixer.out_proj.weight, None, -torch.exp(mixer.A_log),
                                    cu_seqlens=bad)]
    for call in calls:
        with pytest.raises(error, match="cu_seqlens"):
            call()
