"""The ops that call SDPA hand it q, k, v with a unit stride on the last dim, whatever the
caller's layout: SDPA's fused kernels need one, and its math fallback holds every head's
(Lq, Lk) scores."""

import pytest
import torch

from attnlab.ops import neighborhood_attention, softmax_attention

from .cases import MaxNumel


def strided_channels(b: int, h: int, n: int, d: int) -> torch.Tensor:
    """A (B, H, L, D) tensor whose last dim has stride L (as a convolution's (B, C, L)
    output seen as (B, L, C))."""
    g = torch.Generator().manual_seed(n + d)
    return torch.randn(b, h, d, n, generator=g).transpose(-1, -2)


@pytest.mark.parametrize("kind", ["causal", "padded"])
def test_softmax_on_strided_channels_never_holds_the_scores(kind):
    b, h, n, d = 1, 2, 512, 16
    q, k, v = (strided_channels(b, h, n, d) for _ in range(3))
    assert q.stride(-1) == n
    mask = None
    if kind == "padded":
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        mask[..., -7:] = False
    with MaxNumel() as probe:
        out = softmax_attention(q, k, v, causal=kind == "causal", mask=mask)
    assert probe.largest < h * n * n  # the math fallback's scores are (B, H, L, L)
    same = softmax_attention(*(t.contiguous() for t in (q, k, v)), causal=kind == "causal",
                             mask=mask)
    torch.testing.assert_close(out, same)


def test_neighborhood_tiles_on_strided_channels_run_fused():
    b, h, n, d, kernel = 1, 2, 1024, 16, 31
    q, k, v = (strided_channels(b, h, n, d) for _ in range(3))
    assert q.stride(-1) == n
    with MaxNumel() as probe:
        out = neighborhood_attention(q, k, v, kernel_size=kernel, backend="tiled")
    # SDPA's math path on the tiles would hold (H, tiles, block, block + K - 1) scores
    assert probe.largest < h * n * kernel
    same = neighborhood_attention(*(t.contiguous() for t in (q, k, v)), kernel_size=kernel,
                                  backend="tiled")
    torch.testing.assert_close(out, same)
