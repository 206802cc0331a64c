from .selective_scan import selective_scan_fn, selective_scan_ref
from .state_update import selective_state_update

__all__ = ["selective_scan_fn", "selective_scan_ref", "selective_state_update"]
