"""The Triton kernels' tests: on a machine without CUDA they run the kernels in Triton's
interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before any kernel is
defined), against the op references; without the ``triton`` extra installed they are
skipped, saying so (``.ci/run`` installs it)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the triton extra is not installed: "
                                     "pip install -e '.[triton]'")
