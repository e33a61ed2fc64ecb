"""random_feature_attention with relu: tiled equals the reference (float64), bounded memory."""

import pytest
import torch

from attnlab.ops.rfa import random_feature_attention

from .cases import key_padding
from .test_backends import MaxNumel


@pytest.mark.parametrize("length", [1, 63, 257])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_relu_tiled_equals_reference_forward_and_backward(length, causal, masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, length, 12, generator=g, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    mask = key_padding(2, length) if masked else None
    grad = torch.randn(2, 2, length, 12, generator=g, dtype=torch.float64)
    results = []
    for backend in ("tiled", "reference"):
        out = random_feature_attention(q, k, v, causal=causal, mask=mask, backend=backend,
                                       block_size=16)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_tiled_training_holds_no_l_by_l_matrix():
    n = 1024
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    with MaxNumel() as probe:
        random_feature_attention(q, k, v, causal=True, block_size=64).sum().backward()
    assert probe.largest < n * n


def test_errors():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="activation must be one of"):
        random_feature_attention(q, q, q, activation="gelu")
    with pytest.raises(ValueError, match="unknown backend"):
        random_feature_attention(q, q, q, backend="flex")
