"""The Triton neighborhood attention kernels (``attnlab.ops.triton.neighborhood``) against
the op's float64 reference (``neighborhood_attention(backend="reference")``), forward and
input gradients, under Triton's interpreter on a machine without CUDA (conftest), on CUDA
tensors where there is a GPU; and the tile ranges the kernels visit against the true
visibility of the window rule.

Shapes stay small (the interpreter runs a few programs per second, with 16-position tiles
in 1-D and 4 x 4 in 2-D, so these lengths cross several tiles and both borders); 3-D, the
larger head dims and lengths are marked ``slow``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from attnlab.ops.neighborhood import AxisRule, _rules, neighborhood_attention
from attnlab.ops.triton.neighborhood import (
    neighborhood_attention_triton,
    tile_ranges,
    triton_limits,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# on a GPU, float32 tl.dot defaults to tf32: compare in full float32 (read at compile time)
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def roundings(dtype: torch.dtype, head_dim: int, keys: int) -> int:
    """Terms summed along the longest path of a result, the factor of eps in the tolerance.

    float32: a score sums ``head_dim`` products, a row's softmax and P V sum over its
    ``keys`` visible keys, and dQ / dK / dV sum again over ``keys`` (or the queries that see
    a key, as many) and ``head_dim`` (dP = dO V^T): about head_dim + keys roundings, each of
    at most eps times the terms' magnitude (tests/tolerances.py). float16: the inputs are the
    same fp16 numbers on both sides, the kernel's extra roundings are P and dS to fp16
    before their products and the result to fp16, each half an ulp of its terms: a handful
    (4) of fp16 eps of the magnitude (the float32 sums are ~1e4 times finer)."""
    return head_dim + keys if dtype == torch.float32 else 4


def window_keys(rules: list[AxisRule]) -> int:
    return math.prod(min(r.kernel, r.length) for r in rules)


def inputs(b, h, hkv, spatial, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, *spatial, d, generator=g)
    k = torch.randn(b, hkv, *spatial, d, generator=g)
    v = torch.randn(b, hkv, *spatial, dv, generator=g)
    grad_out = torch.randn(b, h, *spatial, dv, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [grad_out.to(DEVICE)]


def key_padding(b, spatial, seed=1):
    """(B, *spatial) bool: a quarter of the keys padding at random; batch 0 also loses its
    first half (flat order), so that its first causal rows see no key at all."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(spatial)
    keep = torch.rand(b, n, generator=g) > 0.25
    keep[0, : n // 2] = False
    return keep.reshape(b, *spatial).to(DEVICE)


def run(fn, q, k, v, grad_out):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad((out.double() * grad_out.double()).sum(), leaves)
    return (out, *grads)


def check(spatial, kernel, dilation=1, stride=1, causal=False, border="shift", heads=(2, 1),
          d=16, dv=None, padded=False, dtype=torch.float32, block=None, b=1):
    """The kernels against the float64 reference on copies of the same inputs."""
    dv = d if dv is None else dv
    rules = _rules(tuple(spatial), kernel, dilation, stride, causal, border)
    q, k, v, grad_out = inputs(b, heads[0], heads[1], spatial, d, dv, dtype)
    mask = padded if isinstance(padded, torch.Tensor) else (
        key_padding(b, spatial) if padded else None)
    scale = d ** -0.5
    assert triton_limits(q, v, rules, mask, block) is None
    # backend="triton" through the op (its checks, dispatch, limits and GQA path)
    got = run(lambda q, k, v: neighborhood_attention(
        q, k, v, kernel_size=kernel, dilation=dilation, stride=stride, causal=causal,
        border=border, mask=mask, scale=scale, backend="triton", block=block),
        q, k, v, grad_out)
    ref = run(lambda q, k, v: neighborhood_attention(
        q, k, v, kernel_size=kernel, dilation=dilation, stride=stride, causal=causal,
        border=border, mask=mask, scale=scale, backend="reference"),
        *(t.double() for t in (q, k, v)), grad_out)
    tol = roundings(dtype, d, window_keys(rules)) * torch.finfo(dtype).eps
    assert got[0].dtype == dtype and got[0].shape == ref[0].shape
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert (a != 0).any(), f"{name} is all zero"
        scale_r = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * scale_r,
                                   msg=lambda m, name=name: f"{name} ({dtype}): {m}")
    return got


# ------------------------------------------------------------------------------ tile ranges
def _true_pairs(rule: AxisRule) -> torch.Tensor:
    return rule.visibility()  # (L, L): query i sees key j on this axis


RANGE_RULES = [  # (length, kernel, dilation, stride, causal, clip): borders, dilation, stride
    (37, 5, 1, 1, False, False), (37, 7, 2, 2, False, False), (37, 7, 2, 2, True, False),
    (40, 9, 3, 3, False, False), (37, 5, 2, 1, False, True), (11, 7, 2, 1, False, False),
    (50, 16, 1, 16, False, False), (50, 13, 1, 4, True, False), (3, 5, 1, 1, False, False),
]


