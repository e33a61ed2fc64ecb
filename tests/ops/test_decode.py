"""decode_attention: split-KV decoding equals softmax attention for any split."""

import pytest
import torch

from attnlab.ops import decode_attention, softmax_attention


@pytest.fixture(params=["own", "fused"])
def path(request, monkeypatch):
    """decode_attention's own segments (a CPU's default) or SDPA's fused kernels (an
    accelerator's default, forced here on the CPU)."""
    import attnlab.ops.decode as decode

    if request.param == "fused":
        monkeypatch.setattr(decode, "fused_kernel_device", lambda device: True)
    return request.param


def cache(t, lq=1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, lq, 16, generator=g, dtype=dtype)
    k = torch.randn(2, 2, t, 16, generator=g, dtype=dtype) * 2
    v = torch.randn(2, 2, t, 16, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("t", [1, 7, 100, 1031])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64, 2000])
def test_any_split_gives_the_softmax_result(t, splits):
    q, k, v = cache(t)
    expected = softmax_attention(q, k, v, backend="reference")
    torch.testing.assert_close(decode_attention(q, k, v, splits=splits), expected)


@pytest.mark.parametrize("t", [1, 7, 1031])
@pytest.mark.parametrize("lq", [1, 3])
def test_the_default_split_gives_the_softmax_result(t, lq, path):
    q, k, v = cache(t, lq=lq)
    for causal in (False, True):
        expected = softmax_attention(q, k, v, causal=causal, backend="reference")
        torch.testing.assert_close(decode_attention(q, k, v, causal=causal), expected)


def test_padding_causal_and_fully_masked_segments(path):
    q, k, v = cache(50, lq=3)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[0, ..., 10:30] = False  # whole segments without a visible key
    mask[1] = False  # a row with no visible key at all
    expected = softmax_attention(q, k, v, causal=True, mask=mask, backend="reference")
    for splits in (None, 1, 5, 50):
        out = decode_attention(q, k, v, splits=splits, causal=True, mask=mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("batch, lq", [(1, 2), (2, 4), (3, 1), (2, 2)])
def test_causal_without_a_mask_for_any_batch_and_query_count(batch, lq):
    """The causal visibility is (Lq, T): it once expanded as if its first axis were the batch,
    right only when B == Lq."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, 4, lq, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, 2, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    expected = softmax_attention(q, k, v, causal=True, backend="reference")
    for splits in (1, 3):
        torch.testing.assert_close(decode_attention(q, k, v, splits=splits, causal=True),
                                   expected)


def test_float32_and_bf16_inputs_keep_their_dtype(path):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = cache(300, dtype=dtype)
        ref = softmax_attention(q.double(), k.double(), v.double(), backend="reference")
        for splits in (None, 6):
            out = decode_attention(q, k, v, splits=splits)
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_a_clean_cache_is_read_without_the_guards_pass(monkeypatch, path):
    """The clean case never runs hide_nonfinite (a pass over the cache); a non-finite key sends
    the step to the guarded path, which does."""
    import attnlab.ops.common as common

    calls = []
    real = common.hide_nonfinite
    monkeypatch.setattr(common, "hide_nonfinite", lambda k, v: calls.append(1) or real(k, v))
    q, k, v = cache(300)
    for splits in (None, 1, 3):
        decode_attention(q, k, v, splits=splits, causal=True)
    assert calls == []
    k[0, 1, 7, 2] = float("nan")
    for count, splits in enumerate((3, None), 1):
        out = decode_attention(q, k, v, splits=splits)
        assert calls == [1] * count
        assert torch.isnan(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
        assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("splits", [None, 4])
@pytest.mark.parametrize("target, value", [("k", float("-inf")), ("v", float("inf")),
                                           ("v", float("nan"))])
def test_a_visible_key_with_zero_weight_still_makes_its_rows_nan(splits, target, value, path):
    """The probe's blind spots: a key whose k is -inf scores -inf against a query positive
    there (weight exactly 0, finite output); a value behind a weight that underflowed to 0.
    Both keys are visible, so their rows must be NaN (what the guarded path gives)."""
    q, k, v = cache(64, dtype=torch.float32)
    q = q.abs() + 0.1  # positive queries: k = -inf scores -inf
    if target == "v":
        k[:, :, 5] = -50.0  # q.k_5 far below the others: exp -> 0
        weights = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4, -1)
        assert (weights[..., 5] == 0).all()  # the weight underflows indeed
    poison = k if target == "k" else v
    poison[1, 0, 5, 3] = value
    out = decode_attention(q, k, v, splits=splits)
    assert torch.isnan(out[1, :2]).all()  # kv head 0 serves query heads 0, 1
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 2:]).all()


def test_errors():
    q, k, v = cache(5)
    with pytest.raises(ValueError, match="splits must be an int >= 1"):
        decode_attention(q, k, v, splits=0)
    with pytest.raises(ValueError, match="4-D"):
        decode_attention(q[0], k, v)


@pytest.mark.parametrize("name", ["softmax", "gated", "selective"])
def test_softmax_family_decodes_long_caches_with_split_kv(name, monkeypatch):
    import attnlab as al
    import attnlab.mechanisms.softmax as softmax_module

    calls = []
    real = softmax_module.decode_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["splits"])
        return real(*args, **kwargs)

    monkeypatch.setattr(softmax_module, "decode_attention", spy)
    attn = al.build(name, dim=32, heads=4, kv_heads=2, causal=True).eval()
    attn.decode_split_min, attn.decode_segment = 8, 5  # "long" from 8 keys, 5 per segment
    x = torch.randn(2, 14, 32)
    keep = torch.ones(2, 14, dtype=torch.bool)
    keep[0, :3] = False
    full = attn(x, mask=keep)
    state = attn.new_state(batch_size=2)
    parts = [attn(x[:, :6], mask=keep[:, :6], state=state)]
    parts += [attn(x[:, t:t + 1], mask=keep[:, t:t + 1], state=state) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert calls == [2, 2, 2, 3, 3, 3, 3]  # caches of 8..14 keys: ceil(T / 5) segments


def test_no_fused_path_with_a_torch_whose_sdpa_cannot_take_gqa(monkeypatch):
    """torch < 2.5 (the lower bound is 2.4): SDPA has no ``enable_gqa``; an accelerator then
    decodes with the op's own segments instead of failing."""
    import torch.nn.functional as F

    import attnlab.ops.decode as decode

    real = F.scaled_dot_product_attention

    def old_sdpa(*args, **kwargs):
        if "enable_gqa" in kwargs:
            raise TypeError("scaled_dot_product_attention() got an unexpected keyword argument")
        return real(*args, **kwargs)

    monkeypatch.setattr(decode.F, "scaled_dot_product_attention", old_sdpa, raising=True)
    decode._sdpa_takes_gqa.cache_clear()
    try:
        assert not decode.fused_kernel_device(torch.device("meta"))
    finally:
        monkeypatch.undo()
        decode._sdpa_takes_gqa.cache_clear()
    assert decode.fused_kernel_device(torch.device("meta"))
