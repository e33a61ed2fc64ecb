"""Large inputs: every op gives finite outputs wherever the exact result fits the dtype.

Exact means the same op in float64. Sums over the sequence, exponentials and ridge solves
must be computed where they do not overflow (linear attention's sums overflowed float16 at
inputs x100, LLA's ridge solve gave NaN in float32 at x1e3).
"""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import neighborhood_attention

from ..device import DEVICE, HEAD_DIM
from .test_nonfinite import CASES, run

LARGE = [pytest.param(torch.float32, (1e2, 1e4), id="fp32"),
         pytest.param(torch.bfloat16, (1e2, 1e4), id="bf16"),
         pytest.param(torch.float16, (10, 100), id="fp16")]


def scaled_qkv(scale, dtype, length=11):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, length, HEAD_DIM, generator=g) for n in (4, 2, 2))
    return [(t * scale).to(DEVICE, dtype) for t in (q, k, v)]


def assert_finite_where_exact_fits(out, exact, dtype):
    fits = exact.abs().amax(-1) <= torch.finfo(dtype).max / 64
    bad = fits & ~torch.isfinite(out).all(-1)
    assert not bad.any(), f"{int(bad.sum())} of {int(fits.sum())} rows"


@pytest.mark.parametrize("dtype, scales", LARGE)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name, backend", CASES)
def test_large_inputs_give_finite_outputs(name, backend, causal, dtype, scales):
    for scale in scales:
        q, k, v = scaled_qkv(scale, dtype)
        out = run(name, backend, q, k, v, causal=causal)
        exact_backend = {"decode": "split", "linear": "parallel"}.get(name, "reference")
        exact = run(name, exact_backend, *(t.double() for t in (q, k, v)), causal=causal)
        assert_finite_where_exact_fits(out, exact, dtype)


@pytest.mark.parametrize("dtype, scales", LARGE)
def test_neighborhood_large_inputs_give_finite_outputs(dtype, scales):
    for scale in scales:
        q, k, v = scaled_qkv(scale, dtype, length=20)
        out = neighborhood_attention(q, k, v, kernel_size=5, backend="tiled")
        exact = neighborhood_attention(*(t.double() for t in (q, k, v)), kernel_size=5,
                                       backend="reference")
        assert_finite_where_exact_fits(out, exact, dtype)