@pytest.mark.parametrize("bq, bk", [(16, 16), (4, 8)])
@pytest.mark.parametrize("spec", RANGE_RULES, ids=lambda s: "-".join(map(str, s)))
def test_tile_ranges_cover_exactly_the_visible_pairs(spec, bq, bk):
    """Per dilation group: each query tile's key-tile range covers every key its queries
    see, and its first and last tiles hold a seen key (so no tile is visited for nothing at
    the ends); the inverse range (dK/dV) likewise for the queries that see a key tile."""
    length, kernel, dilation, stride, causal, clip = spec
    rule = AxisRule(length, kernel, dilation, stride, causal, clip)
    keys, queries = tile_ranges(rule, bq, bk, DEVICE)
    vis = _true_pairs(rule)
    for g in range(dilation):
        sub = vis[g::dilation, g::dilation]  # group coordinates: (Lg, Lg)
        glen = sub.shape[0]
        for t in range(keys.shape[1]):
            lo, hi = keys[g, t].tolist()
            rows = sub[t * bq:(t + 1) * bq]
            seen = rows.any(0).nonzero().flatten()
            if len(seen) == 0:
                assert lo >= hi, (g, t)  # a tile past the group's end visits nothing
                continue
            assert lo == seen.min().item() // bk and hi == seen.max().item() // bk + 1, (g, t)
        for u in range(queries.shape[1]):
            lo, hi = queries[g, u].tolist()
            cols = sub[:, u * bk:(u + 1) * bk] if u * bk < glen else sub[:, :0]
            seers = cols.any(1).nonzero().flatten()
            if len(seers) == 0:
                assert lo >= hi, (g, u)
                continue
            assert lo == seers.min().item() // bq and hi == seers.max().item() // bq + 1, (g, u)


