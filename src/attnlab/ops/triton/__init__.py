"""Triton kernels of the ops (issue 36): one module per op (``sigmoid.py``, ``decode.py``,
``linear.py``, ...), each exposing the op's computation for ``backend="triton"``.

Triton is an optional dependency (CUDA builds of torch ship it; on a CPU machine
``pip install "attnlab[triton]"``) and is imported only when a kernel runs, never at
``import attnlab``. On the CPU the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the test suite checks them against the op references
without a GPU. On CUDA, ``backend="auto"`` prefers them where a call is supported (each op
lists ``"triton"`` first); on other devices auto never chooses them (the interpreter is for
tests: slow). ``ATTNLAB_TRITON_AUTO=0`` makes auto skip them on CUDA too (a named
``backend="triton"`` still works). See ``docs/architecture.md`` for what has been measured.
"""

from __future__ import annotations

import importlib.util
import os

INSTALL = "pip install 'attnlab[triton]' (CUDA builds of torch ship triton)"
AUTO_SWITCH = "ATTNLAB_TRITON_AUTO"  # "0": backend="auto" does not choose the triton kernels


# looked up once, when this package is first imported (not with functools.cache, through
# which torch.compile warns that it traces)
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def importable() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return _TRITON_FOUND


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not(device: str, *, auto: bool) -> str | None:
    """None when the triton backend can serve a call on ``device``, else the reason."""
    if not importable():
        return f"triton is not installed: {INSTALL}"
    if auto:
        if device != "cuda":
            return (f"auto uses the triton kernels on CUDA only ({device} tensors run them "
                    "only in Triton's interpreter, which is for tests: pass backend='triton')")
        if os.environ.get(AUTO_SWITCH, "1").strip() == "0":
            return f"{AUTO_SWITCH}=0: auto skips the triton kernels (backend='triton' runs them)"
        return None
    if device == "cuda" or interpreting():
        return None
    return (f"the triton kernels run on CUDA ({device} tensors only under Triton's "
            "interpreter, TRITON_INTERPRET=1)")
