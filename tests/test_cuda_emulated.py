"""The CUDA kernels of csrc/cuda/ (never run on a GPU yet) on the CPU through emulate.h: forward
outputs, saved states and every gradient against the float64 sequential reference, on random
inputs, odd sizes and packed sequences included (tests/cuda_emulated.py). The emulation computes
exp2 and divisions exactly where the GPU uses approximate instructions; everything else (the
tiles, the shuffles, the block reductions, the partial sums) is the kernels' own code."""

import pytest
import torch

import cuda_emulated as emu
from scan_cases import SLOW, assert_matches, make_inputs
from ssm_kernels import selective_scan_fn
from ssm_kernels.ops.selective_scan.checks import check_inputs
from ssm_kernels.ops.selective_scan.chunk_torch import selective_scan_fwd_torch
from ssm_kernels.ops.selective_scan import cuda_ext
from ssm_kernels.ops.selective_scan.config import ScanConfig
from ssm_kernels.testing import MULTIPLIERS

REASON = emu.unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=str(REASON)), SLOW]  # a g++ build, OS threads
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")  # the backward's order


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return emu.library(str(tmp_path_factory.mktemp("cuda_emulated")))


def _leaves(master, dtype):
    """Activations and variable B/C in dtype, the rest in float32 (what the kernels take)."""
    return {n: None if t is None else t.to(dtype if t.dim() >= 3 and n != "initial_state" else torch.float32)
            for n, t in master.items()}


def _reference(leaves, cu_seqlens, cot_out, cot_last, softplus):
    """out, last_state and every gradient of the float64 reference on the same (rounded) values."""
    ref = {n: None if t is None else t.double().requires_grad_() for n, t in leaves.items()}
    out, last = selective_scan_fn(*(ref[n] for n in ARGS[:8]), initial_state=ref["initial_state"], backend="ref",
                                  delta_softplus=softplus, return_last_state=True, cu_seqlens=cu_seqlens,
                                  **MULTIPLIERS)
    present = [n for n in GRADS if ref[n] is not None]
    grads = torch.autograd.grad((out * cot_out.double()).sum() + (last * cot_last.double()).sum(),
                                [ref[n] for n in present])
    return out, last, dict(zip(present, grads))


def _cotangents(out_shape, last_shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_shape, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(last_shape, generator=g, dtype=torch.float64).float())


def _run(lib, master, dtype, *, cu_seqlens=None, segmented=False, softplus=True):
    """The kernels' forward on the master inputs rounded to dtype, checked against the reference;
    returns (the call, the leaves, the cotangents, the reference's gradients)."""
    leaves = _leaves(master, dtype)
    B, C, groups = check_inputs(*(leaves[n] for n in ARGS), state_rows=None if cu_seqlens is None else
                                cu_seqlens.numel() - 1)
    config = ScanConfig(groups=groups, delta_softplus=softplus, cu_seqlens=cu_seqlens, **MULTIPLIERS)
    design = emu.ParallelCall if segmented else emu.SequentialCall
    call = design(lib, leaves["u"], leaves["delta"], leaves["A"], B, C, D=leaves["D"], z=leaves["z"],
                  delta_bias=leaves["delta_bias"], initial_state=leaves["initial_state"], config=config)
    out, last, _ = call.forward()
    cot_out, cot_last = _cotangents(out.shape, last.shape, dtype)
    ref_out, ref_last, ref_grads = _reference(leaves, cu_seqlens, cot_out, cot_last, softplus)
    assert_matches("out", out, ref_out, dtype)
    assert_matches("last_state", last, ref_last, dtype)
    return call, leaves, (cot_out, cot_last), ref_grads


CASES = [  # (id, make_inputs overrides)
    ("grouped-N4", dict(batch=2, dim=4, groups=2, d_state=4, seqlen=37)),
    ("variable-odd-N19", dict(batch=1, dim=3, B="variable", C="variable", d_state=19, seqlen=29, seed=3)),
    ("fixed", dict(batch=2, dim=3, B="fixed", C="fixed", d_state=5, seqlen=21, seed=4)),
    ("fixed-B-variable-C-no-options", dict(batch=1, dim=2, B="fixed", C="variable", d_state=16, seqlen=17, D=False,
                                           z=False, bias=False, initial_state=False, seed=5)),
    ("channel-blocks", dict(batch=1, dim=40, groups=1, d_state=3, seqlen=11, seed=6)),
]


