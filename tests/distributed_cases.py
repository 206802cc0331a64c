"""Worker bodies of tests/test_distributed.py: each runs in every process of a gloo group on the
CPU (torch.multiprocessing) and asserts against the single-process computation, which every
worker repeats on the whole sequence or batch from the same seeds."""

import copy
import json
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from scan_cases import as_leaves, assert_matches, make_inputs
from ssm_kernels import selective_scan_fn
from ssm_kernels.distributed import selective_scan_cp, shard_for_next_token
from ssm_kernels.modules import MambaLM
from ssm_kernels.testing import MULTIPLIERS
from ssm_kernels.mup import Parameterization, keep_lr_scale

SHARDED = ("u", "delta", "z")  # and variable / grouped B, C: cut along time (their last dim)
F64 = torch.float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, body, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels, and 2 cores shared by all ranks
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    except Exception:
        dist.destroy_process_group()
        raise RuntimeError(f"rank {rank} of {world}:\n{traceback.format_exc()}") from None
    # A worker that passed leaves without Python's teardown: under spawn, that teardown destroys
    # c10d's C++ objects while a gloo thread may still be live, and 1 run in 3 ended in std::terminate
    # (SIGABRT, "terminate called without an active exception") after every check had passed.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(body, world, *args):
    """Runs body(rank, world, *args) in `world` fresh processes joined in one gloo group."""
    mp.spawn(_entry, args=(world, _free_port(), body, args), nprocs=world, join=True)


def _shard(t, rank, world):
    return t.tensor_split(world, dim=-1)[rank]


def _matches(name, actual, expected, dtype):
    """assert_matches that also takes an empty shard."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel():
        assert_matches(name, actual, expected, dtype)


def _sum_over_ranks(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


# -- the scan -----------------------------------------------------------------------------------

def scan_cases(world):
    """(name, make_inputs kwargs, multipliers); lengths that split unevenly, and one so short that
    the last rank's shard is empty."""
    scales = MULTIPLIERS
    return [
        ("fixed B/C, no initial state", dict(seqlen=23, B="fixed", C="fixed", initial_state=False), {}),
        ("variable B/C, initial state, multipliers", dict(seqlen=23, B="variable", C="variable"), scales),
        ("grouped B/C, initial state, multipliers", dict(seqlen=29, B="grouped", C="grouped"), scales),
        ("fixed B, grouped C, big delta", dict(seqlen=17, B="fixed", C="grouped", big_delta=True), scales),
        ("an empty shard", dict(seqlen=world - 1, B="variable", C="variable"), scales),
    ]


