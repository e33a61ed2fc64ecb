"""Triton kernels of the ops (issue 36): one module per op (``sigmoid.py``, ``decode.py``,
``linear.py``, ...), each exposing the op's computation for ``backend="triton"``.

Triton is an optional dependency (CUDA builds of torch ship it; on a CPU machine
``pip install "attnlab[triton]"``) and is imported only when a kernel runs, never at
``import attnlab``. On the CPU the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the test suite checks them against the op references
without a GPU. ``backend="auto"`` does not choose them yet: they have been checked under the
interpreter only, and are chosen by name until a GPU run validates them (see
``docs/architecture.md``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

INSTALL = "pip install 'attnlab[triton]' (CUDA builds of torch ship triton)"


@functools.cache
def importable() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not(device: str, *, auto: bool) -> str | None:
    """None when the triton backend can serve a call on ``device``, else the reason."""
    if not importable():
        return f"triton is not installed: {INSTALL}"
    if auto:
        return ("auto does not choose the triton kernels yet (checked under Triton's "
                "interpreter only, not yet on a GPU): pass backend='triton'")
    if device == "cuda" or interpreting():
        return None
    return (f"the triton kernels run on CUDA ({device} tensors only under Triton's "
            "interpreter, TRITON_INTERPRET=1)")
