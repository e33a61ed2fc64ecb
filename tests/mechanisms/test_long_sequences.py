"""Training the scored mechanisms at long length never holds a per-head L x L tensor."""

import pytest
import torch

import attnlab as al

from ..ops.test_backends import MaxNumel


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "softplus", "gated", "selective",
                                  "cca", "rcmha"])
def test_module_training_memory_is_subquadratic(name):
    length, heads = 2048, 4
    attn = al.build(name, dim=64, heads=heads, causal=True)
    x = torch.randn(1, length, 64, requires_grad=True)
    with MaxNumel() as probe:
        attn(x).square().mean().backward()
    assert probe.largest < length * length  # not even one head's scores at once
    assert torch.isfinite(x.grad).all()
