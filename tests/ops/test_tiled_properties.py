"""Randomised checks of the tiled engine against the dense reference (hypothesis)."""

from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from .cases import OPS


@settings(max_examples=25, deadline=None)
@given(
    op_name=st.sampled_from(["sigmoid", "lssa", "lssar"]),
    lq=st.integers(1, 40),
    extra_keys=st.integers(0, 20),
    block=st.integers(1, 17),
    causal=st.booleans(),
    pad=st.floats(0.0, 0.9),
    per_query=st.booleans(),
    heads_per_tile=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_tiled_equals_reference_for_any_shape_block_and_mask(op_name, lq, extra_keys, block,
                                                             causal, pad, per_query,
                                                             heads_per_tile, seed):
    """Lq <= Lk (a decoding chunk when causal), any block size, random key padding or a
    mask per query and head, tiles of any number of the 4 (batch, head) pairs."""
    op, _ = OPS[op_name]
    lk = lq + extra_keys
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, lq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, lk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, lk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask_shape = (2, 2, lq, lk) if per_query else (2, 1, 1, lk)
    mask = (torch.rand(*mask_shape, generator=g) >= pad)
    grad_out = torch.randn(2, 2, lq, 8, generator=g, dtype=torch.float64)

    def run(**kw):
        out = op(q, k, v, causal=causal, mask=mask, **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    # a tile holds heads_per_tile x block rows x Lk scores at most on the CPU
    with mock.patch("attnlab.ops.tiled.CACHE_TILE_ELEMENTS", heads_per_tile * block * lk):
        tiled = run(backend="tiled", block_size=block)
    for fast, ref in zip(tiled, run(backend="reference"), strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-7)
