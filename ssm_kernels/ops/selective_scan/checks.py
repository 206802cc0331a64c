"""Input checks shared by every selective-scan backend.

Each check raises a ValueError or TypeError that names the offending argument, so bad
shapes never reach a kernel (where they would read out of bounds or crash).
"""

import math
import numbers
from typing import Optional

import torch

IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the pure-PyTorch backends ("torch", "ref") for gradient checks.
ALL_DTYPES = IO_DTYPES + (torch.float64,)


def check_multiplier(name: str, value) -> float:
    """Turn a multiplier (Python number or 0-dim tensor) into a finite Python float."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name}: expected a Python float or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{name}: multipliers are constants; no gradient flows to them, "
                             "so a tensor that requires grad is refused (pass .detach() or a float)")
        if value.is_complex():
            raise TypeError(f"{name}: must be real, got {value.dtype}")
        value = value.item()
    # numbers.Real: Python and NumPy numbers alike (np.float32, np.int64 register as Real; NumPy's
    # bool does not); Python's bool is refused
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise ValueError(f"{name}: must be finite, got an integer of {len(str(abs(int(value))))} digits") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return value


def check_multipliers(dt_scale=1.0, b_scale=1.0, c_scale=1.0) -> dict:
    """The three width multipliers as finite Python floats, by name (ScanConfig's fields)."""
    return {name: check_multiplier(name, value)
            for name, value in (("dt_scale", dt_scale), ("b_scale", b_scale), ("c_scale", c_scale))}


def _check_tensor(name: str, t, ndim: int, device: torch.device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but u is on {device}")
    if t.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported yet")
    if t.dtype not in ALL_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}; expected one of float32, float16, bfloat16, float64")


def _check_shape(name: str, t: torch.Tensor, shape: tuple):
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _check_state_matrix(name: str, X, batch: int, dim: int, d_state: int, seqlen: int, device):
    """B or C: fixed (dim, N), variable (batch, N, L) or grouped (batch, G, N, L).
    Returns the tensor as (dim, N) or as a (batch, G, N, L) view, and G (0 when fixed)."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(X).__name__}")
    if X.dim() not in (2, 3, 4):
        raise ValueError(f"{name}: expected (dim, N), (batch, N, L) or (batch, G, N, L), got shape {tuple(X.shape)}")
    _check_tensor(name, X, X.dim(), device)
    if X.dim() == 2:
        _check_shape(name, X, (dim, d_state))
        return X, 0
    if X.dim() == 3:
        _check_shape(name, X, (batch, d_state, seqlen))
        X = X.unsqueeze(1)
    groups = X.shape[1]
    if X.shape[0] != batch or X.shape[2:] != (d_state, seqlen) or groups < 1:
        raise ValueError(f"{name}: expected shape (batch={batch}, G, N={d_state}, L={seqlen}), got {tuple(X.shape)}")
    if dim % groups != 0:
        raise ValueError(f"{name}: dim={dim} is not divisible by the number of groups G={groups}")
    return X, groups


def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                 *, state_rows: Optional[int] = None):
    """Validate the selective-scan arguments.

    Returns (B, C, groups): B and C as (dim, N) when fixed or (batch, G, N, L) views when
    variable (a 3-dim (batch, N, L) tensor becomes G = 1), and the common group count
    (1 when both are fixed).
    """
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    device = u.device
    _check_tensor("u", u, 3, device)
    batch, dim, seqlen = u.shape
    if batch < 1 or dim < 1 or seqlen < 1:
        raise ValueError(f"u: every size must be at least 1, got shape {tuple(u.shape)}")
    _check_tensor("delta", delta, 3, device)
    _check_shape("delta", delta, tuple(u.shape))
    if delta.dtype != u.dtype:
        raise TypeError(f"delta: dtype {delta.dtype} differs from u's {u.dtype}")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.is_complex():
        raise TypeError("A: complex A is not supported yet (only real A, as in Mamba-1's S4D-real init)")
    _check_tensor("A", A, 2, device)
    if A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A: expected shape (dim={dim}, N), got {tuple(A.shape)}")
    d_state = A.shape[1]
    B, groups_b = _check_state_matrix("B", B, batch, dim, d_state, seqlen, device)
    C, groups_c = _check_state_matrix("C", C, batch, dim, d_state, seqlen, device)
    if groups_b and groups_c and groups_b != groups_c:
        raise ValueError(f"C: has {groups_c} groups but B has {groups_b}; variable B and C must share G")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _check_tensor(name, t, 1, device)
            _check_shape(name, t, (dim,))
    if z is not None:
        _check_tensor("z", z, 3, device)
        _check_shape("z", z, tuple(u.shape))
        if z.dtype != u.dtype:
            raise TypeError(f"z: dtype {z.dtype} differs from u's {u.dtype}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 3, device)
        rows = batch if state_rows is None else state_rows  # packed sequences: one state each
        _check_shape("initial_state", initial_state, (rows, dim, d_state))
    return B, C, max(groups_b, groups_c, 1)


def state_rows(batch: int, cu_seqlens) -> int:
    """Rows of the initial and last states (and of the per-row partials): the batch, or the number
    of packed sequences."""
    return batch if cu_seqlens is None else cu_seqlens.shape[0] - 1


def check_cu_seqlens(cu_seqlens, u) -> int:
    """Packed sequences: cu_seqlens (num_seqs + 1,) int32/int64 on u's device, 0 = first <= ... <=
    last = L, with u of batch 1. Reads the values back (one device sync). Returns num_seqs."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: expected int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected (num_seqs + 1,) with num_seqs >= 1, got shape {tuple(cu_seqlens.shape)}")
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError("u: expected (1, dim, L) with cu_seqlens")
    if cu_seqlens.device != u.device:
        raise ValueError(f"cu_seqlens: on {cu_seqlens.device}, but u is on {u.device}")
    if u.shape[0] != 1:
        raise ValueError(f"u: packed sequences (cu_seqlens) take batch 1, got batch {u.shape[0]}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != u.shape[2]:
        raise ValueError(f"cu_seqlens: must start at 0 and end at L={u.shape[2]}, got {bounds[0]} ... {bounds[-1]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError("cu_seqlens: must be non-decreasing")
    return len(bounds) - 1
