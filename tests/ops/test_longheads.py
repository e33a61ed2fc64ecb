"""longheads_attention (per tile of queries) equals the dense LongHeads weights times V."""

import pytest
import torch

from attnlab.modules import Rotary
from attnlab.ops.common import expand_kv
from attnlab.ops.longheads import longheads_attention, longheads_weights

from ..device import DEVICE
from .cases import make_qkv, saved_bytes_beyond


def dense(q, k, v, positions, **kw):
    w = longheads_weights(q, k, positions, **kw)
    return w.to(v.dtype) @ expand_kv(v, q.shape[1])


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("lq,lk,rows,masked", [(45, 45, 4, False), (45, 45, 7, True),
                                              (6, 50, 4, True), (1, 33, 16, False)])
def test_tiles_equal_the_dense_weights_forward_and_backward(rope, lq, lk, rows, masked):
    q, k, v = make_qkv(2, 4, 2, lq, lk, 8, torch.float64, device=DEVICE)
    positions = torch.arange(lk - lq, lk, device=DEVICE)
    key_mask = None
    if masked:
        key_mask = torch.rand(2, lk, generator=torch.Generator().manual_seed(2)) > 0.2
        key_mask = key_mask.to(DEVICE)
    rotate = Rotary(8).double().to(DEVICE) if rope else None
    kw = {"chunk_size": 3, "budget": 4, "key_mask": key_mask, "rotate": rotate}
    grad_out = torch.randn(2, 4, lq, 8, dtype=torch.float64, device=DEVICE)
    out = longheads_attention(q, k, v, positions, rows=rows, **kw)
    ref = dense(q, k, v, positions, **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-12, rtol=1e-10)


def test_training_keeps_no_weights_between_forward_and_backward():
    length, h = 512, 2
    q, k, v = make_qkv(1, h, h, length, length, 16, torch.float32, device=DEVICE)
    positions = torch.arange(length, device=DEVICE)
    kept = saved_bytes_beyond((q, k, v), lambda: longheads_attention(
        q, k, v, positions, chunk_size=16, budget=4, rows=32))
    weights = h * length * length * 4 / 2  # the causal half of the (L, L) weights
    assert kept < weights / 8


def test_queries_beyond_the_keys_are_a_clear_error():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 8, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="needs keys up to it"):
        longheads_attention(q, k, v, torch.tensor([3, 4, 5], device=DEVICE), chunk_size=2,
                            budget=2)
