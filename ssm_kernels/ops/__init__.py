from .selective_scan import selective_scan_fn, selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref"]
