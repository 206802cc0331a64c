"""Reversible replacement of attributes in other libraries' modules, and the per-mixer context
that carries a mixer's kernel multipliers into the functions those modules call."""

import contextvars
import functools
from typing import Dict, List, Optional, Tuple

_MISSING = object()
_ACTIVE: Dict[str, "Patch"] = {}
HOLDER = "_ssm_kernels_scan"  # where a foreign mixer keeps its ScanMultipliers (in its __dict__)
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("ssm_kernels_scan_multipliers", default=None)


class Patch:
    """The replacements one apply_to_* call made; `undo()` puts the originals back. Applying twice
    returns the active patch (idempotent)."""

    def __init__(self, name: str, backend: Optional[str]):
        self.name, self.backend = name, backend
        self.targets: List[str] = []  # the modules patched, by name
        self._saved: List[Tuple[object, str, object]] = []

    def set(self, owner, attr: str, value) -> None:
        self._saved.append((owner, attr, owner.__dict__.get(attr, _MISSING)))
        setattr(owner, attr, value)

    @property
    def active(self) -> bool:
        return _ACTIVE.get(self.name) is self

    def undo(self) -> None:
        for owner, attr, old in reversed(self._saved):
            if old is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        self._saved.clear()
        if self.active:
            del _ACTIVE[self.name]

    def __repr__(self):
        return f"Patch({self.name!r}, targets={self.targets}, active={self.active})"


def start(name: str, backend: Optional[str]) -> Tuple[Patch, bool]:
    """(patch, fresh): the active patch of that name, or a new one to fill."""
    if name in _ACTIVE:
        if _ACTIVE[name].backend != backend:
            raise ValueError(f"backend: {name} is already patched with backend={_ACTIVE[name].backend!r}; undo() "
                             f"that patch before applying it with backend={backend!r}")
        return _ACTIVE[name], False
    patch = Patch(name, backend)
    _ACTIVE[name] = patch
    return patch, True


def is_patched(module_name: str) -> bool:
    return any(module_name in p.targets for p in _ACTIVE.values())


class ScanMultipliers:
    """A foreign mixer's kernel multipliers (our Mamba keeps them on its SelectiveScan). Setting a
    value other than 1 needs the mixer's library patched, since only our kernels apply them."""

    def __init__(self, module_name: str):
        object.__setattr__(self, "module_name", module_name)
        self.dt_scale = self.b_scale = self.c_scale = 1.0

    def __setattr__(self, name, value):
        if value != 1.0 and not is_patched(self.module_name):
            raise RuntimeError(f"{self.module_name}: its mixers run their own scan, which has no width multipliers; "
                               "call ssm_kernels.integrations.apply_to_transformers() (or apply_to_mamba_ssm()) first")
        object.__setattr__(self, name, float(value))

    @staticmethod
    def on(mixer) -> "ScanMultipliers":
        holder = mixer.__dict__.get(HOLDER)
        if holder is None:
            holder = mixer.__dict__[HOLDER] = ScanMultipliers(type(mixer).__module__)
        return holder


def with_mixer_context(method):
    """Wraps a mixer method so that the functions it calls see this mixer's multipliers."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        token = _CURRENT.set(self.__dict__.get(HOLDER))
        try:
            return method(self, *args, **kwargs)
        finally:
            _CURRENT.reset(token)
    return wrapped


def current_multipliers() -> Dict[str, float]:
    holder = _CURRENT.get()
    if holder is None:
        return dict(dt_scale=1.0, b_scale=1.0, c_scale=1.0)
    return dict(dt_scale=holder.dt_scale, b_scale=holder.b_scale, c_scale=holder.c_scale)
