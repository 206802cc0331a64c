"""What the `train` and `lr-sweep` commands share: the text they train on, the optimizer of a
parameterized model, the learning-rate schedule and the training loop itself."""

import importlib
import math
from typing import Callable, Iterable, List, Optional

import torch

from ..mup import Parameterization, keep_lr_scale

# The text: the source of a few Python standard library modules, read as bytes (vocab 256), real
# text that every machine has.
CORPUS_MODULES = ("argparse", "inspect", "typing", "dataclasses", "functools", "pathlib")


def corpus(modules=CORPUS_MODULES) -> torch.Tensor:
    """The bytes of a few standard library modules' source, as int64 tokens."""
    data = b"".join(open(importlib.import_module(m).__file__, "rb").read() for m in modules)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_windows(text: torch.Tensor, batch: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, seqlen) windows of `text` at random offsets drawn from `generator`."""
    offsets = torch.randint(0, len(text) - seqlen, (batch,), generator=generator)
    return torch.stack([text[o:o + seqlen] for o in offsets.tolist()])


def warmup_cosine(step: int, steps: int) -> float:
    """The lr factor: linear warmup over the first tenth of the steps, then a cosine to 0."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def optimizer_for(param: Parameterization, model: torch.nn.Module, lr: float, weight_decay: float = 0.0):
    """The parameterization's param groups (lr scale, weight decay per role) in AdamW or SGD, as
    the parameterization's optimizer says, under keep_lr_scale."""
    groups = param.param_groups(model, lr, weight_decay)
    return keep_lr_scale(torch.optim.AdamW(groups) if param.optimizer == "adam" else torch.optim.SGD(groups))


def train_steps(opt: torch.optim.Optimizer, steps: int, loss_at: Callable[[int], torch.Tensor], *,
                reported: Callable[[torch.Tensor], float] = lambda loss: loss.item(),
                stop_when_not_finite: bool = False, progress: Optional[Iterable] = None) -> Optional[List[float]]:
    """`steps` optimizer steps under the warmup + cosine schedule: loss_at(step) gives the loss to
    backpropagate, reported(loss) the number recorded after the step. Returns the recorded losses,
    or None when stop_when_not_finite and a loss was not finite (a diverged run). progress: a tqdm
    over range(steps), whose postfix shows the last loss."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, steps))
    losses = []
    for step in progress if progress is not None else range(steps):
        loss = loss_at(step)
        if stop_when_not_finite and not torch.isfinite(loss):
            return None
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(reported(loss))
        if progress is not None:
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
