"""Forward and every gradient of the "torch" and "triton" backends against the float64
sequential reference (Triton through the interpreter when there is no GPU)."""

import pytest
import torch

from scan_cases import CPP_REASON, SCAN_BACKENDS, SLOW, DEVICE, as_leaves, assert_matches, check_against_reference, make_inputs, run_scan
from ssm_kernels import selective_scan_fn

BACKENDS = SCAN_BACKENDS
# Everything on: D, z, bias, softplus, grouped B/C, initial_state, last_state, multipliers != 1.
FULL = dict(delta_softplus=True, return_last_state=True, dt_scale=0.7, b_scale=1.3, c_scale=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen", [1, 7, 63, 64, 65, 200])
def test_lengths(backend, seqlen):
    check_against_reference(backend, make_inputs(seqlen=seqlen, seed=seqlen), torch.float32, **FULL)


# (id, make_inputs overrides, call overrides)
FEATURES = [
    ("plain", dict(B="variable", C="variable", D=False, z=False, bias=False, initial_state=False),
     dict(delta_softplus=False, return_last_state=False, dt_scale=1.0, b_scale=1.0, c_scale=1.0)),
    ("fixed-BC", dict(B="fixed", C="fixed"), {}),
    ("fixed-B-variable-C", dict(B="fixed", C="variable"), {}),
    ("grouped-B-fixed-C-G3", dict(dim=6, groups=3, B="grouped", C="fixed"), {}),
    ("variable-BC-odd-dim", dict(dim=5, B="variable", C="variable"), {}),
    ("grouped-G2-dim10", dict(dim=10, groups=2), {}),
    ("no-D", dict(D=False), {}),
    ("no-z", dict(z=False), {}),
    ("no-bias", dict(bias=False), {}),
    ("no-softplus", {}, dict(delta_softplus=False)),
    ("no-initial-state", dict(initial_state=False), {}),
    ("no-last-state", {}, dict(return_last_state=False)),
    ("unit-multipliers", {}, dict(dt_scale=1.0, b_scale=1.0, c_scale=1.0)),
    ("softplus-threshold", dict(big_delta=True), {}),
    ("N1", dict(d_state=1), {}),
    ("N16", dict(d_state=16, dim=4, batch=1), {}),
    ("N256", dict(d_state=256, dim=2, batch=1, seqlen=20), {}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs,call", [pytest.param(i, c, id=name) for name, i, c in FEATURES])
def test_features(backend, inputs, call):
    check_against_reference(backend, make_inputs(**inputs), torch.float32, **{**FULL, **call})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bc", ["grouped", "fixed"])
def test_dmajor_delta(backend, bc):
    """delta as the non-contiguous (batch, dim, L) view mamba_inner_fn passes."""
    check_against_reference(backend, make_inputs(B=bc, C=bc), torch.float32, delta_dmajor=True, **FULL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    check_against_reference(backend, make_inputs(seqlen=65), dtype, **FULL)


@pytest.mark.parametrize("bc", ["grouped", "fixed"])
def test_torch_backend_float64(bc):
    check_against_reference("torch", make_inputs(seqlen=65, B=bc, C=bc), torch.float64, **FULL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bc", ["grouped", "fixed"])
def test_multipliers_equal_scaled_inputs(backend, bc):
    """dt_scale, b_scale, c_scale inside the kernel == delta, B, C scaled by ordinary tensor ops,
    forward and every gradient (the scaling's chain rule included)."""
    scales = dict(dt_scale=0.37, b_scale=2.5, c_scale=0.2)
    leaves = as_leaves(make_inputs(B=bc, C=bc, seed=3), torch.float32)
    common = dict(backend=backend, delta_softplus=True, return_last_state=True)
    fused = run_scan(selective_scan_fn, leaves, **common, **scales)

    def scaled_inputs(u, delta, A, B, C, *rest, **kw):
        return selective_scan_fn(u, delta * scales["dt_scale"], A, B * scales["b_scale"], C * scales["c_scale"],
                                 *rest, **kw)
    separate = run_scan(scaled_inputs, leaves, **common)
    assert_matches("out", fused[0], separate[0], torch.float32)
    assert_matches("last_state", fused[1], separate[1], torch.float32)
    for name in leaves:
        assert_matches(f"d{name}", fused[2][name], separate[2][name], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_multipliers_are_the_plain_scan(backend):
    leaves = as_leaves(make_inputs(), torch.float32)
    plain = run_scan(selective_scan_fn, leaves, backend=backend, return_last_state=True)
    ones = run_scan(selective_scan_fn, leaves, backend=backend, return_last_state=True,
                    dt_scale=1.0, b_scale=torch.tensor(1.0), c_scale=1)
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])
    for name in leaves:
        assert torch.equal(plain[2][name], ones[2][name]), name


def test_ref_backend_is_the_reference():
    leaves = as_leaves(make_inputs(), torch.float64)
    from ssm_kernels import selective_scan_ref
    via_fn = run_scan(selective_scan_fn, leaves, backend="ref", **FULL)
    direct = run_scan(selective_scan_ref, leaves, **FULL)
    assert torch.equal(via_fn[0], direct[0]) and torch.equal(via_fn[1], direct[1])


def test_default_backend(monkeypatch):
    from ssm_kernels.ops.selective_scan.interface import resolve_backend
    u = torch.zeros(1, 1, 1, device=DEVICE)
    assert resolve_backend(None, u) == ("triton" if DEVICE.type == "cuda" else "torch" if CPP_REASON else "cpp")
    monkeypatch.setenv("SSM_KERNELS_BACKEND", "ref")
    assert resolve_backend(None, u) == "ref"
    assert resolve_backend("torch", u) == "torch"  # the argument wins over the environment


# Channels per Triton program: two where a group's size is even, N <= 16 and the chunks are whole,
# one elsewhere (chunk.Geometry). (dim, groups, B/C kind, N, expected channels)
CHANNEL_CASES = [(4, 2, "grouped", 4, 2), (6, 2, "grouped", 4, 1), (4, 1, "fixed", 16, 2), (4, 1, "variable", 17, 1)]


@SLOW
@pytest.mark.parametrize("dim,groups,bc,d_state,channels", CHANNEL_CASES)
def test_triton_channels_per_program(dim, groups, bc, d_state, channels):
    """Both layouts of the Triton kernels (a lane holding the items of one channel or of two)
    against the float64 reference, forward and every gradient."""
    from ssm_kernels.ops.selective_scan.chunk import Geometry
    per_group = dim // groups if bc == "grouped" else dim
    geo = Geometry(64, d_state, [torch.float32], torch.device(DEVICE), 0, per_group)
    assert (geo.channels_fwd, geo.channels_bwd) == (channels, channels)
    deterministic = Geometry(64, d_state, [torch.float32], torch.device(DEVICE), 0, per_group, deterministic=True)
    assert (deterministic.channels_fwd, deterministic.channels_bwd) == (channels, 1)  # two spill in its passes
    check_against_reference("triton", make_inputs(dim=dim, groups=groups, seqlen=64, d_state=d_state, B=bc, C=bc),
                            torch.float32, **FULL)


@SLOW
@pytest.mark.parametrize("bc", ["grouped", "fixed", "fixed-B-variable-C"])
def test_triton_deterministic_mode(monkeypatch, bc):
    """Deterministic mode: bitwise-identical gradients run to run, each within the tolerance of
    the float64 reference and equal to the default mode's up to rounding."""
    B, C = ("fixed", "variable") if bc == "fixed-B-variable-C" else (bc, bc)
    master = make_inputs(dim=6, seqlen=21, B=B, C=C, seed=5)
    monkeypatch.setenv("SSM_KERNELS_DETERMINISTIC", "1")
    check_against_reference("triton", master, torch.float32, **FULL)
    leaves = as_leaves(master, torch.float32)
    first = run_scan(selective_scan_fn, leaves, backend="triton", **FULL)
    second = run_scan(selective_scan_fn, leaves, backend="triton", **FULL)
    monkeypatch.delenv("SSM_KERNELS_DETERMINISTIC")
    default = run_scan(selective_scan_fn, leaves, backend="triton", **FULL)
    for name in leaves:
        assert torch.equal(first[2][name], second[2][name]), name
        assert_matches(f"d{name}", default[2][name], first[2][name], torch.float32)


@SLOW
@pytest.mark.parametrize("groups", [1, 2])
def test_triton_deterministic_dB_dC_do_not_depend_on_the_channel_order(monkeypatch, groups):
    """Variable dB and dC sum every channel of a group. Permuting the channels inside each group
    reorders those sums: the deterministic mode's dB and dC stay bitwise the same, while the
    default mode's fp32 atomics (run in program order by the interpreter) change in their last
    bits, which shows that the check can fail."""
    dim, seqlen = 6, 21
    master = make_inputs(dim=dim, seqlen=seqlen, B="grouped", C="grouped", groups=groups, seed=9)
    dpg = dim // groups
    perm = torch.cat([g * dpg + torch.randperm(dpg, generator=torch.Generator().manual_seed(g)) for g in range(groups)])
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(2, dim, seqlen, generator=g, dtype=torch.float64)
    dlast = torch.randn(2, dim, master["A"].shape[1], generator=g, dtype=torch.float64)

    def dB_dC(order):
        per_channel = {"u": 1, "delta": 1, "z": 1, "initial_state": 1, "A": 0, "D": 0, "delta_bias": 0}
        x = {n: (t.index_select(per_channel[n], order) if n in per_channel else t) for n, t in master.items()}
        x = as_leaves(x, torch.float32)
        h0 = x.pop("initial_state")
        out, last = selective_scan_fn(*x.values(), delta_softplus=True, return_last_state=True, initial_state=h0,
                                      backend="triton", dt_scale=0.7, b_scale=1.3, c_scale=0.6)
        loss = (out * dout[:, order].float()).sum() + (last * dlast[:, order].float()).sum()
        return torch.autograd.grad(loss, [x["B"], x["C"]])

    results = {}
    for mode in ("deterministic", "atomic"):
        if mode == "deterministic":
            monkeypatch.setenv("SSM_KERNELS_DETERMINISTIC", "1")
        else:
            monkeypatch.delenv("SSM_KERNELS_DETERMINISTIC")
        results[mode] = (dB_dC(torch.arange(dim)), dB_dC(perm))
    (dB, dC), (dB_perm, dC_perm) = results["deterministic"]
    assert torch.equal(dB, dB_perm) and torch.equal(dC, dC_perm)
    (dB, dC), (dB_perm, dC_perm) = results["atomic"]
    assert not (torch.equal(dB, dB_perm) and torch.equal(dC, dC_perm))
    assert_matches("dB", dB_perm, dB, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_from_last_state_only(backend):
    """out unused: the whole gradient comes back through last_state."""
    from ssm_kernels import selective_scan_ref
    leaves = as_leaves(make_inputs(seqlen=40), torch.float32)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    grads = {}
    for fn, args, extra in ((selective_scan_fn, leaves, dict(backend=backend)), (selective_scan_ref, ref_leaves, {})):
        a = dict(args)
        h0 = a.pop("initial_state")
        _, last = fn(*a.values(), delta_softplus=True, return_last_state=True, initial_state=h0, **extra)
        grads[fn] = torch.autograd.grad((last * last).sum(), list(args.values()), allow_unused=True)
    for name, g, r in zip(leaves, grads[selective_scan_fn], grads[selective_scan_ref]):
        if r is None:  # z and D do not reach the state
            assert g is None or not g.any(), name
        else:
            assert_matches(f"d{name}", g, r, torch.float32)
