"""LSSAR's tiled row math in float32: the same weights as the reference, none subnormal."""

import math

import torch

from attnlab.ops.softplus import SoftplusRows, softplus_weights


def subnormal_count(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def test_lssar_weights_have_no_subnormals_and_match_the_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 32, generator=g)
    k = torch.randn(2, 4, 256, 32, generator=g)
    ref = softplus_weights(q.double(), k.double(), reweight_p=15.0).float()
    # the reference in float32 has weights of 2^-126 or less: the case the tiled math flushes
    assert subnormal_count(softplus_weights(q, k, reweight_p=15.0)) > 0
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).mT
    w, _ = SoftplusRows(math.log(32), 15.0).weights(cos.reshape(8, 64, 256), None)
    assert subnormal_count(w) == 0
    torch.testing.assert_close(w.reshape(ref.shape), ref, atol=1e-6, rtol=1e-4)


def test_tiled_softplus_with_large_length_scale_matches_reference():
    """alpha_i = c ln(N_i) >= 80, where e^x could overflow: the tiled math takes softplus and
    sigmoid directly instead of sharing one exp."""
    from attnlab.ops import softplus_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn(1, 2, 64, 8, generator=g, dtype=torch.float64)
    for p in (None, 3.0):
        outs = []
        for backend in ("tiled", "reference"):
            out = softplus_attention(q, k, v, causal=True, scale=30.0, reweight_p=p,
                                     backend=backend)
            outs.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
        for fast, ref in zip(*outs, strict=True):
            torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)


def test_lssar_shift_starts_at_the_fourth_row():
    """LSSAR's relu(n a - 1) skips the "- 1" for rows seeing at most 3 keys (the paper's
    first 3 causal rows): rows 2 and 3 from the LSSA weights by the equation."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, 8, 16, generator=g, dtype=torch.float64) for _ in range(2))
    a = softplus_weights(q, k, causal=True)
    w = softplus_weights(q, k, causal=True, reweight_p=3.0)
    for row, shift in ((2, 0.0), (3, 1.0)):
        n = row + 1
        t = torch.relu(n * a[..., row, :n] - shift) ** 3
        torch.testing.assert_close(w[..., row, :n], t / t.sum(-1, keepdim=True))
