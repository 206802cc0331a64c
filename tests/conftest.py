import os

import pytest
import torch

# Triton kernels run through the interpreter when there is no GPU; the variable must be set
# before triton is first imported (torch itself does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Every op's fresh output buffers start as NaN, and no backend/determinism override leaks in."""
    from ssm_kernels.ops import utils
    monkeypatch.setattr(utils, "POISON_NEW_BUFFERS", True)
    monkeypatch.delenv("SSM_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("SSM_KERNELS_DETERMINISTIC", raising=False)
