"""Inputs a hostile user would try: growing scans, strong decay, huge |A|, infinities. Every
output and gradient is finite wherever the float64 reference is, and as accurate as usual."""

import pytest
import torch

from scan_cases import SCAN_BACKENDS, DEVICE, as_leaves, assert_matches, check_against_reference, make_inputs, run_scan
from ssm_kernels import selective_scan_fn, selective_scan_ref

BACKENDS = SCAN_BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [2.0, 6.0])
def test_growing_scan_from_a_zero_state_is_not_nan(backend, dt):
    """dt * A = dt > 0 for 70 steps: the decay product over a chunk is inf (6 is enough for the
    interpreter's small tiles), the state is 0 until the last step, whose output is
    dt * B * u * C = dt (the reported case, with dt = 2)."""
    u = torch.zeros(1, 1, 70, device=DEVICE)
    u[..., -1] = 1
    ones = torch.ones(1, 1, device=DEVICE)
    out = selective_scan_fn(u, torch.full((1, 1, 70), dt, device=DEVICE), ones, ones, ones, backend=backend)
    expected = torch.zeros(70)
    expected[-1] = dt
    assert torch.equal(out.cpu(), expected.view(1, 1, 70))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["positive-A", "negative-dt"])
def test_growing_scans_match_the_reference(backend, case):
    """dt * A > 0 (positive A, or negative dt without softplus), grown over tens of steps to about
    1e20 (dA to 1e21), inside the float32 range, from a mostly zero input: every output
    and gradient."""
    master = make_inputs(batch=1, dim=3, seqlen=45, d_state=3, B="variable", C="variable", bias=False, seed=11)
    keep = torch.rand(master["u"].shape, generator=torch.Generator().manual_seed(2)) < 0.2
    master["u"] = master["u"] * keep
    master["delta"] = 0.9 + 0.2 * master["delta"]
    master["A"] = 0.5 * master["A"].abs() + 0.3  # dt * A in about [0.3, 1.1]
    if case == "negative-dt":
        master["delta"], master["A"] = -master["delta"], -master["A"]
    call = dict(delta_softplus=False, return_last_state=True)
    check_against_reference(backend, master, torch.float32, **call)
    out, last, grads = run_scan(selective_scan_fn, as_leaves(master, torch.float32), backend=backend, **call)
    assert last.abs().max() > 1e18  # the scan really grew
    assert all(torch.isfinite(t).all() for t in (out, last, *grads.values()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dA_is_accurate_per_entry_under_strong_decay(backend):
    """dt * A around -16 in float32: a_t h_{t-1} is about 1e-7 of h_t, so computing it as h_t - x_t
    cancels. Each dA entry is within 1e-4 of the float64 reference, relative to itself."""
    master = make_inputs(batch=2, dim=3, seqlen=70, d_state=5, B="variable", C="variable", seed=4)
    master["delta"] = 1.0 + 0.01 * master["delta"]
    master["A"] = -16.0 * (1.0 + 0.1 * torch.rand(master["A"].shape, generator=torch.Generator().manual_seed(3),
                                                  dtype=torch.float64))
    call = dict(delta_softplus=False, return_last_state=True)
    _, _, grads = run_scan(selective_scan_fn, as_leaves(master, torch.float32), backend=backend, **call)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in as_leaves(master, torch.float32).items()}
    _, _, ref = run_scan(selective_scan_ref, ref_leaves, cotangent_dtype=torch.float32, **call)
    dA, dA_ref = grads["A"].double().cpu(), ref["A"]
    judged = dA_ref.abs() >= 1e-30
    assert judged.all()
    worst = ((dA - dA_ref).abs() / dA_ref.abs())[judged].max().item()
    assert worst <= 1e-4, f"dA entry off by {worst:.3g} relative"


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_negative_A_is_finite(backend):
    """A <= -2.4e38: A * log2(e) would overflow to -inf, and -inf * (dt = 0 on padding) is NaN."""
    master = make_inputs(batch=1, dim=4, seqlen=37, d_state=3, seed=6)
    master["A"][0, 1] = -3.0e38
    master["A"][2, 0] = -torch.finfo(torch.float32).max
    check_against_reference(backend, master, torch.float32, delta_softplus=True, return_last_state=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_state", [3, 5])
def test_infinite_input_stays_infinite_not_nan(backend, d_state):
    """u = +inf at one step with B, C, D > 0 (N not a power of two, so a kernel could pad states):
    out is +inf from that step on, exactly where the reference is, and close to it elsewhere."""
    master = make_inputs(batch=1, dim=2, seqlen=37, d_state=d_state, B="variable", C="variable", z=False,
                         initial_state=False, seed=8)
    for name in ("B", "C", "D"):
        master[name] = master[name].abs() + 0.1
    master["u"][0, 1, 20] = float("inf")
    leaves = as_leaves(master, torch.float32)
    out = selective_scan_fn(*(leaves.get(n) for n in ("u", "delta", "A", "B", "C", "D")), backend=backend)
    ref = selective_scan_ref(*(leaves[n].detach().double().cpu() for n in ("u", "delta", "A", "B", "C", "D")))
    out = out.detach().double().cpu()
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)) and torch.isposinf(ref).any()
    assert torch.isfinite(out[torch.isfinite(ref)]).all()
    assert_matches("out", out[torch.isfinite(ref)], ref[torch.isfinite(ref)], torch.float32)


