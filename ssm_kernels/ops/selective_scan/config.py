"""ScanConfig: everything about one selective scan that is not a tensor of the recurrence.

The public boundaries (selective_scan_fn, selective_scan_cp, the Mamba modules' SelectiveScan,
selective_state_update) validate their arguments once and build one ScanConfig (interface.
scan_config); below them run_scan, scan_cp and the registry's forward, backward and decoding step
take it by keyword (`config=`), so no layer passes the groups, flags and multipliers as a row of
positional arguments.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

MULTIPLIERS = ("dt_scale", "b_scale", "c_scale")


@dataclass(frozen=True, eq=False)
class ScanConfig:
    """groups: channels per group of B and C is dim // groups (1 when both are fixed).
    delta_softplus: softplus on dt. dt_scale, b_scale, c_scale: the width multipliers, finite
    floats (checks.check_multipliers). backend: a registry name (backends.BACKENDS), already
    resolved. deterministic: the backward gives the same bits every run. cu_seqlens: packed
    sequences (flash-linear-attention's convention), checked by checks.check_cu_seqlens.
    eq=False: a config holds a tensor, so two configs are equal only when they are the same object."""
    groups: int = 1
    delta_softplus: bool = False
    dt_scale: float = 1.0
    b_scale: float = 1.0
    c_scale: float = 1.0
    backend: str = "torch"
    deterministic: bool = False
    cu_seqlens: Optional[Tensor] = None

    @property
    def multipliers(self) -> dict:
        """{"dt_scale": ..., "b_scale": ..., "c_scale": ...}"""
        return {name: getattr(self, name) for name in MULTIPLIERS}

    def replace(self, **changes) -> "ScanConfig":
        return dataclasses.replace(self, **changes)
