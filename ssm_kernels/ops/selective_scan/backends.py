"""The selective-scan backends: one registry entry each, the only place that knows them.

An entry says how to run the forward, the backward and the decoding step, the spacing of the
states the forward saves, where the backend runs, which dtypes and state sizes it takes, and in
which dtype it keeps the state. Adding a backend is one more `Backend(...)` here: the public
functions, the command line, the benchmarks and the tests read their backend lists from BACKENDS.
"""

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .checks import ALL_DTYPES, IO_DTYPES
from .chunk_torch import CHUNK_SIZE, compute_dtype, selective_scan_bwd_torch, selective_scan_fwd_torch
from .compiled import CHUNK_SIZE as COMPILED_CHUNK_SIZE
from .compiled import cpp_unavailable, extension_unavailable_reason
from .cuda_ext import CHUNK_SIZE as CUDA_CHUNK_SIZE
from .cuda_ext import MAX_D_STATE as CUDA_MAX_D_STATE
from .cuda_ext import cuda_unavailable

BACKEND_ENV = "SSM_KERNELS_BACKEND"


def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (TRITON_INTERPRET set)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _lazy(module: str, name: str) -> Callable:
    """module.name, imported on first call (so that `import ssm_kernels` does not import Triton)."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module, __package__), name)(*args, **kwargs)
    return call


@dataclass(frozen=True)
class Backend:
    name: str
    # forward(u, delta, A, B, C, *, D, z, delta_bias, initial_state, config: ScanConfig)
    # -> (out, last_state, chunk_states); None: autograd through the reference
    forward: Optional[Callable]
    # backward(dout, dlast_state, u, delta, A, B, C, *, D, z, delta_bias, chunk_states, config)
    # -> the nine gradients
    backward: Optional[Callable]
    # state_update(state, x, dt, A, B, C, *, D, z, dt_bias, indices, out, config): one decoding
    # step (selective_state_update), the state updated in place; returns out
    state_update: Callable
    chunk_size: Optional[Callable]  # (seqlen, device) -> steps between the saved states
    dtypes: tuple  # dtypes of u, delta, z and the other tensors
    max_d_state: Optional[int]  # None: no limit
    state_dtype: Callable  # (u, A, B, C, initial_state) -> dtype of last_state and the saved states
    unavailable_reason: Callable  # (device) -> None if it runs on tensors of this device, else why not


def _triton_unavailable(device):
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return ("needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run the kernels "
            "on the CPU")


STATE_UPDATE_TORCH = _lazy("..state_update.step_torch", "state_update_torch")  # one decoding step, any device

BACKENDS = {b.name: b for b in (
    # the same chunked algorithm in vectorized PyTorch (chunk_torch.py)
    Backend(name="torch",
            forward=selective_scan_fwd_torch, backward=selective_scan_bwd_torch,
            state_update=STATE_UPDATE_TORCH,
            chunk_size=lambda seqlen, device: CHUNK_SIZE, dtypes=ALL_DTYPES, max_d_state=None,
            state_dtype=compute_dtype, unavailable_reason=lambda device: None),
    # chunked Triton kernels (chunk.py; the decoding step: state_update/kernel.py)
    Backend(name="triton",
            forward=_lazy(".chunk", "selective_scan_fwd_triton"), backward=_lazy(".chunk", "selective_scan_bwd_triton"),
            state_update=_lazy("..state_update.kernel", "state_update_triton"),
            chunk_size=_lazy(".chunk", "triton_chunk_size"), dtypes=IO_DTYPES, max_d_state=256,
            state_dtype=lambda *tensors: torch.float32, unavailable_reason=_triton_unavailable),
    # the compiled CPU kernels of csrc/ (compiled.py), when the extension is built; a decoding step
    # is a few vector ops, with no compiled version: the torch one
    Backend(name="cpp",
            forward=_lazy(".compiled", "selective_scan_fwd_cpp"), backward=_lazy(".compiled", "selective_scan_bwd_cpp"),
            state_update=STATE_UPDATE_TORCH,
            chunk_size=lambda seqlen, device: COMPILED_CHUNK_SIZE, dtypes=ALL_DTYPES, max_d_state=None,
            state_dtype=compute_dtype, unavailable_reason=cpp_unavailable),
    # the time-parallel CUDA kernels of csrc/cuda/ (cuda_ext.py), when the extension is built with its
    # CUDA part: deterministic by design; never run on a GPU yet (tests/test_cuda_emulated.py runs
    # them on the CPU); the decoding step: the Triton kernel's
    Backend(name="cuda",
            forward=_lazy(".cuda_ext", "selective_scan_fwd_cuda"), backward=_lazy(".cuda_ext", "selective_scan_bwd_cuda"),
            state_update=_lazy("..state_update.kernel", "state_update_triton"),
            chunk_size=lambda seqlen, device: CUDA_CHUNK_SIZE, dtypes=IO_DTYPES, max_d_state=CUDA_MAX_D_STATE,
            state_dtype=lambda *tensors: torch.float32, unavailable_reason=cuda_unavailable),
    # the sequential reference (naive.py), differentiated by autograd; one decoding step has no
    # separate reference: the torch one
    Backend(name="ref",
            forward=None, backward=None, state_update=STATE_UPDATE_TORCH,
            chunk_size=None, dtypes=ALL_DTYPES, max_d_state=None,
            state_dtype=compute_dtype, unavailable_reason=lambda device: None),
)}


CHUNKED_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.forward is not None)  # all but the reference


def get_backend(name: str, source: str = "backend") -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {tuple(BACKENDS)}")
    return BACKENDS[name]


def default_backend(device: torch.device) -> str:
    """"triton" for CUDA tensors; on the CPU "cpp" when the extension is built, else "torch"."""
    if device.type == "cuda":
        return "triton"
    return "cpp" if device.type == "cpu" and extension_unavailable_reason() is None else "torch"


def resolve_backend(backend: Optional[str], u) -> str:
    """The argument, else $SSM_KERNELS_BACKEND, else default_backend; refused where it cannot run
    (never a silent fallback from a backend asked for)."""
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    source = "backend"
    if backend is None and os.environ.get(BACKEND_ENV):
        backend, source = os.environ[BACKEND_ENV], BACKEND_ENV
    entry = get_backend(default_backend(u.device) if backend is None else backend, source)
    reason = entry.unavailable_reason(u.device)
    if reason is not None:
        raise ValueError(f"{source}: the {entry.name!r} backend {reason}")
    return entry.name


def available_backends(device: torch.device):
    """Names of the chunked backends (not the reference) that run on `device`."""
    return [name for name in CHUNKED_BACKENDS if BACKENDS[name].unavailable_reason(device) is None]


def check_backend_limits(backend: str, d_state: int, tensors: dict):
    """The dtypes and state size that the backend's registry entry admits; tensors: name -> tensor
    or None, named as the caller's arguments."""
    entry = BACKENDS[backend]
    for name, t in tensors.items():
        if t is not None and t.dtype not in entry.dtypes:
            takes = [b.name for b in BACKENDS.values() if t.dtype in b.dtypes]
            raise TypeError(f"{name}: {str(t.dtype).replace('torch.', '')} is supported by the "
                            f"{' and '.join(repr(b) for b in takes)} backends only; the {backend!r} backend takes "
                            + ", ".join(str(d).replace("torch.", "") for d in entry.dtypes))
    if entry.max_d_state is not None and d_state > entry.max_d_state:
        raise ValueError(f"A: d_state={d_state} exceeds the {backend!r} backend's limit of {entry.max_d_state}; "
                         "use backend='torch'")
