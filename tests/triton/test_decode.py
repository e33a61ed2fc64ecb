"""decode_attention(backend="triton"): the split-KV kernels (ops/triton/decode.py) against the
op's dense reference in float64 of the same inputs, under Triton's interpreter on a CPU (CUDA
when there is one). Inference only: no backward to test, and a call that needs gradients is
refused. Tolerances from the dtype (``tests/tolerances.py``): float32 within 32 eps (3.8e-6
relative: fp32 scores, an online softmax and a merge of a few dozen terms each), float16
and bfloat16 within 2 eps (the output's own rounding is eps / 2; the kernel computes in
float32)."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import decode_attention
from attnlab.ops.dispatch import recorded

from ..tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDINGS = {torch.float32: 32, torch.float16: 2, torch.bfloat16: 2}


def _cache(b, h, h_kv, lq, t, d, *, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h_kv, t, d, generator=g) * 2  # peaked softmax rows
    v = torch.randn(b, h_kv, t, dv or d, generator=g)
    return (x.to(DEVICE, dtype) for x in (q, k, v))


def _check(q, k, v, *, splits=None, **kw):
    out = decode_attention(q, k, v, splits=splits, backend="triton", **kw)
    ref = decode_attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_close(out, ref, roundings=ROUNDINGS[q.dtype])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [8, 12, 16, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_dtypes_and_causality(dtype, d, causal):
    q, k, v = _cache(2, 4, 2, 3, 33, d, dtype=dtype)  # GQA: 2 query heads per kv head
    _check(q, k, v, causal=causal, splits=3)


def test_bfloat16_loads_and_computes_in_float32():
    """bf16 inputs are only loaded and cast under the interpreter (no bf16 arithmetic), and
    the output stored in bf16: within 2 eps of the float64 reference."""
    q, k, v = _cache(2, 4, 2, 3, 33, 12, dtype=torch.bfloat16)
    _check(q, k, v, causal=True, splits=3)


@pytest.mark.parametrize("t", [1, 17, 33])
@pytest.mark.parametrize("lq", [1, 3])
def test_odd_cache_lengths_and_query_counts(t, lq):
    q, k, v = _cache(1, 2, 2, lq, t, 12, dv=8)  # no GQA; a value head dim of its own
    for causal in (False, True):
        _check(q, k, v, causal=causal)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)])
def test_gqa_query_heads_packed_per_kv_head(heads):
    h, h_kv = heads
    q, k, v = _cache(2, h, h_kv, 2, 17, 16)
    _check(q, k, v, causal=True, splits=2)


def test_more_packed_rows_than_one_row_block():
    """8 query heads x 16 queries over one kv head: 128 rows, two blocks of 64."""
    q, k, v = _cache(1, 8, 1, 16, 17, 8)
    _check(q, k, v, causal=True, splits=2)


@pytest.mark.parametrize("splits", [None, 1, 2, 5, 17, 1000])
def test_any_split_gives_the_softmax_result(splits):
    q, k, v = _cache(1, 2, 1, 2, 17, 8)
    _check(q, k, v, splits=splits)


def test_key_padding_with_empty_segments_and_a_row_without_keys():
    q, k, v = _cache(3, 4, 2, 3, 33, 16)
    keep = torch.ones(3, 1, 1, 33, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 8:24] = False  # whole segments without a visible key
    keep[1] = False  # a sequence whose rows see no key: 0
    keep[2, ..., 30:] = False  # causal + padding: the first query sees keys 0..30 only
    for causal in (False, True):
        out = _check(q, k, v, causal=causal, mask=keep, splits=4)
        assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_a_general_mask_per_head_and_query():
    q, k, v = _cache(2, 4, 2, 3, 17, 8)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 4, 3, 17, generator=g) > 0.5).to(DEVICE)
    mask[0, 1, 2] = False  # one row without a visible key
    out = _check(q, k, v, causal=True, mask=mask, splits=3)
    assert (out[0, 1, 2] == 0).all()
    _check(q, k, v, mask=mask[:1, :, :1], splits=2)  # (1, H, 1, T): broadcast by strides


def test_a_strided_cache_and_transposed_queries():
    """A preallocated cache filled to T and queries in (B, L, H, D) memory: no copies."""
    q, k, v = _cache(1, 4, 2, 3, 40, 16)
    k, v = k[:, :, :29], v[:, :, :29]
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    _check(q, k, v, causal=True, splits=3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's
def test_nonfinite_keys_stay_the_guards():
    """A key holding inf makes the rows that see it NaN, the others exact (guarded_op
    clears the key and re-runs; the kernel's score sums find it on the first pass)."""
    q, k, v = _cache(1, 2, 1, 3, 17, 8)
    k[0, 0, 16, 3] = float("inf")  # the last key: visible only to the last query, causally
    out = decode_attention(q, k, v, causal=True, backend="triton", splits=2)
    split = decode_attention(q, k, v, causal=True, backend="split", splits=2)
    assert out[..., 2, :].isnan().all() and not split[..., :2, :].isnan().any()
    assert_close(out, split, roundings=32, equal_nan=True)


def test_refuses_calls_needing_gradients_and_float64():
    q, k, v = _cache(1, 2, 1, 1, 9, 8)
    with pytest.raises(ValueError, match="backend 'triton' refused: .*inference-only"):
        decode_attention(q.detach().requires_grad_(), k, v, backend="triton")
    with torch.no_grad():  # the same call without autograd is served
        _check(q, k, v)
    with pytest.raises(ValueError, match="refused: .*float32, float16 and bfloat16"):
        decode_attention(q.double(), k.double(), v.double(), backend="triton")


def test_named_only_and_recorded():
    q, k, v = _cache(1, 2, 1, 1, 9, 8)
    with recorded() as choices:
        decode_attention(q, k, v, backend="triton")
    assert choices == [("decode_attention", [("triton", "chosen")])]


def test_default_splits_follow_the_cache_length():
    from attnlab.ops.triton.decode import default_splits

    assert default_splits(100, 1) == 1  # one segment: shorter than 256 keys
    assert default_splits(32768, 8) == 33  # 8 programs per segment: 264 programs
    assert default_splits(131072, 1) == 128  # at most 128 segments
    assert default_splits(131072, 512) == 1  # the batch and heads fill the GPU already


@pytest.mark.slow
@pytest.mark.parametrize("d", [48, 80, 96, 128])
def test_long_cache_and_model_head_dims(d):
    q, k, v = _cache(2, 8, 2, 4, 1031, d)
    keep = torch.rand(2, 1, 1, 1031, generator=torch.Generator().manual_seed(1)) > 0.1
    _check(q, k, v, causal=True, mask=keep.to(DEVICE))
    _check(q.half(), k.half(), v.half(), causal=True, splits=7)
