"""key_priority_attention (dma's tiled top-w selection) equals the dense top-w reference."""

import pytest
import torch

from attnlab.core.masks import top_keys, visibility
from attnlab.ops.common import expand_kv
from attnlab.ops.key_priority import key_priority_attention
from attnlab.ops.softmax import softmax_weights

from ..device import DEVICE
from .cases import MaxNumel, make_qkv, saved_bytes_beyond


def dense(q, k, v, priority, *, window, causal, key_mask):
    """The definition: the (Lq, Lk) top-w mask of every row, softmax with the priority."""
    h = q.shape[1]
    lq, lk = q.shape[2], k.shape[2]
    mask = None if key_mask is None else key_mask[:, None, None, :]
    vis = visibility(lq, lk, causal=causal, mask=mask, device=q.device)
    if vis is None:
        vis = torch.ones(1, 1, 1, lk, dtype=torch.bool, device=q.device)
    bias = expand_kv(priority.unsqueeze(-2), h)
    keep = top_keys(bias, vis.expand(q.shape[0], h, lq, lk), window)
    w = softmax_weights(q, expand_kv(k, h), mask=keep, bias=bias)
    return w.to(v.dtype) @ expand_kv(v, h)


def priority_of(kind, b, hkv, lk, dtype):
    g = torch.Generator().manual_seed(3)
    if kind == "ties":  # few distinct values: the later key must win every tie
        p = torch.randint(0, 3, (b, hkv, lk), generator=g).float()
    elif kind == "zero":  # dma at initialisation: a sliding window
        p = torch.zeros(b, hkv, lk)
    else:
        p = torch.randn(b, hkv, lk, generator=g) * 2
    return p.to(DEVICE, dtype).requires_grad_()


def grads(fn, q, k, v, p, grad_out, **kw):
    out = fn(q, k, v, p, **kw)
    return out, torch.autograd.grad(out, (q, k, v, p), grad_out)


CASES = [  # lq, lk, window, rows, causal, masked, kind
    (37, 37, 5, 8, True, False, "random"),
    (37, 37, 5, 8, True, True, "ties"),
    (64, 64, 16, 16, True, False, "zero"),
    (33, 33, 1, 7, True, True, "random"),
    (30, 30, 40, 8, True, False, "random"),   # window larger than every prefix
    (5, 41, 6, 2, True, True, "ties"),        # queries at the end of a cache
    (1, 50, 9, 128, True, False, "random"),   # one decoding query
    (9, 5, 3, 4, True, False, "random"),      # more queries than keys: early rows see none
    (37, 37, 5, 8, False, True, "random"),
    (29, 29, 29, 8, False, False, "random"),  # window = every key
    (20, 44, 7, 8, False, False, "ties"),
]


@pytest.mark.parametrize("lq,lk,window,rows,causal,masked,kind", CASES)
def test_tiled_selection_equals_the_dense_top_w_reference_with_gradients(
        lq, lk, window, rows, causal, masked, kind):
    b, h, hkv, d = 2, 4, 2, 8
    q, k, v = make_qkv(b, h, hkv, lq, lk, d, torch.float64, device=DEVICE)
    p = priority_of(kind, b, hkv, lk, torch.float64)
    key_mask = None
    if masked:
        key_mask = torch.rand(b, lk, generator=torch.Generator().manual_seed(1)) > 0.25
        key_mask[0, : lk // 3] = False
        key_mask = key_mask.to(DEVICE)
    grad_out = torch.randn(b, h, lq, d, dtype=torch.float64, device=DEVICE)
    kw = {"window": window, "causal": causal}
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out, g = grads(key_priority_attention, q, k, v, p, grad_out, rows=rows, mask=mask, **kw)
    ref, rg = grads(dense, q, k, v, p, grad_out, key_mask=key_mask, **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    for name, a, e in zip(("dq", "dk", "dv", "dpriority"), g, rg, strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{n} {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_agrees_with_the_float64_reference(dtype, tol):
    q, k, v = make_qkv(1, 4, 4, 70, 70, 16, dtype, device=DEVICE)
    p = priority_of("random", 1, 4, 70, torch.float32)
    out = key_priority_attention(q, k, v, p, window=12, causal=True, rows=16)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    ref = dense(q64, k64, v64, p.detach().double(), window=12, causal=True, key_mask=None)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_training_never_builds_an_lq_by_lk_tensor():
    length, window, rows = 1024, 64, 64
    q, k, v = make_qkv(1, 2, 2, length, length, 16, torch.float32, device=DEVICE)
    p = priority_of("random", 1, 2, length, torch.float32)
    with MaxNumel() as probe:
        key_priority_attention(q, k, v, p, window=window, causal=True,
                               rows=rows).sum().backward()
    inputs = 2 * length * 16  # q, k, v and their gradients: (B, H, L, D)
    assert probe.largest <= max(inputs, 2 * rows * (window + rows)) < length * length
    with MaxNumel() as probe_dense:  # the probe sees the reference's (L, L) mask
        dense(q, k, v, p, window=window, causal=True, key_mask=None).sum().backward()
    assert probe_dense.largest >= length * length


def test_training_keeps_no_scores_between_forward_and_backward():
    """The backward recomputes each tile: autograd keeps the inputs and the output, far
    below the tiles' scores together."""
    length, window, rows, h = 1024, 256, 64, 2
    q, k, v = make_qkv(1, h, h, length, length, 16, torch.float32, device=DEVICE)
    p = priority_of("random", 1, h, length, torch.float32)
    kept = saved_bytes_beyond((q, k, v, p), lambda: key_priority_attention(
        q, k, v, p, window=window, causal=True, rows=rows))
    scores = h * length * (window + rows) * 4  # every tile's scores in float32
    assert kept < scores / 4


def test_bad_window_and_priority_shape_are_clear_errors():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="window must be >= 1"):
        key_priority_attention(q, k, v, torch.zeros(1, 2, 4, device=DEVICE), window=0)
    with pytest.raises(ValueError, match=r"priority must be \(B, H_kv, Lk\)"):
        key_priority_attention(q, k, v, torch.zeros(1, 2, 5, device=DEVICE), window=2)
    with pytest.raises(ValueError, match="mask must be key padding"):
        key_priority_attention(q, k, v, torch.zeros(1, 2, 4, device=DEVICE), window=2,
                               mask=torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE))
