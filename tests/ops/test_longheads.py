"""longheads_attention (per tile of queries) equals the dense LongHeads weights times V."""

import pytest
import torch

from attnlab.modules import Rotary
from attnlab.ops.common import expand_kv
from attnlab.ops.longheads import (
    chunk_keys,
    longheads_attention,
    longheads_weights,
    select_chunks,
)

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
    kq = torch.randn(2, 4, lk, 8, dtype=torch.float64, device=DEVICE)
    keys = chunk_keys(kq, k, v, chunk_size=3, key_mask=key_mask, rotate=rotate)
    kw = {"keys": keys, "chunk_size": 3, "budget": 4, "key_mask": key_mask, "rotate": rotate}
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
    keys = chunk_keys(q, k, v, chunk_size=16)
    kept = saved_bytes_beyond((q, k, v), lambda: longheads_attention(
        q, k, v, positions, keys=keys, chunk_size=16, budget=4, rows=32))
    weights = h * length * length * 4 / 2  # the causal half of the (L, L) weights
    assert kept < weights / 8


def test_queries_beyond_the_keys_are_a_clear_error():
    q, k, v = make_qkv(1, 2, 2, 3, 3, 8, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="needs keys up to it"):
        longheads_attention(q, k, v, torch.tensor([3, 4, 5], device=DEVICE),
                            keys=chunk_keys(q, k, v, chunk_size=2), chunk_size=2, budget=3)


def test_chunk_keys_are_the_pooled_in_chunk_attention_written_out():
    """kbar_c = softmax(vbar_c . K_c^T / sqrt(d)) K_c, vbar_c the mean over the chunk's rows
    of softmax(Q_c K_c^T / sqrt(d)) V_c; padded tokens count as zeros; only whole chunks."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 11, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(1, 11, dtype=torch.bool)
    keep[0, 4] = False
    got = chunk_keys(q, k, v, chunk_size=3, key_mask=keep)
    assert got.shape == (1, 2, 3, 4)
    z = keep[0, :, None].double()
    for h in range(2):
        for c in range(3):
            part = slice(3 * c, 3 * c + 3)
            qc, kc, vc = (t[0, h, part] * z[part] for t in (q, k, v))
            vbar = (torch.softmax(qc @ kc.T / 2, -1) @ vc).mean(0)
            want = torch.softmax(vbar @ kc.T / 2, -1) @ kc
            torch.testing.assert_close(got[0, h, c], want, rtol=1e-12, atol=1e-12)


def test_each_query_keeps_the_first_the_previous_its_own_and_its_best_chunks():
    """Chunk keys planted so that head 0 prefers chunk 2 and head 1 chunk 4 (budget 4: one
    chosen chunk besides the three forced ones); a query of chunk 2 or earlier keeps all."""
    d, w = 4, 2
    keys = torch.zeros(1, 2, 7, d)
    keys[0, 0, 2, 0] = 1.0
    keys[0, 1, 4, 0] = 1.0
    q = torch.zeros(1, 2, 2, d)
    q[..., 0] = 1.0
    sel = select_chunks(q, keys, torch.tensor([15, 5]), chunk_size=w, budget=4, length=16)
    assert sel[0, 0, 0].nonzero().flatten().tolist() == [0, 2, 6, 7]
    assert sel[0, 1, 0].nonzero().flatten().tolist() == [0, 4, 6, 7]
    assert sel[0, :, 1, :3].all() and not sel[0, :, 1, 3:].any()


def test_chunk_keys_carry_no_gradient():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, torch.float64, device=DEVICE)
    assert not chunk_keys(q, k, v, chunk_size=2).requires_grad
