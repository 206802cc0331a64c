import os

import pytest
import torch

# Triton kernels run through the interpreter when there is no GPU; the variable must be set
# before triton is first imported (torch itself does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpret_helpers_without_repatching():
    """Speed only: Triton's interpreter patches triton.language (and triton.language.core, when
    a function's module sees it) again on every call of a @triton.jit function inside a kernel,
    about 2 ms each and more than half the time of the kernel tests. The patch is global, so
    inside a launch a call whose modules are patched already skips it. Semantics are unchanged;
    on a Triton whose interpreter is laid out differently this does nothing."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        grid_call, patch_lang = interpreter.GridExecutor.__call__, interpreter._patch_lang
    except (ImportError, AttributeError):
        return
    languages = (tl, tl.core)
    launches = []  # for each kernel launch in progress, the language modules it has patched

    class _NothingToRestore:
        def restore(self):
            pass

    def patch_once(fn):
        seen = {id(v) for v in fn.__globals__.values() if any(v is lang for lang in languages)}
        if launches and seen <= launches[-1]:
            return _NothingToRestore()
        if launches:
            launches[-1] |= seen
        return patch_lang(fn)

    def launch(self, *args, **kwargs):
        launches.append(set())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpret_helpers_without_repatching()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: spawns processes, or runs the Triton kernels through the interpreter at "
                            "length; `pytest -m 'not slow' tests` is the quick loop (README, Two commands)")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Every op's fresh output buffers start as NaN, and no backend/determinism override leaks in."""
    from ssm_kernels.ops import utils
    monkeypatch.setattr(utils, "POISON_NEW_BUFFERS", True)
    monkeypatch.delenv("SSM_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("SSM_KERNELS_DETERMINISTIC", raising=False)
