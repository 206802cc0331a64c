from .interface import selective_scan_fn
from .naive import selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref"]
