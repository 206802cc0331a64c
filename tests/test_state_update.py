"""selective_state_update: token-by-token decoding equals the float64 scan, on both backends."""

import pytest
import torch

from scan_cases import DEVICE, NEEDS_EXTENSION, as_leaves, assert_matches, make_inputs
from ssm_kernels import selective_scan_ref, selective_state_update
from ssm_kernels.testing import MULTIPLIERS

CASES = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32), ("triton", torch.bfloat16)]


def _step_by_step(leaves, backend, state):
    """Runs selective_state_update over every step of the scan inputs; returns (out, state)."""
    outs = []
    for t in range(leaves["u"].shape[-1]):
        def at(name):
            return leaves[name][..., t] if name in leaves and leaves[name].dim() >= 3 else leaves.get(name)
        outs.append(selective_state_update(state, at("u"), at("delta"), leaves["A"], at("B"), at("C"), leaves["D"],
                                           at("z"), leaves["delta_bias"], True, backend=backend, **MULTIPLIERS))
    return torch.stack(outs, dim=-1), state


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("bc", ["variable", "grouped"])
def test_decoding_equals_the_scan(backend, dtype, bc):
    master = make_inputs(batch=2, dim=6, seqlen=9, d_state=5, B=bc, C=bc, groups=3, big_delta=True)
    leaves = {n: t.detach() for n, t in as_leaves(master, dtype).items()}
    ref_leaves = {n: t.double().cpu() for n, t in leaves.items()}
    ref_out, ref_last = selective_scan_ref(*(ref_leaves.get(n) for n in ("u", "delta", "A", "B", "C", "D", "z",
                                                                          "delta_bias")),
                                           delta_softplus=True, return_last_state=True,
                                           initial_state=ref_leaves["initial_state"], **MULTIPLIERS)
    state = leaves["initial_state"].clone().float() if dtype != torch.float64 else leaves["initial_state"].clone()
    out, state = _step_by_step(leaves, backend, state)
    assert out.dtype == dtype
    assert_matches("out", out, ref_out, dtype)
    assert_matches("state", state, ref_last, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_state_batch_indices_update_only_their_rows(backend):
    master = make_inputs(batch=3, dim=4, seqlen=1, d_state=3, B="variable", C="variable")
    leaves = {n: t.detach().float() for n, t in master.items() if t is not None}
    cache = torch.randn(7, 4, 3, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([5, 0, 2], dtype=torch.int32)
    args = [leaves[n][..., 0] for n in ("u", "delta")] + [leaves["A"]] + [leaves[n][..., 0] for n in ("B", "C")]
    updated = cache.clone()
    out = selective_state_update(updated, *args, leaves["D"], leaves["z"][..., 0], leaves["delta_bias"], True,
                                 state_batch_indices=rows, backend=backend, **MULTIPLIERS)
    gathered = cache[rows.long()].clone()
    expected = selective_state_update(gathered, *args, leaves["D"], leaves["z"][..., 0], leaves["delta_bias"], True,
                                      backend="torch", **MULTIPLIERS)
    assert_matches("out", out, expected, torch.float32)
    assert_matches("rows", updated[rows.long()], gathered, torch.float32)
    untouched = [i for i in range(7) if i not in rows.tolist()]
    assert torch.equal(updated[untouched], cache[untouched])


def _args(batch=2, dim=4, N=3):
    g = torch.Generator().manual_seed(0)
    return dict(state=torch.randn(batch, dim, N, generator=g), x=torch.randn(batch, dim, generator=g),
                dt=torch.rand(batch, dim, generator=g), A=-torch.rand(dim, N, generator=g),
                B=torch.randn(batch, N, generator=g), C=torch.randn(batch, N, generator=g))


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.randn(2, 4, 1)), ValueError, "x: expected"),
    (dict(dt=torch.randn(2, 5)), ValueError, "dt: expected shape"),
    (dict(A=torch.randn(4, 2)), ValueError, "A: expected shape"),
    (dict(B=torch.randn(2, 3, 3)), ValueError, "B: dim=4 is not divisible"),
    (dict(C=torch.randn(3, 3)), ValueError, "C: expected shape"),
    (dict(state=torch.randn(5, 4, 3)), ValueError, "pass state_batch_indices"),
    (dict(state_batch_indices=torch.tensor([0.0, 1.0])), TypeError, "int32 or int64"),
    (dict(state_batch_indices=torch.tensor([0, 2])), ValueError, r"values must lie in \[0, 2\)"),
    (dict(state_batch_indices=torch.tensor([1, 1])), ValueError, "appears twice"),
    (dict(dt_scale=float("inf")), ValueError, "dt_scale: must be finite"),
    (dict(backend="gpu"), ValueError, "unknown backend"),
    (dict(x=torch.randn(2, 4, dtype=torch.float64), backend="triton"), TypeError, "x: unsupported dtype"),
])
def test_bad_input(change, error, match):
    kwargs = {**_args(), **change}
    with pytest.raises(error, match=match):
        selective_state_update(kwargs.pop("state"), kwargs.pop("x"), kwargs.pop("dt"), kwargs.pop("A"),
                               kwargs.pop("B"), kwargs.pop("C"), **kwargs)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = _args()
    if DEVICE.type != "cuda":
        with pytest.raises(ValueError, match="'triton' backend needs CUDA"):
            selective_state_update(a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"], backend="triton")


@pytest.mark.parametrize("backend", [None, "ref", pytest.param("cpp", marks=NEEDS_EXTENSION)])
def test_cpu_backends_without_a_step_kernel_run_the_torch_path(monkeypatch, backend):
    """One step has no compiled CPU or reference version: the CPU default (which is "cpp" when the
    extension is built), "cpp" and "ref" take the torch path, also without Triton's interpreter."""
    if DEVICE.type != "cpu":
        pytest.skip("the CPU defaults")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = _args()
    state = a["state"].clone()
    out = selective_state_update(state, a["x"], a["dt"], a["A"], a["B"], a["C"], backend=backend)
    expected_state = a["state"].clone()
    expected = selective_state_update(expected_state, a["x"], a["dt"], a["A"], a["B"], a["C"], backend="torch")
    assert torch.equal(out, expected) and torch.equal(state, expected_state)