def check_scan(rank, world, backend="torch", dtype=F64, cases=None):
    for name, kwargs, scales in cases or scan_cases(world):
        master = make_inputs(batch=2, dim=4, d_state=3, seed=len(name), **kwargs)
        leaves = as_leaves(master, dtype)
        g = torch.Generator().manual_seed(7)
        w_out = torch.randn(leaves["u"].shape, generator=g, dtype=F64)
        w_last = torch.randn(leaves["initial_state"].shape if "initial_state" in leaves else (2, 4, 3),
                             generator=g, dtype=F64)

        def run(fn, args, weight, share=1, **extra):
            out, last = fn(*(args.get(n) for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                           delta_softplus=True, return_last_state=True, initial_state=args.get("initial_state"),
                           **scales, **extra)
            return out, last, (out * weight).sum() + (last * w_last).sum() / share  # last: on every rank

        w_out, w_last = w_out.to(dtype), w_last.to(torch.float32 if dtype != F64 else F64)
        ref_out, ref_last, ref_loss = run(selective_scan_fn, leaves, w_out, backend=backend)
        ref_grads = torch.autograd.grad(ref_loss, list(leaves.values()))

        mine = {n: (_shard(t, rank, world) if n in SHARDED or (n in "BC" and t.dim() > 2) else t)
                .detach().requires_grad_() for n, t in leaves.items()}
        out, last, loss = run(selective_scan_cp, mine, _shard(w_out, rank, world), backend=backend, share=world)
        grads = torch.autograd.grad(loss, list(mine.values()), allow_unused=True)
        _matches(f"{name}: out", out, _shard(ref_out, rank, world), dtype)
        _matches(f"{name}: last_state", last, ref_last, dtype)
        for (n, t), grad, ref in zip(mine.items(), grads, ref_grads):
            grad = torch.zeros_like(t) if grad is None else grad  # initial_state off the first rank
            if n in SHARDED or (n in "BC" and t.dim() > 2):
                _matches(f"{name}: d{n}", grad, _shard(ref, rank, world), dtype)
            else:
                _matches(f"{name}: d{n} summed over ranks", _sum_over_ranks(grad), ref, dtype)


# -- a language model under context parallelism -----------------------------------------------

def _parameterized_lm(**kwargs):
    torch.manual_seed(0)
    model = MambaLM(d_model=8, n_layer=2, vocab_size=16, d_state=3, **kwargs).double()
    p = Parameterization("mup_ssm", "adam", base_d_inner=4, base_d_state=3)  # multipliers != 1
    return p.parameterize_(model, torch.Generator().manual_seed(1)), p


def check_lm(rank, world, seqlens):
    """Loss and every parameter gradient (summed over ranks) equal the whole-sequence model's."""
    for seqlen in seqlens:
        ref, _ = _parameterized_lm()
        model, _ = _parameterized_lm(cp_group=dist.group.WORLD)
        ids = torch.randint(0, 16, (2, seqlen), generator=torch.Generator().manual_seed(seqlen))
        ref_loss = ref.loss(ids)
        ref_loss.backward()
        inputs, labels = shard_for_next_token(ids)
        loss = model.loss(inputs, labels, reduction="sum") / (ids.shape[0] * (seqlen - 1))
        loss.backward()
        assert_matches(f"L={seqlen}: loss", _sum_over_ranks(loss.detach()), ref_loss.detach(), F64)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert_matches(f"L={seqlen}: d {name}", _sum_over_ranks(p.grad), ref_params[name].grad, F64)


# -- communication volume -------------------------------------------------------------------------

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "send", "recv", "isend", "irecv",
               "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all", "batch_isend_irecv")


