"""Reversible replacement of attributes in other libraries' modules, and the per-mixer context
that carries a mixer's kernel multipliers into the functions those modules call."""

import contextvars
import functools
import gc
import weakref
from typing import Dict, List, Optional, Tuple

from ..ops.selective_scan.backends import get_backend

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
        """Restores the originals. Refused while a live model of a patched library carries width
        multipliers other than 1: the library's own functions have none, so the model would
        compute neither its parameterized function nor SP's (the state setting a multiplier on an
        unpatched model refuses)."""
        carrying = _carrying_multipliers(self.targets)
        if carrying:
            raise RuntimeError(f"undo(): {len(carrying)} mixer(s) of live models ({', '.join(sorted(set(carrying)))}) "
                               "carry width multipliers that only ssm_kernels' kernels apply; delete those models, "
                               "or set their multipliers to 1 (Parameterization('sp', ...).apply_multipliers(model))"
                               ", then undo()")
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
    """(patch, fresh): the active patch of that name, or a new one to fill. An unknown backend is
    refused here, not at the first forward."""
    if backend is not None:
        get_backend(backend)
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


_HOLDERS: "weakref.WeakSet[ScanMultipliers]" = weakref.WeakSet()  # every foreign mixer's, while it lives


def _carrying_multipliers(module_names) -> List[str]:
    """Class names of the live foreign mixers from these modules whose multipliers are not all 1."""
    def carrying():
        return [h.mixer_class for h in list(_HOLDERS) if h.module_name in module_names and not h.trivial()]
    if carrying():
        gc.collect()  # a model already dropped but held in a reference cycle does not count
    return carrying()


class ScanMultipliers:
    """A foreign mixer's kernel multipliers (our Mamba keeps them on its SelectiveScan). Setting a
    value other than 1 needs the mixer's library patched, since only our kernels apply them."""

    def __init__(self, module_name: str, mixer_class: str = "mixer"):
        object.__setattr__(self, "module_name", module_name)
        object.__setattr__(self, "mixer_class", mixer_class)
        self.dt_scale = self.b_scale = self.c_scale = 1.0
        _HOLDERS.add(self)

    def trivial(self) -> bool:
        return self.dt_scale == self.b_scale == self.c_scale == 1.0

    def __setattr__(self, name, value):
        if value != 1.0 and not is_patched(self.module_name):
            raise RuntimeError(f"{self.module_name}: its mixers run their own scan, which has no width multipliers; "
                               "call ssm_kernels.integrations.apply_to_transformers() (or apply_to_mamba_ssm()) first")
        object.__setattr__(self, name, float(value))

    @staticmethod
    def on(mixer) -> "ScanMultipliers":
        holder = mixer.__dict__.get(HOLDER)
        if holder is None:
            holder = mixer.__dict__[HOLDER] = ScanMultipliers(type(mixer).__module__, type(mixer).__name__)
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
