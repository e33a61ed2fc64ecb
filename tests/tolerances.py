"""Tolerances derived from the dtype and the computation, for results that two paths (or two
CPUs) compute with the same math but in another order.

Rounding: a floating-point operation is exact up to a relative u = eps / 2 (eps: the gap
from 1 to the next number of the dtype). A sum of n terms, in any order, is off by at most
(n - 1) u times the sum of their magnitudes (Higham, "Accuracy and Stability of Numerical
Algorithms", 2002, §4.2); a dot product the same. Two orders of the same computation can
therefore differ by about twice that. For a result of magnitude ``scale`` built from O(1)
terms through a chain of such operations, the difference is bounded by ``roundings`` x eps x
``scale``, where ``roundings`` bounds the number of terms summed along the longest path
(e.g. a 64-wide projection followed by 32 keys: ~100). The same tolerance holds on every
x86 CPU, whatever its vector width (``ATEN_CPU_CAPABILITY=default``, ``avx2``, ``avx512``)
or thread count, which is what changes the order.

This is PyTorch's OpInfo practice made explicit: rtol and atol per dtype, scaled by the
magnitude of the output and the length of its reductions. A test states ``roundings`` for
its computation; it never uses a bare absolute number meant for one dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the default bound on terms summed along a path in the conformance-sized modules (dim 32,
# up to 24 tokens, two projections, scores, weights times values)
ROUNDINGS = 256


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tolerance(actual: Tensor, expected: Tensor, *, roundings: int = ROUNDINGS
              ) -> dict[str, float]:
    """``atol`` and ``rtol`` for comparing ``actual`` to ``expected``: ``roundings`` x eps of
    the less precise of the two dtypes, atol scaled by the larger magnitude of ``expected``
    (at least 1: O(1) inputs make terms of O(1), and a result that is mathematically 0 holds
    rounding noise of that size)."""
    dtype = actual.dtype if eps(actual.dtype) >= eps(expected.dtype) else expected.dtype
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    tol = roundings * eps(dtype)
    return {"atol": tol * scale, "rtol": tol}


def assert_close(actual: Tensor, expected: Tensor, *, roundings: int = ROUNDINGS,
                 msg: str | None = None, equal_nan: bool = False) -> None:
    """``torch.testing.assert_close`` with :func:`tolerance` (tensors of two dtypes are
    compared in float64, at the tolerance of the less precise one)."""
    tol = tolerance(actual, expected.nan_to_num() if equal_nan else expected,
                    roundings=roundings)
    if actual.dtype != expected.dtype:
        actual, expected = actual.double(), expected.double()
    torch.testing.assert_close(actual, expected, **tol, equal_nan=equal_nan,
                               msg=None if msg is None else (lambda m: f"{msg}: {m}"))
