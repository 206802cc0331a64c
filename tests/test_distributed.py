"""Context parallelism and data parallelism on the CPU: gloo process groups of 2 and 4 ranks
(torch.multiprocessing), each checked against one process (tests/distributed_cases.py)."""

import json

import pytest
import torch
import torch.distributed as dist

import distributed_cases as cases

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")
SPAWNS = pytest.mark.slow  # one process per rank


@SPAWNS
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_scan_and_lm(world):
    """selective_scan_cp (fixed / variable / grouped B and C, initial state, multipliers, uneven and
    empty shards; out, last state, every gradient) and MambaLM with cp_group (the conv's halo
    included: at world 4 and L 9 each shard is shorter than d_conv - 1), in one spawn per world."""
    cases.spawn(_scan_and_lm, world)


def _scan_and_lm(rank, world):
    cases.check_scan(rank, world)
    if world == 2:  # the Triton kernels (interpreted on the CPU) under the same split, fp32
        cases.check_scan(rank, world, "triton", torch.float32, cases.scan_cases(world)[1:2])
    cases.check_lm(rank, world, seqlens=(9, 21))


@SPAWNS
def test_empty_shards_in_the_model_and_ranks_that_disagree():
    """3 ranks, sequences of 2 and 3 tokens: shards of 0 steps in MambaLM (which crashed in its
    reshape), against the whole-sequence model; then arguments that differ between ranks."""
    cases.spawn(_empty_shards_and_disagreement, 3)


def _empty_shards_and_disagreement(rank, world):
    cases.check_lm(rank, world, seqlens=(2, 3))
    cases.check_ranks_must_agree(rank, world)


@SPAWNS
def test_bytes_per_rank_do_not_grow_with_seqlen(tmp_path):
    report = tmp_path / "bytes.json"
    cases.spawn(cases.check_bytes_per_step, 2, (32, 128, 512), str(report))
    per_length = json.loads(report.read_text())
    print("bytes, calls per rank per training step (world 2):", per_length)
    assert len(per_length) == 3


@SPAWNS
def test_ddp_fsdp2_and_compile_match_one_process():
    cases.spawn(cases.check_data_parallel, 2)


def test_context_parallel_needs_an_initialized_process_group():
    import torch
    from ssm_kernels.distributed import selective_scan_cp
    u = torch.randn(1, 2, 5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        selective_scan_cp(u, u.abs(), -torch.ones(2, 3), torch.randn(2, 3), torch.randn(2, 3))


def test_init_inside_a_wrapper_equals_init_of_the_bare_model():
    """As under DDP (model.module): the same draws, out_proj's 1/sqrt(n_layer) included."""
    import torch
    from torch import nn
    from ssm_kernels.modules import MambaLM
    from ssm_kernels.mup import Parameterization

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    p = Parameterization("mup_ssm", "adam", base_d_inner=8, base_d_state=4)
    bare = p.init_(MambaLM(16, 3, 32, d_state=4), torch.Generator().manual_seed(0))
    wrapped = p.init_(Wrapper(MambaLM(16, 3, 32, d_state=4)), torch.Generator().manual_seed(0))
    for (name, a), (_, b) in zip(bare.named_parameters(), wrapped.module.named_parameters()):
        assert torch.equal(a, b), name