# The time-sequential kernels (states every 8 steps) and the time-parallel ones (every 128 steps)
DESIGNS = [pytest.param(False, id="sequential"), pytest.param(True, id="time-parallel")]
LONG_CASES = [  # passes of 64 to 256 steps, several saved states
    ("grouped-N16-L300", dict(batch=1, dim=2, groups=2, d_state=16, seqlen=300, seed=8)),
    ("N64-L150", dict(batch=1, dim=1, groups=1, d_state=64, seqlen=150, seed=9)),
]


def _check_gradients(call, leaves, cotangents, ref_grads, dtype):
    grads = dict(zip(GRADS, call.backward(*cotangents)))
    for name, ref in ref_grads.items():
        got = grads[name].reshape(leaves[name].shape)
        assert torch.isfinite(got).all(), name
        assert_matches(f"d{name}", got, ref, dtype)


@pytest.mark.parametrize("segmented", DESIGNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [pytest.param(o, id=name) for name, o in CASES + LONG_CASES])
def test_forward_and_every_gradient(lib, overrides, dtype, segmented):
    _check_gradients(*_run(lib, make_inputs(**overrides), dtype, segmented=segmented), dtype)


@pytest.mark.parametrize("segmented", DESIGNS)
@pytest.mark.parametrize("dtype, softplus", [(torch.float16, True), (torch.float32, False)])
def test_fp16_and_without_softplus(lib, segmented, dtype, softplus):
    master = make_inputs(batch=2, dim=4, groups=2, d_state=7, seqlen=41, seed=12)
    _check_gradients(*_run(lib, master, dtype, segmented=segmented, softplus=softplus), dtype)


@pytest.mark.parametrize("segmented, lengths", [(False, [5, 0, 9, 1, 14]), (True, [130, 0, 7, 200])])
def test_packed_sequences(lib, segmented, lengths):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    master = make_inputs(batch=1, dim=4, groups=2, d_state=6, seqlen=sum(lengths), seed=7)
    master["initial_state"] = torch.randn(len(lengths), 4, 6, dtype=torch.float64)
    _check_gradients(*_run(lib, master, torch.float32, cu_seqlens=cu, segmented=segmented), torch.float32)


@pytest.mark.parametrize("segmented", DESIGNS)
def test_the_backward_gives_the_same_bits_whatever_the_block_order(lib, segmented):
    """Deterministic by design: run with the blocks in launch order, then in reverse order (on a GPU
    their order is the scheduler's), and every gradient has the same bits."""
    call, _, cotangents, _ = _run(lib, make_inputs(batch=2, dim=70, groups=2, d_state=5, seqlen=45, seed=11),
                                  torch.float32, segmented=segmented)
    first = [None if g is None else g.clone() for g in call.backward(*cotangents)]
    lib.ssmk_emulate_reverse_blocks(1)
    try:
        second = call.backward(*cotangents)
    finally:
        lib.ssmk_emulate_reverse_blocks(0)
    for name, a, b in zip(GRADS, first, second):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [
    pytest.param(dict(batch=1, dim=2, groups=2, d_state=16, seqlen=300), id="grouped-N16-L300"),
    pytest.param(dict(batch=2, dim=2, B="fixed", C="variable", d_state=5, seqlen=133, seed=2), id="padded-N5"),
    pytest.param(dict(batch=1, dim=1, B="fixed", C="fixed", d_state=24, seqlen=70, seed=3), id="fixed-N24"),
])
def test_time_parallel_forward(lib, overrides, dtype):
    """The segmented forward: out and last_state, and every state it saves (one per 128 steps)."""
    master = make_inputs(**overrides)
    call, leaves, _, _ = _run(lib, master, dtype, segmented=True)
    B, C, groups = check_inputs(*(leaves[n] for n in ARGS))
    ref = {n: None if t is None else t.double() for n, t in leaves.items()}
    # the states entering every 128 steps, from the "torch" backend in float64 at that spacing
    _, _, states = selective_scan_fwd_torch(
        *(ref[n] for n in ("u", "delta", "A")), B.double(), C.double(), D=ref["D"], z=ref["z"],
        delta_bias=ref["delta_bias"], initial_state=ref["initial_state"],
        config=ScanConfig(groups=groups, delta_softplus=True, **MULTIPLIERS), chunk_size=cuda_ext.CHUNK_SIZE)
    assert_matches("chunk_states", call.states, states, dtype)
