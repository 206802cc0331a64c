"""torch.library registration: torch.compile(fullgraph=True) and opcheck, on the "torch" backend."""

import pytest
import torch

from scan_cases import as_leaves, assert_matches, make_inputs
from ssm_kernels import selective_scan_fn
from ssm_kernels.ops.selective_scan.checks import check_inputs
from ssm_kernels.testing import MULTIPLIERS


def loss_fn(u, delta, A, B, C, D, z, delta_bias, initial_state):
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, return_last_state=True,
                                  **MULTIPLIERS, initial_state=initial_state,
                                  backend="torch")
    return out.sin().sum() + last.square().sum()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler):
    torch._dynamo.reset()
    leaves = as_leaves(make_inputs(seqlen=70), torch.float32)
    args = [leaves[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    eager_loss = loss_fn(*args)
    eager_grads = torch.autograd.grad(eager_loss, args)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    assert_matches("loss", loss, eager_loss, torch.float32)
    for g, e in zip(grads, eager_grads):
        assert_matches("grad", g, e, torch.float32)


@pytest.mark.parametrize("bc", ["grouped", "fixed"])
def test_opcheck(bc):
    """Schema, fake (meta) implementation and autograd registration of the custom ops."""
    leaves = as_leaves(make_inputs(B=bc, C=bc, seqlen=70), torch.float32)
    B, C, groups = check_inputs(*(leaves[n] for n in ("u", "delta", "A", "B", "C")))
    fwd_args = (leaves["u"], leaves["delta"], leaves["A"], B, C, leaves["D"], leaves["z"], leaves["delta_bias"],
                leaves["initial_state"], groups, True, 0.5, 2.0, 0.25, "torch")
    torch.library.opcheck(torch.ops.ssm_kernels.selective_scan_fwd.default, fwd_args)
    with torch.no_grad():  # the backward op has no derivative of its own (no double backward)
        out, last, states = torch.ops.ssm_kernels.selective_scan_fwd(*fwd_args)
    inputs = [t.detach() for t in fwd_args[:5]] + [leaves[n].detach() for n in ("D", "z", "delta_bias")]
    bwd_args = (torch.randn_like(out), torch.randn_like(last), *inputs, states, groups, True, 0.5, 2.0, 0.25,
                "torch", False)
    torch.library.opcheck(torch.ops.ssm_kernels.selective_scan_bwd.default, bwd_args)
