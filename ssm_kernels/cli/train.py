"""`python -m ssm_kernels train`: a small MambaLM trained on text, in one process or many.

Under torchrun every rank is a data-parallel replica (DDP over all ranks) and each group of
`--cp` consecutive ranks also splits every sequence along time (context parallelism): a rank
of a group holds one contiguous part of each sequence of its replica's batch. The model is
parameterized with a preset (mup_ssm by default) whose param groups (lr scale, weight decay
per role) go to AdamW under `keep_lr_scale`, with a warmup + cosine schedule.

    torchrun --nproc-per-node 4 -m ssm_kernels train --cp 2     # 2 replicas x 2-way CP
    python -m ssm_kernels train                                 # one process

The text is the source of a few Python standard library modules, read as bytes (vocab 256):
real text that every machine has.
"""

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed import shard_for_next_token
from ..modules import MambaLM
from ..mup import PRESETS, Parameterization
from ..ops.selective_scan.backends import CHUNKED_BACKENDS
from .args import check_backends
from .training import corpus, optimizer_for, random_windows, train_steps

HELP = "a small MambaLM on text; DDP + context parallel under torchrun"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--cp", type=int, default=1, help="context-parallel group size (divides the world size)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8, help="sequences per data-parallel replica and step")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (predicted: seqlen - 1)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="mup_ssm")
    parser.add_argument("--base-d-model", type=int, default=32, help="the width the lr was tuned at")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--backend", choices=CHUNKED_BACKENDS,
                        help="default triton on CUDA; on the CPU cpp when built, else torch")
    parser.add_argument("--seed", type=int, default=0)


def run(parser: argparse.ArgumentParser, args) -> int:
    check_arguments(parser, args)
    train(args)
    return 0


def check_arguments(parser: argparse.ArgumentParser, args):
    for name in ("cp", "steps", "batch", "d_model", "n_layer", "d_state", "base_d_model"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.seqlen < 2:
        parser.error(f"--seqlen: must be at least 2, got {args.seqlen}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr: must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay: must be a finite number >= 0, got {args.weight_decay}")
    text_length = len(corpus())
    if args.seqlen >= text_length:
        parser.error(f"--seqlen: must be shorter than the training text ({text_length:,} bytes), got {args.seqlen}")
    check_backends(parser, "--backend", [args.backend] if args.backend else [], _device())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.cp:
        parser.error(f"--cp {args.cp} does not divide the world size {world} (run under torchrun with "
                     "--nproc-per-node a multiple of --cp)")


def _context_parallel_group(cp: int):
    """This rank's group of `cp` consecutive ranks: its own communicator, apart from DDP's (the
    default group), so that the two never interleave their collectives. Every rank creates every
    group, in the same order, as new_group requires."""
    mine = None
    for first in range(0, dist.get_world_size(), cp):
        group = dist.new_group(list(range(first, first + cp)))
        if first <= dist.get_rank() < first + cp:
            mine = group
    return mine


def _device() -> torch.device:
    """This rank's device: its local GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train(args) -> dict:
    distributed = "WORLD_SIZE" in os.environ
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        cp_group = _context_parallel_group(args.cp) if args.cp > 1 else None
        replica, replicas = rank // args.cp, world // args.cp

        torch.manual_seed(args.seed)  # the same model on every rank
        model = MambaLM(args.d_model, args.n_layer, vocab_size=256, d_state=args.d_state, backend=args.backend,
                        cp_group=cp_group)
        param = Parameterization(args.preset, "adam", base_d_inner=2 * args.base_d_model, base_d_state=args.d_state)
        param.parameterize_(model, torch.Generator().manual_seed(args.seed))
        model.to(device)
        wrapped = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = optimizer_for(param, wrapped, args.lr, args.weight_decay)

        text = corpus()
        tokens_per_step = replicas * args.batch * (args.seqlen - 1)
        if rank == 0:
            print(f"{world} process(es) on {device.type}: {replicas} data-parallel replica(s) x {args.cp}-way context "
                  f"parallel; MambaLM d_model {args.d_model}, {args.n_layer} layers, {args.preset}; batch "
                  f"{args.batch} x {args.seqlen} tokens per replica; corpus {len(text):,} bytes", flush=True)
        from tqdm import tqdm
        bar = tqdm(range(args.steps), desc="train", unit="step", disable=rank != 0)

        def loss_at(step):
            # the same sequences on the ranks of a CP group, different ones per replica
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + replica)
            batch = random_windows(text, args.batch, args.seqlen, g).to(device)
            if cp_group is not None:
                inputs, labels = shard_for_next_token(batch, cp_group)
            else:
                inputs, labels = batch[:, :-1], batch[:, 1:]
            logits = wrapped(inputs)  # through DDP's forward, which its backward hooks need
            total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                    reduction="sum")
            # DDP averages gradients over all world ranks; this scaling makes the result the
            # gradient of the mean loss over every token of the step
            return total * world / tokens_per_step

        def mean_over_ranks(loss):  # the mean loss over every token of the step, on every rank
            mean = loss.detach()
            if distributed:
                dist.all_reduce(mean)
            return mean.item() / world

        start = time.perf_counter()
        losses = train_steps(opt, args.steps, loss_at, reported=mean_over_ranks, progress=bar)
        elapsed = time.perf_counter() - start
        result = dict(first_loss=losses[0], last_loss=losses[-1], tokens_per_s=tokens_per_step * args.steps / elapsed)
        if rank == 0:
            print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (nats/byte) over {args.steps} steps; "
                  f"{result['tokens_per_s']:,.0f} tokens/s", flush=True)
        return result
    finally:
        if distributed:
            dist.destroy_process_group()
