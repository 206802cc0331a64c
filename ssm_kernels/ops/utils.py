"""Helpers shared by the ops."""

import torch

# Tests switch this on so every output buffer an op allocates starts as NaN: an element that a
# kernel forgets to write then fails the comparison instead of passing as leftover memory.
POISON_NEW_BUFFERS = False


def new_buffer(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, NaN-filled while POISON_NEW_BUFFERS is set."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if POISON_NEW_BUFFERS:
        t.fill_(float("nan"))
    return t
