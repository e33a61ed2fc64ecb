"""A key no row may see never reaches an output, whatever it holds; one a row sees makes it NaN.

0 x NaN is NaN, so a masked-out key holding NaN used to poison every row through the
weighted sum (and SDPA does the same). Every op and backend is fed NaN and inf in padded
keys and in causal-future keys, and compared with the same op on clean keys.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from attnlab import ops
from attnlab.core.masks import rows_seeing, visibility
from attnlab.ops import (
    decode_attention,
    linear_attention,
    local_linear_attention,
    neighborhood_attention,
    random_feature_attention,
    sigmoid_attention,
    softmax_attention,
    softplus_attention,
)

from ..device import DEVICE, HEAD_DIM

FLEX = ("flex",) if DEVICE.type == "cuda" else ()
# name -> (op, backends, whether it takes a per-row (B, H, Lq, Lk) mask)
OPS = {
    "softmax": (softmax_attention, ("sdpa", "reference", *FLEX), True),
    "sigmoid": (sigmoid_attention, ("tiled", "reference", *FLEX), True),
    "softplus": (softplus_attention, ("tiled", "reference", *FLEX), True),
    "lssar": (partial(softplus_attention, reweight_p=15.0), ("tiled", "reference"), True),
    "rfa": (partial(random_feature_attention, activation="sigmoid"), ("tiled", "reference"),
            True),
    "lla": (local_linear_attention, ("chunked", "reference"), True),
    "linear": (linear_attention, ("chunked", "recurrent", "parallel"), False),
    "decode": (lambda q, k, v, backend, **kw: decode_attention(
        q, k, v, splits=None if backend == "default" else 3, **kw), ("split", "default"), True),
}
CASES = [pytest.param(name, backend, id=f"{name}-{backend}")
         for name, (_, backends, _) in OPS.items() for backend in backends]
POISONS = [float("nan"), float("inf"), float("-inf")]


def qkv(b=2, h=4, hkv=2, length=11, d=HEAD_DIM):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, n, length, d, generator=g).to(DEVICE) for n in (h, hkv, hkv)]


def run(name, backend, q, k, v, **kw):
    op = OPS[name][0]
    return op(q, k, v, backend=backend, **kw)


def poisoned(t, where, value):
    """A copy of ``t`` (B, H, L, D) with ``value`` at the (B, L) positions ``where``."""
    return t.masked_fill(where[:, None, :, None], value)


@pytest.mark.parametrize("value", POISONS)
@pytest.mark.parametrize("name, backend", CASES)
def test_padded_keys_never_reach_an_output(name, backend, value):
    q, k, v = qkv()
    keep = torch.ones(2, 11, dtype=torch.bool, device=DEVICE)
    keep[0, :3] = False
    keep[1, -4:] = False
    mask = keep[:, None, None, :]
    clean = run(name, backend, q, k, v, mask=mask)
    for target in ("k", "v"):
        k2 = poisoned(k, ~keep, value) if target == "k" else k
        v2 = poisoned(v, ~keep, value) if target == "v" else v
        out = run(name, backend, q, k2, v2, mask=mask)
        assert torch.isfinite(out).all(), target
        torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, backend", CASES)
def test_a_future_key_never_reaches_the_past_and_makes_later_rows_nan(name, backend):
    q, k, v = qkv()
    t = 6
    at_t = torch.zeros(2, 11, dtype=torch.bool, device=DEVICE)
    at_t[:, t] = True
    clean = run(name, backend, q, k, v, causal=True)
    out = run(name, backend, q, poisoned(k, at_t, float("nan")), poisoned(v, at_t, float("inf")),
              causal=True)
    torch.testing.assert_close(out[:, :, :t], clean[:, :, :t], atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[:, :, t:]).all()


@pytest.mark.parametrize("name, backend",
                         [c for c in CASES if OPS[c.values[0]][2]])
def test_per_row_masks_hide_nonfinite_keys_row_by_row(name, backend):
    q, k, v = qkv()
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 4, 11, 11, generator=g) > 0.3).to(DEVICE)
    mask[..., 0] = True  # every row sees something
    bad = torch.zeros(2, 11, dtype=torch.bool, device=DEVICE)
    bad[0, 4] = bad[1, 9] = True
    out = run(name, backend, q, poisoned(k, bad, float("nan")), v, mask=mask)
    clean = run(name, backend, q, k, v, mask=mask & ~bad[:, None, None, :])
    # kv head 0 serves query heads 0 and 1 (GQA): a row sees the bad key where its mask says so
    sees = (mask & bad[:, None, None, :]).any(-1)  # (B, H, Lq)
    assert torch.isnan(out[sees]).all()
    torch.testing.assert_close(out[~sees], clean[~sees], atol=1e-5, rtol=1e-5)


def test_a_linear_state_that_summarised_a_nonfinite_key_is_nan():
    q, k, v = qkv()
    at = torch.zeros(2, 11, dtype=torch.bool, device=DEVICE)
    at[1, 3] = True
    _, (s, z) = linear_attention(q, poisoned(k, at, float("nan")), v, causal=True,
                                 return_state=True)
    assert torch.isnan(s[1]).all() and torch.isnan(z[1]).all()
    assert torch.isfinite(s[0]).all() and torch.isfinite(z[0]).all()


@pytest.mark.parametrize("backend", ["tiled", "reference", *FLEX])
@pytest.mark.parametrize("causal", [False, True])
def test_neighborhood_marks_exactly_the_windows_that_hold_a_nonfinite_key(backend, causal):
    q, k, v = qkv(length=20)
    bad = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    bad[0, 10] = True
    keep = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    keep[1, -4:] = False
    kw = dict(kernel_size=5, causal=causal, backend=backend)
    out = neighborhood_attention(q, poisoned(k, bad | ~keep, float("nan")), v, mask=keep, **kw)
    clean = neighborhood_attention(q, k, v, mask=keep & ~bad, **kw)
    rows = torch.arange(20, device=DEVICE)
    sees = (rows >= 10) & (rows <= 14) if causal else (rows >= 8) & (rows <= 12)
    assert torch.isnan(out[0][:, sees]).all()
    torch.testing.assert_close(out[0][:, ~sees], clean[0][:, ~sees], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out[1][:, :, :16]).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq, lk", [(5, 5), (3, 7), (1, 9), (4, 0)])
@pytest.mark.parametrize("mask_kind", [None, "keys", "rows"])
def test_rows_seeing_equals_the_dense_visibility(causal, lq, lk, mask_kind):
    g = torch.Generator().manual_seed(lq * 31 + lk)
    marked = torch.rand(2, 3, lk, generator=g) > 0.7
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(2, 1, 1, lk, generator=g) > 0.3
    elif mask_kind == "rows":
        mask = torch.rand(2, 3, lq, lk, generator=g) > 0.3
    vis = visibility(lq, lk, causal=causal, mask=mask, device=None)
    vis = torch.ones(lq, lk, dtype=torch.bool) if vis is None else vis
    vis = vis.expand(*vis.shape[:-2], lq, lk)
    expected = (vis & marked.unsqueeze(-2)).any(-1)
    torch.testing.assert_close(rows_seeing(marked, lq, causal=causal, mask=mask), expected)


@pytest.mark.parametrize("value", [1e20, 1e30, 3e38])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["softmax_attention", "sigmoid_attention",
                                  "softplus_attention", "linear_attention",
                                  "local_linear_attention", "random_feature_attention"])
def test_huge_finite_padded_keys_never_reach_an_output_or_a_gradient(name, causal, value):
    """A key-padding mask's keys may hold any number: 1e30 in a padded key overflowed in
    local_linear_attention's moments (k k^T) before the mask removed it (NaN rows and NaN
    gradients of the real keys, issue 41); the guard now zeroes them first."""
    op = getattr(ops, name)
    g = torch.Generator().manual_seed(0)
    # float32: 1e30 squared overflows there (float64 would hide the defect)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 7:] = False
    mask = keep[:, None, None, :]

    def run(fill: float):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        padded = ~keep[:, None, :, None]
        y = op(qq, kk.masked_fill(padded, fill), vv.masked_fill(padded, fill), mask=mask,
               causal=causal)
        y.sum().backward()
        return y, qq.grad, kk.grad * keep[:, None, :, None]

    for got, want in zip(run(value), run(0.0), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same keys: bit-equal
