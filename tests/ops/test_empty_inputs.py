"""No sequence (B = 0), no query (Lq = 0) or no key (Lk = 0): every op answers with zeros of
the right shape, as for rows that see no key, instead of a reshape or reduction error."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import linear_attention, neighborhood_attention

from ..device import DEVICE
from .test_nonfinite import CASES, run


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, lq, lk", [(0, 11, 11), (2, 0, 0), (0, 0, 0), (2, 5, 0)])
@pytest.mark.parametrize("name, backend", CASES)
def test_empty_inputs_give_zeros_of_the_right_shape(name, backend, b, lq, lk, causal):
    q = torch.randn(b, 4, lq, 8, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(b, 2, lk, 8, device=DEVICE) for _ in range(2))
    out = run(name, backend, q, k, v, causal=causal)
    assert out.shape == (b, 4, lq, 8) and out.dtype == q.dtype
    assert (out == 0).all()
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("backend", ["tiled", "reference"])
@pytest.mark.parametrize("shape", [(0, 4, 11, 8), (2, 4, 0, 8), (0, 4, 3, 0, 8)])
def test_neighborhood_empty_inputs(backend, shape):
    q = torch.randn(shape, device=DEVICE)
    out = neighborhood_attention(q, q, q, kernel_size=3, backend=backend)
    assert out.shape == shape


def test_a_linear_state_passes_through_an_empty_call():
    q = torch.randn(2, 4, 6, 8, device=DEVICE)
    _, state = linear_attention(q, q, q, causal=True, return_state=True)
    empty = q[:, :, :0]
    for backend in ("chunked", "recurrent", "parallel"):
        out, same = linear_attention(empty, empty, empty, causal=True, state=state,
                                     return_state=True, backend=backend)
        assert out.shape == (2, 4, 0, 8)
        for a, b in zip(same, state, strict=True):
            torch.testing.assert_close(a, b)