class CountingCollectives:
    """Wraps torch.distributed's collectives and adds up the bytes of the tensors this rank hands
    to them (its contribution: an all-gather's input, a reduce-scatter's input list, ...)."""

    def __init__(self):
        self.bytes, self.calls, self._saved = 0, 0, {}

    def _count(self, x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(self._count(t) for t in x)
        return 0

    def __enter__(self):
        for name in COLLECTIVES:
            if not hasattr(dist, name):
                continue
            original = self._saved[name] = getattr(dist, name)

            def wrapped(*args, __original=original, __name=name, **kwargs):
                self.calls += 1
                # the payload this rank sends: the second argument for the gathers/scatters that take an
                # output first, else the first
                takes_output_first = __name in ("all_gather", "reduce_scatter", "all_gather_into_tensor",
                                                "reduce_scatter_tensor", "all_to_all")
                self.bytes += self._count(args[1] if takes_output_first else args[0])
                return __original(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def check_bytes_per_step(rank, world, seqlens, report_path):
    """One context-parallel training step of MambaLM (forward, backward, gradient all-reduce):
    the bytes each rank communicates do not depend on L."""
    per_length = {}
    for seqlen in seqlens:
        model, _ = _parameterized_lm(cp_group=dist.group.WORLD)
        ids = torch.randint(0, 16, (2, seqlen), generator=torch.Generator().manual_seed(0))
        inputs, labels = shard_for_next_token(ids)
        with CountingCollectives() as context_parallel:  # forward and backward
            (model.loss(inputs, labels, reduction="sum") / (2 * (seqlen - 1))).backward()
        with CountingCollectives() as gradients:  # what DDP would do
            for p in model.parameters():
                dist.all_reduce(p.grad)
        per_length[seqlen] = dict(context_parallel_bytes=context_parallel.bytes, calls=context_parallel.calls,
                                  gradient_bytes=gradients.bytes)
    if rank == 0:
        with open(report_path, "w") as f:
            json.dump(per_length, f)
    assert len({tuple(v.items()) for v in per_length.values()}) == 1, f"bytes per rank per step vary with L: {per_length}"


# -- data parallel: DDP, FSDP2, torch.compile ----------------------------------------------------

def _lm_fp32():
    torch.manual_seed(0)
    model = MambaLM(d_model=16, n_layer=2, vocab_size=32, d_state=4)
    p = Parameterization("mup_ssm", "adam", base_d_inner=8, base_d_state=4)  # lr scales and multipliers != 1
    return p.parameterize_(model, torch.Generator().manual_seed(1)), p


def _next_token_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _optimizer(p, model):
    opt = keep_lr_scale(torch.optim.AdamW(p.param_groups(model, lr=3e-2, weight_decay=0.1), foreach=False))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def check_data_parallel(rank, world, steps=3):
    """DDP equals single-process training on the whole batch bitwise, FSDP2 within fp32 tolerance,
    a torch.compile'd DDP step within fp32 tolerance; every one with mup_ssm's param groups,
    keep_lr_scale and a scheduler."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, p = _lm_fp32()
    assert model.backbone.layers[0].mixer.scan.c_scale != 1.0 and len(p.param_groups(model, lr=1.0)) > 1
    batches = [torch.randint(0, 32, (2 * world, 12), generator=torch.Generator().manual_seed(s)) for s in range(steps)]
    mine = [b.tensor_split(world)[rank] for b in batches]

    ref = copy.deepcopy(model)
    ref_opt, ref_sched = _optimizer(p, ref)
    for batch in batches:  # what each rank computes, then the average DDP takes
        ref_opt.zero_grad()
        for part in batch.tensor_split(world):
            _next_token_loss(ref, part).backward()
        for q in ref.parameters():
            q.grad.div_(world)
        ref_opt.step()
        ref_sched.step()
    ref_params = dict(ref.named_parameters())

    def train(wrapped, opt_model, prefix=""):
        opt, sched = _optimizer(p, opt_model)
        for part in mine:
            opt.zero_grad()
            _next_token_loss(wrapped, part).backward()
            opt.step()
            sched.step()
        return {n[len(prefix):]: q for n, q in opt_model.named_parameters()}

    ddp = DDP(copy.deepcopy(model))
    for name, q in train(ddp, ddp, "module.").items():
        assert torch.equal(q.detach(), ref_params[name].detach()), f"DDP: {name} differs from one process"

    sharded = copy.deepcopy(model)
    for layer in sharded.backbone.layers:
        fully_shard(layer)
    fully_shard(sharded)
    try:
        p.init_(sharded)
        raise AssertionError("init_ of a sharded model was accepted")
    except ValueError as e:
        assert "before sharding" in str(e)
    for name, q in train(sharded, sharded).items():
        assert type(q).__name__ == "DTensor", name
        assert_matches(f"FSDP2: {name}", q.detach().full_tensor(), ref_params[name].detach(), torch.float32)

    torch._dynamo.reset()
    ddp = DDP(copy.deepcopy(model))
    compiled = torch.compile(ddp, backend="aot_eager")
    for name, q in train(compiled, ddp, "module.").items():
        assert_matches(f"compiled DDP: {name}", q.detach(), ref_params[name].detach(), torch.float32)


def check_ranks_must_agree(rank, world):
    """What the ranks must share, given differently on one rank: the same ValueError, naming the
    argument, on every rank (it used to be a gloo abort on one rank and a reset connection on the
    other); afterwards the group still works."""
    import pytest
    g = torch.Generator().manual_seed(0)

    def inputs(dim=4, seqlen=3, d_state=3):
        return (torch.randn(1, dim, seqlen, generator=g), torch.rand(1, dim, seqlen, generator=g),
                -torch.rand(dim, d_state, generator=g), torch.randn(1, d_state, seqlen, generator=g),
                torch.randn(1, d_state, seqlen, generator=g))

    with pytest.raises(ValueError, match=r"u \(dim\): must be the same on every rank.*rank 0: 4, rank 1: 5"):
        selective_scan_cp(*inputs(dim=4 + rank), backend="torch")
    with pytest.raises(ValueError, match=r"A \(d_state\)"):
        selective_scan_cp(*inputs(d_state=3 + rank), backend="torch")
    h0 = torch.zeros(1, 4, 3, dtype=F64) if rank == 0 else None  # fp64 state with fp32 inputs on rank 0 only
    with pytest.raises(ValueError, match=r"initial_state \(the state's dtype\).*torch.float64"):
        selective_scan_cp(*inputs(), initial_state=h0, backend="torch")
    with pytest.raises(ValueError, match="dt_scale"):
        selective_scan_cp(*inputs(), dt_scale=1.0 + rank, backend="torch")
    out, last = selective_scan_cp(*inputs(seqlen=2 + rank), return_last_state=True, backend="torch")
    assert out.shape == (1, 4, 2 + rank) and torch.isfinite(last).all()