@pytest.mark.parametrize("kernel, stride, causal", [(7, 1, False), (9, 3, True), (33, 1, False)])
def test_visited_tiles_grow_with_the_kernel_not_the_length(kernel, stride, causal):
    """At most (B + K + S - 3) // B + 2 key tiles per query tile on an axis (the union of B
    consecutive windows spans at most B + K + S - 2 keys), and as many query tiles per key
    tile, the same at L = 64 and L = 256: the tile pairs visited grow with L K / B^2, not with
    (L / B)^2."""
    block = 16
    bound = (block + kernel + stride - 3) // block + 2
    widest = []
    for length in (64, 256):
        rule = AxisRule(length, kernel, 1, stride, causal)
        keys, queries = tile_ranges(rule, block, block, DEVICE)
        per_tile = (keys[..., 1] - keys[..., 0]).clamp(min=0)
        per_key_tile = (queries[..., 1] - queries[..., 0]).clamp(min=0)
        assert per_tile.max().item() <= bound and per_key_tile.max().item() <= bound
        assert per_tile.sum().item() <= bound * -(-length // block)
        widest.append(per_tile.max().item())
    assert widest[0] == widest[1]


# ------------------------------------------------------------------- against the reference
CASES_1D = [  # (length, kernel, dilation, stride, causal, border, padded)
    (37, 5, 1, 1, False, "shift", False),
    (37, 7, 2, 2, True, "shift", True),
    (37, 7, 1, 2, False, "shift", True),
    (37, 5, 2, 1, False, "clip", False),
    (37, 5, 1, 1, True, "shift", False),
]


@pytest.mark.parametrize("case", CASES_1D, ids=lambda c: "-".join(map(str, c)))
def test_1d_forward_and_backward_match_the_float64_reference_fp32(case):
    length, kernel, dilation, stride, causal, border, padded = case
    check((length,), kernel, dilation, stride, causal, border, padded=padded)


@pytest.mark.parametrize("length, kernel, causal", [(100, 61, False), (70, 33, True)])
def test_1d_wide_kernel_with_unmasked_interior_tiles(length, kernel, causal):
    """K >= 2 x 16 - 1: some key tiles are seen whole by every query of a tile, and the
    kernels skip the per-element test there. K = 61 puts the ends of the keys every query
    of a tile sees ([a - 15, a + 31) for the tile [a, a + 16)) one key off the tile grid,
    where an off-by-one in the whole-tile test would show; key 40 is padding, inside a tile
    that is geometrically whole for the query tile [16, 32), so that tile must take the
    per-element test, as must the one of the padded last keys."""
    keep = torch.ones(1, length, dtype=torch.bool, device=DEVICE)
    keep[:, 40] = False
    keep[:, -3:] = False
    check((length,), kernel, causal=causal, padded=keep, heads=(1, 1) if kernel > 40 else (2, 1))


def test_1d_rows_that_see_no_key_give_zero():
    """Batch 0's first half is padding: its first causal rows see nothing -> 0, no NaN."""
    out = check((37,), 5, causal=True, padded=True, b=2)[0]
    assert (out[0, :, :18] == 0).all() and (out[1] != 0).any()


def test_1d_gqa_three_heads_per_kv_head_and_head_dim_48():
    check((37,), 7, 2, 1, False, heads=(3, 1), d=48, dv=32, padded=True)


def test_2d_forward_and_backward_match_the_float64_reference_fp32():
    """A 7 x 13 image, kernel 3 x 5, dilation (1, 2) (column groups of 7 and 6 positions,
    longer than the kernel: both axes have borders), causal along the rows, key padding."""
    check((7, 13), (3, 5), (1, 2), 1, (True, False), padded=True)


def test_2d_stride_and_a_short_axis():
    """Stride (2, 1) and an axis shorter than its kernel (attended in full), GQA 2:1."""
    check((6, 3), (4, 5), 1, (2, 1), False, heads=(4, 2))


def test_float16_within_per_dtype_tolerance():
    check((37,), 7, 2, 1, True, padded=True, dtype=torch.float16)


def test_block_picks_the_tiles():
    check((37,), 7, 1, 1, False, block=32)


def test_compiles_in_one_graph_and_equals_eager():
    rules = _rules((21,), 5, 1, 1, False)
    q, k, v, grad_out = inputs(1, 2, 1, (21,), 16, 16)

    def f(q, k, v):
        return neighborhood_attention_triton(q, k, v, rules, None, 0.25)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = run(compiled, q, k, v, grad_out)
    want = run(f, q, k, v, grad_out)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


def test_exports_as_the_custom_op():
    rules = _rules((5, 6), 3, 1, 1, False)
    q, k, v, _ = inputs(1, 2, 1, (5, 6), 16, 16)
    mask = key_padding(1, (5, 6))

    class Module(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return neighborhood_attention_triton(q, k, v, rules, mask, 0.25)

    exported = torch.export.export(Module(), (q, k, v, mask))
    targets = [str(n.target) for n in exported.graph.nodes]
    assert "attnlab.neighborhood_triton_fwd.default" in targets
    torch.testing.assert_close(exported.module()(q, k, v, mask), Module()(q, k, v, mask),
                               rtol=0, atol=0)


@pytest.mark.parametrize("what, reason", [
    ("float64", "float16, bfloat16 or float32"),
    ("head dim", "head dims 1..128"),
    ("block", "powers of two"),
    ("block product", "product must be 16 to 256"),
])
def test_what_the_kernel_refuses_is_explained(what, reason):
    dtype = torch.float64 if what == "float64" else torch.float32
    q, k, v, _ = inputs(1, 1, 1, (9,), 160 if what == "head dim" else 8, 8, dtype)
    rules = _rules((9,), 3, 1, 1, False)
    block = {"block": 24, "block product": 8}.get(what)
    why = triton_limits(q, v, rules, None, block)
    assert why is not None and reason in why
    if what.startswith("block"):
        with pytest.raises(ValueError, match=reason):
            neighborhood_attention_triton(q, k, v, rules, None, 1.0, block)


def test_a_mismatched_shape_is_refused():
    q, k, v, _ = inputs(1, 1, 1, (9,), 8, 8)
    with pytest.raises(ValueError, match="spatial shape"):
        neighborhood_attention_triton(q, k, v, _rules((10,), 3, 1, 1, False), None, 1.0)


# ------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_3d_dilation_stride_causal_and_padding():
    check((5, 6, 7), 3, (1, 2, 1), (1, 1, 2), (False, False, True), padded=True)


@pytest.mark.slow
@pytest.mark.parametrize("d, dv", [(64, 64), (80, 96)])
def test_larger_head_dims(d, dv):
    check((37,), 5, 1, 1, True, d=d, dv=dv, padded=True)


@pytest.mark.slow
def test_2d_float16_gqa_and_clip():
    check((7, 9), (3, 5), (2, 1), 1, False, "clip", heads=(4, 2), padded=True,
          dtype=torch.float16)


@pytest.mark.slow
def test_longer_1d_many_tiles():
    check((131,), 9, 2, 3, False, padded=True, b=2)


def test_the_op_runs_the_kernel_when_triton_is_named_and_auto_only_on_cuda(monkeypatch):
    """backend="triton" reaches the kernel (a wiring that fell through to another backend
    would still agree with the reference in every test above); auto takes it on CUDA only."""
    import attnlab.ops.triton.neighborhood as kernels
    from attnlab.ops.dispatch import explain
    from attnlab.ops.neighborhood import BACKENDS

    q, k, v, _ = inputs(1, 2, 1, (9,), 16, 16, torch.float32)
    verdicts = dict(explain("neighborhood_attention", "auto", BACKENDS, q, k, v))
    if DEVICE.type == "cuda":
        assert verdicts["triton"] == "chosen"
    else:  # the interpreter is for tests: auto never picks it for CPU tensors
        assert verdicts["triton"].startswith("skipped: auto uses the triton kernels on CUDA")

    def refuse(*args, **kwargs):
        raise RuntimeError("kernel called")

    monkeypatch.setattr(kernels, "neighborhood_attention_triton", refuse)
    with pytest.raises(RuntimeError, match="kernel called"):
        neighborhood_attention(q, k, v, kernel_size=3, backend="triton")
