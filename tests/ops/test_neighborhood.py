"""Generalized neighborhood attention: the window rule, and every backend against the reference."""

import math

import pytest
import torch

from attnlab.ops import neighborhood_attention
from attnlab.ops.neighborhood import neighborhood_visibility

from .cases import TOL
from .test_backends import MaxNumel


def explicit_axis_window(length, kernel, dilation, stride, causal):
    """The window rule written out position by position (catalogue, section C)."""
    rows = []
    for i in range(length):
        g, ip = i % dilation, i // dilation
        group_len = len(range(g, length, dilation))
        k = min(kernel, group_len)
        if causal:
            leader = min((ip // stride) * stride + stride - 1, group_len - 1)
            keys = range(max(leader - k + 1, 0), ip + 1)
        else:
            leader = min((ip // stride) * stride + stride // 2, group_len - 1)
            start = max(leader - k // 2, 0)
            start = min(start, group_len - k)
            keys = range(start, start + k)
        rows.append({g + dilation * j for j in keys})
    return rows


AXIS_CASES = [(13, 5, 1, 1), (13, 5, 2, 1), (13, 4, 2, 2), (12, 4, 1, 4), (9, 9, 1, 1),
              (10, 3, 3, 3), (7, 7, 2, 1), (16, 6, 1, 3), (5, 8, 1, 2)]


@pytest.mark.parametrize("length, kernel, dilation, stride", AXIS_CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_axis_mask_matches_the_written_out_rule(length, kernel, dilation, stride, causal):
    vis = neighborhood_visibility((length,), kernel_size=kernel, dilation=dilation,
                                  stride=stride, causal=causal)
    expected = explicit_axis_window(length, kernel, dilation, stride, causal)
    got = [set(torch.nonzero(row).flatten().tolist()) for row in vis]
    assert got == expected


@pytest.mark.parametrize("spatial, kernel, dilation, stride", [
    ((13,), 5, 2, 1), ((12, 9), (3, 5), (2, 1), (3, 2)), ((5, 6, 7), 3, (1, 2, 1), (1, 1, 3)),
])
def test_every_non_causal_query_sees_exactly_k_keys(spatial, kernel, dilation, stride):
    vis = neighborhood_visibility(spatial, kernel_size=kernel, dilation=dilation, stride=stride)
    n = len(spatial)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * n
    assert (vis.sum(-1) == math.prod(ks)).all()
    assert vis.diagonal().all()  # a query always sees itself


def test_stride_equal_to_kernel_is_blocked_attention():
    vis = neighborhood_visibility((12, 8), kernel_size=4, stride=4)
    idx = torch.arange(96)
    r, c = idx // 8, idx % 8
    block = (r // 4)[:, None] == (r // 4)[None, :]
    block &= (c // 4)[:, None] == (c // 4)[None, :]
    assert torch.equal(vis, block)
    causal = neighborhood_visibility((12,), kernel_size=4, stride=4, causal=True)
    i = torch.arange(12)
    expected = ((i // 4)[:, None] == (i // 4)[None, :]) & (i[None, :] <= i[:, None])
    assert torch.equal(causal, expected)


@pytest.mark.parametrize("length, kernel, dilation", [(13, 3, 1), (13, 5, 2), (8, 4, 3)])
def test_clip_border_is_a_convolution_window(length, kernel, dilation):
    vis = neighborhood_visibility((length,), kernel_size=kernel, dilation=dilation,
                                  border="clip")
    for i, row in enumerate(vis):
        taps = {i + (o - kernel // 2) * dilation for o in range(kernel)}
        assert set(torch.nonzero(row).flatten().tolist()) == {j for j in taps
                                                              if 0 <= j < length}


def test_kernel_equal_to_length_is_full_attention():
    assert neighborhood_visibility((7, 5), kernel_size=(7, 5)).all()
    assert torch.equal(neighborhood_visibility((9,), kernel_size=9, causal=True),
                       torch.ones(9, 9, dtype=torch.bool).tril())


def test_causal_stride_one_is_a_sliding_window():
    vis = neighborhood_visibility((20,), kernel_size=4, causal=True)
    i = torch.arange(20)
    assert torch.equal(vis, (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4))


CASES = [
    ((1,), dict(kernel_size=3)),
    ((37,), dict(kernel_size=7)),
    ((37,), dict(kernel_size=6, dilation=3, stride=2)),
    ((37,), dict(kernel_size=5, dilation=2, stride=5, causal=True)),
    ((100,), dict(kernel_size=100)),
    ((9, 11), dict(kernel_size=3)),
    ((9, 11), dict(kernel_size=(5, 3), dilation=(1, 3), stride=(2, 3), causal=(True, False))),
    ((8, 8), dict(kernel_size=4, stride=4)),
    ((4, 5, 6), dict(kernel_size=3, causal=(True, False, False))),
    ((5, 6, 7), dict(kernel_size=(2, 3, 5), dilation=(2, 1, 1), stride=(1, 3, 2))),
    ((9, 11), dict(kernel_size=(3, 4), dilation=(2, 1), border="clip")),
]
# one axis, no dilation or stride, longer than a tile's keys: the tiled backend takes the key
# windows as views of k and v (border tiles gathered); odd lengths, K above and below the tile
SLIDING_CASES = [
    ((200,), dict(kernel_size=7)),
    ((131,), dict(kernel_size=16, block=8)),
    ((131,), dict(kernel_size=15, block=8, causal=True)),
    ((131,), dict(kernel_size=40, block=8)),
    ((97,), dict(kernel_size=40, block=16, causal=True)),
    ((64,), dict(kernel_size=9, block=8)),  # length a multiple of the tile
]


def make(shape, dtype, hkv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, *shape, 8, generator=g)
    k = torch.randn(2, hkv, *shape, 8, generator=g)
    v = torch.randn(2, hkv, *shape, 8, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def key_mask(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, *shape, generator=g) > 0.25
    keep[0].view(-1)[: max(1, keep[0].numel() // 3)] = False
    return keep


@pytest.mark.parametrize("shape, kwargs", CASES + SLIDING_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_tiled_equals_reference_forward_and_backward(shape, kwargs, dtype, masked):
    q, k, v = make(shape, dtype, hkv=1 if masked else 3)
    mask = key_mask(shape) if masked else None
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = neighborhood_attention(*ref_inputs, **kwargs, mask=mask, backend="reference")
    out = neighborhood_attention(q, k, v, **kwargs, mask=mask, backend="tiled")
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.to(dtype))
    for mine, theirs in zip((q, k, v), ref_inputs, strict=True):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=2 * atol,
                                   rtol=2 * rtol)


@pytest.mark.parametrize("block", [1, 2, 5, (3, 4)])
def test_any_tile_size_gives_the_same_result(block):
    q, k, v = make((9, 11), torch.float64)
    kw = dict(kernel_size=(5, 3), dilation=(1, 2), stride=(1, 3))
    ref = neighborhood_attention(q, k, v, **kw, backend="reference")
    out = neighborhood_attention(q, k, v, **kw, backend="tiled", block=block)
    torch.testing.assert_close(out, ref)


def test_rows_with_no_visible_key_are_zero():
    q, k, v = make((10,), torch.float32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :6] = False
    out = neighborhood_attention(q, k, v, kernel_size=3, causal=True, mask=mask)
    assert torch.isfinite(out).all()
    assert (out[0, :, :6] == 0).all() and (out[0, :, 6:] != 0).any()


@pytest.mark.parametrize("shape, kwargs", CASES[1:4] + CASES[5:7] + CASES[8:])
def test_flex_eager_equals_reference(shape, kwargs):
    q, k, v = (t.detach() for t in make(shape, torch.float32))
    mask = key_mask(shape)
    ref = neighborhood_attention(q, k, v, **kwargs, mask=mask, backend="reference")
    out = neighborhood_attention(q, k, v, **kwargs, mask=mask, backend="flex")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_tiled_memory_grows_with_l_times_k_not_l_squared():
    length, kernel = 4096, 33
    q, k, v = (torch.randn(1, 2, length, 16, requires_grad=True) for _ in range(3))
    with MaxNumel() as probe:
        neighborhood_attention(q, k, v, kernel_size=kernel).sum().backward()
    assert probe.largest < 8 * length * kernel  # a few (L, W) score tiles, W ~ block + K
    assert probe.largest < length * length // 8


def test_bad_arguments_raise_clear_errors():
    q, k, v = make((9, 11), torch.float32)
    with pytest.raises(ValueError, match="stride"):
        neighborhood_attention(q, k, v, kernel_size=3, stride=4)
    with pytest.raises(ValueError, match="3 entries for 2 spatial axes"):
        neighborhood_attention(q, k, v, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="positive ints"):
        neighborhood_attention(q, k, v, kernel_size=0)
    with pytest.raises(ValueError, match="key padding"):
        neighborhood_attention(q, k, v, kernel_size=3, mask=torch.ones(2, 9, 10).bool())
    with pytest.raises(ValueError, match="spatial shape"):
        neighborhood_attention(q, k[:, :, :5], v[:, :, :5], kernel_size=3)
    with pytest.raises(ValueError, match="backward on CPU"):
        neighborhood_attention(q, k, v, kernel_size=3, backend="flex")
    with pytest.raises(ValueError, match="unknown backend"):
        neighborhood_attention(q, k, v, kernel_size=3, backend="natten")
