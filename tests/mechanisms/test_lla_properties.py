"""Local linear attention: the catalogue's checks (docs/mechanisms/lla.md)."""

import pytest
import torch

from attnlab.ops.lla import lla_weights, local_linear_attention
from attnlab.ops.softmax import softmax_weights

from ..ops.cases import MaxNumel


def data(n=24, d=4, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, n, dv, generator=g, dtype=torch.float64)
    return q, k, v


def explicit_ridge_intercepts(q, k, v, ridge, causal):
    """Per query: solve min_{a,b} sum_j w_j (v_j - a - b^T (k_j - q_i))^2 + ridge*omega*|b|^2."""
    n, d = q.shape[2], q.shape[3]
    out = []
    for i in range(n):
        keys = k[0, 0, : i + 1] if causal else k[0, 0]
        vals = v[0, 0, : i + 1] if causal else v[0, 0]
        w = torch.exp(keys @ q[0, 0, i] / d ** 0.5)
        x = torch.cat([torch.ones(len(keys), 1, dtype=q.dtype), keys - q[0, 0, i]], 1)
        penalty = torch.diag(torch.cat([torch.zeros(1), torch.full((d,), 1.0)])).double()
        lhs = x.T @ (w[:, None] * x) + ridge * w.sum() * penalty
        coef = torch.linalg.solve(lhs, x.T @ (w[:, None] * vals))
        out.append(coef[0])
    return torch.stack(out)[None, None]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ridge", [0.1, 1.0])
def test_equals_an_explicit_weighted_ridge_solve(causal, ridge):
    q, k, v = data()
    expected = explicit_ridge_intercepts(q, k, v, ridge, causal)
    for backend in ("reference", "chunked"):
        out = local_linear_attention(q, k, v, causal=causal, ridge=ridge, backend=backend,
                                     block_size=5)
        torch.testing.assert_close(out[:, :, 8:], expected[:, :, 8:])


def test_tends_to_softmax_as_ridge_grows():
    q, k, v = data()
    soft = softmax_weights(q, k, causal=True, scale=0.5)
    gaps = [(lla_weights(q, k, causal=True, scale=0.5, ridge=r) - soft).abs().max().item()
            for r in (1.0, 10.0, 100.0, 1e4)]
    assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 1e-3


def test_recovers_a_q_plus_b_when_values_are_linear_in_keys():
    q, k, _ = data(n=30, d=4)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    v = k @ a + b
    out = local_linear_attention(q, k, v, causal=False, ridge=1e-9)
    torch.testing.assert_close(out, q @ a + b, atol=1e-6, rtol=1e-6)
    soft = torch.softmax(q @ k.mT / 2, -1) @ v  # softmax cannot do this
    assert (soft - (q @ a + b)).abs().max() > 0.1


def test_chunked_equals_reference_forward_and_backward_with_padding():
    q, k, v = (t.requires_grad_() for t in data(n=37, d=8, dv=8))
    mask = torch.ones(1, 1, 1, 37, dtype=torch.bool)
    mask[..., :5] = False
    grad = torch.randn(1, 1, 37, 8, dtype=torch.float64)
    res = []
    for backend, block in (("reference", 64), ("chunked", 7)):
        out = local_linear_attention(q, k, v, causal=True, mask=mask, backend=backend,
                                     block_size=block)
        res.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b)
    assert (res[0][0][:, :, :5] == 0).all()  # rows that see no key


def test_chunked_training_keeps_memory_linear_in_length_for_the_backward():
    """What autograd keeps between forward and backward doubles with L (each block's
    visibility is rebuilt in the backward, not kept: (block, keys) bools per block were
    L^2 / 2 bytes in all)."""
    from ..ops.cases import saved_bytes_beyond

    kept = {}
    for n in (1024, 2048):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, 8, generator=g).requires_grad_() for _ in range(3))
        kept[n] = saved_bytes_beyond((q, k, v), lambda q=q, k=k, v=v: local_linear_attention(
            q, k, v, causal=True, block_size=64))
    assert kept[2048] <= 2.2 * kept[1024]
    assert kept[2048] < 2048 * 2048 / 16  # far below one byte per visible (query, key) pair


@pytest.fixture
def small_key_chunks(monkeypatch):
    """_SecondMoment's key chunks of 16 keys (2 heads, D = 8), so that a few keys span
    several chunks and a partial last one."""
    import attnlab.ops.lla as lla

    monkeypatch.setattr(lla, "TILE_ELEMENTS", 16 * 2 * 8 * 8)


def test_second_moment_equals_the_einsum_forward_and_backward(small_key_chunks):
    from attnlab.ops.lla import _SecondMoment

    g = torch.Generator().manual_seed(3)
    w = torch.rand(1, 2, 5, 37, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(1, 2, 37, 8, generator=g, dtype=torch.float64).requires_grad_()
    grad = torch.randn(1, 2, 5, 8, 8, generator=g, dtype=torch.float64)  # not symmetric
    got = _SecondMoment.apply(w, k)
    want = torch.einsum("...qj,...jd,...je->...qde", w, k, k)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (w, k), grad),
                    torch.autograd.grad(want, (w, k), grad), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(_SecondMoment.apply, (w, k))


def test_second_moment_holds_nothing_larger_than_the_weights(small_key_chunks):
    """sum_j w_qj k_j k_j^T over chunks of keys: no (Q, keys, D) product (an einsum's),
    forward or backward."""
    from attnlab.ops.lla import _SecondMoment

    w = torch.rand(1, 2, 16, 512, requires_grad=True)
    k = torch.randn(1, 2, 512, 8, requires_grad=True)
    with MaxNumel() as probe:
        _SecondMoment.apply(w, k).square().sum().backward()
    assert probe.largest <= w.numel() < w.numel() * k.shape[-1]


def test_chunked_training_never_holds_an_l_by_l_matrix():
    n, heads, d, block = 1024, 2, 8, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).requires_grad_() for _ in range(3))
    with MaxNumel() as probe:
        local_linear_attention(q, k, v, causal=True, block_size=block).sum().backward()
    # the largest is a block's (block, L) weights or their gradient: linear in L
    assert probe.largest <= heads * block * n < heads * n * n
    with MaxNumel() as dense:
        local_linear_attention(q, k, v, causal=True, backend="reference").sum().backward()
    assert dense.largest >= heads * n * n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_a_ridge_below_rounding_stays_finite_on_causal_rows_with_few_keys(dtype, backend):
    # the first causal queries see fewer keys than D: their covariance is singular, and a
    # positive lambda smaller than the dtype's rounding (hypothesis drew 5e-324) was lost
    q, k, v = (t.to(dtype) for t in data(n=12, d=6, dv=3))
    for ridge in (5e-324, 1e-30):
        out = local_linear_attention(q, k, v, causal=True, ridge=ridge, backend=backend)
        assert torch.isfinite(out).all(), (ridge, out)
    # the floor changes nothing at an ordinary lambda: the explicit ridge solve agrees
    want = explicit_ridge_intercepts(*data(n=12, d=6, dv=3), 0.5, True)
    got = local_linear_attention(q, k, v, causal=True, ridge=0.5, backend=backend)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
