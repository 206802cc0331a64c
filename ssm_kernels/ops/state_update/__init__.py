"""One decoding step of the selective scan: selective_state_update (mamba_ssm's signature)."""

from .update import selective_state_update

__all__ = ["selective_state_update"]