def _overflowing_adjoint(case):
    """dt * A up to 2 for 75 steps: the adjoint dL/dh at the first steps is about e^150, beyond
    float32, while the gradients are within range because what it multiplies is 0 (no input
    before step 69, so u and h are 0 there) or tiny (a state grown from 1e-30)."""
    master = make_inputs(batch=1, dim=2, seqlen=75, d_state=3, B="variable", C="variable", D=False, z=False,
                         bias=case == "negative-dt", initial_state=case == "tiny-initial-state", seed=21)
    g = torch.Generator().manual_seed(22)
    master["A"] = 0.5 + 0.5 * torch.rand(2, 3, generator=g, dtype=torch.float64)
    master["delta"] = torch.full((1, 2, 75), 2.0, dtype=torch.float64)
    master["u"][..., :69] = 0.0
    if case == "negative-dt":  # dt = delta - 3 in [-3, -2], no softplus, with a decaying A: growth again
        master["A"] = -master["A"]
        master["delta"] = torch.rand(1, 2, 75, generator=g, dtype=torch.float64)
        master["delta_bias"] = torch.full((2,), -3.0, dtype=torch.float64)
    if case == "tiny-initial-state":
        master["u"].zero_()
        master["initial_state"] = torch.full((1, 2, 3), 1e-30, dtype=torch.float64)
    return master


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["late-input", "negative-dt", "tiny-initial-state"])
def test_gradients_are_finite_where_the_reference_is_although_the_adjoint_overflows(backend, case):
    """The reported cases (fp32): ddelta, dA, dB were inf or NaN (the adjoint's inf times 0, or an
    overflowed adjoint times a tiny state) where the float64 reference is finite and within fp32's
    range. Every such entry is now finite and accurate; entries beyond fp32's range are inf, not NaN."""
    leaves = as_leaves(_overflowing_adjoint(case), torch.float32)
    call = dict(delta_softplus=False, return_last_state=True)
    _, _, grads = run_scan(selective_scan_fn, leaves, backend=backend, **call)
    ref_leaves = {n: t.detach().double().cpu().requires_grad_() for n, t in leaves.items()}
    _, _, ref = run_scan(selective_scan_ref, ref_leaves, cotangent_dtype=torch.float32, **call)
    big = torch.finfo(torch.float32).max
    assert (ref["u"].abs() > big).any()  # the adjoint really leaves fp32's range
    for name, grad in grads.items():
        grad, expected = grad.detach().double().cpu(), ref[name]
        in_range = torch.isfinite(expected) & (expected.abs() <= big)
        assert torch.isfinite(grad[in_range]).all(), f"d{name}: not finite where the reference is"
        assert not torch.isnan(grad).any(), f"d{name}: NaN"
        if in_range.any():  # d initial_state is all beyond range in the tiny-state case
            assert_matches(f"d{name}", grad[in_range], expected[in_range], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_with_an_overflowing_adjoint(backend):
    """The same float64 recomputation for packed sequences (cu_seqlens, an empty one between):
    each sequence's state entering it is read from its own saved slot. The gradients equal those
    of each sequence alone."""
    one = as_leaves(_overflowing_adjoint("late-input"), torch.float32)
    two = as_leaves(_overflowing_adjoint("negative-dt"), torch.float32)
    two["delta"] = (two["delta"] + two.pop("delta_bias").detach()[:, None]).detach().requires_grad_()
    packed = {n: torch.cat([one[n].detach(), two[n].detach()], dim=-1).requires_grad_() if one[n].dim() == 3
              else one[n] for n in ("u", "delta", "B", "C")}
    packed["A"] = one["A"]
    cu = torch.tensor([0, 75, 75, 150], device=DEVICE)
    h0 = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(6)).to(DEVICE)  # read from each sequence's slot
    out = selective_scan_fn(packed["u"], packed["delta"], packed["A"], packed["B"], packed["C"], backend=backend,
                            cu_seqlens=cu, initial_state=h0)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    grads = torch.autograd.grad((out * w).sum(), [packed[n] for n in ("u", "delta", "B")])
    alone = []
    for leaves, part, state in ((one, w[..., :75], h0[:1]), (two, w[..., 75:], h0[2:])):
        a = {n: leaves[n].detach().requires_grad_() for n in ("u", "delta", "B", "C")}
        o = selective_scan_fn(a["u"], a["delta"], one["A"], a["B"], a["C"], backend=backend, initial_state=state)
        alone.append(torch.autograd.grad((o * part).sum(), [a[n] for n in ("u", "delta", "B")]))
    for i, name in enumerate(("u", "delta", "B")):
        expected = torch.cat([alone[0][i], alone[1][i]], dim=-1)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(grads[i]), finite), name
        assert_matches(f"d{name}", grads[i][finite], expected[finite], torch.float32)
