"""``guarded_op`` reads q, k, v and the options from any valid call of an op: positional or by
keyword, with an op's extra leading parameters (key_priority's ``priority``), and rejects a
call its signature rejects. The usual call (leading parameters positional, options by
keyword) skips ``inspect.Signature.bind``; these tests hold both ways of reading a call equal.
"""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import decode_attention, sigmoid_attention
from attnlab.ops.key_priority import key_priority_attention

from ..device import DEVICE, HEAD_DIM


def qkv(lq=5, lk=9):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, n, length, HEAD_DIM, generator=g).to(DEVICE)
            for n, length in ((4, lq), (2, lk), (2, lk))]


def test_keyword_and_positional_calls_agree_and_the_options_are_read_either_way():
    q, k, v = qkv()
    mask = torch.rand(2, 1, 5, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    mask[..., 0] = True
    positional = sigmoid_attention(q, k, v, causal=True, mask=mask)
    by_keyword = sigmoid_attention(q=q, k=k, v=v, causal=True, mask=mask)
    mixed = sigmoid_attention(q, k, v=v, causal=True, mask=mask)
    torch.testing.assert_close(by_keyword, positional)
    torch.testing.assert_close(mixed, positional)
    # the options count on both paths: without them the result differs
    assert not torch.allclose(sigmoid_attention(q=q, k=k, v=v), positional)


def test_the_guard_reads_a_keyword_cache_and_still_marks_rows_that_see_a_nonfinite_key():
    q, k, v = qkv(lq=1)
    k = k.clone()
    k[0, 1, 3] = float("nan")
    out = decode_attention(q, k_cache=k, v_cache=v)
    assert torch.isnan(out[0, 2:]).all()  # query heads 2, 3 read kv head 1
    assert torch.isfinite(out[0, :2]).all() and torch.isfinite(out[1]).all()
    torch.testing.assert_close(out, decode_attention(q, k, v), equal_nan=True)


def test_an_extra_leading_parameter_is_read_by_position_or_by_keyword():
    q, k, v = qkv(lq=9)
    priority = torch.randn(2, 2, 9, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    positional = key_priority_attention(q, k, v, priority, window=4, causal=True)
    by_keyword = key_priority_attention(q, k, v, priority=priority, window=4, causal=True)
    torch.testing.assert_close(by_keyword, positional)


@pytest.mark.parametrize("call", [
    lambda q, k, v: sigmoid_attention(q, k, v, causl=True),  # misspelt option
    lambda q, k, v: sigmoid_attention(q, k, v, True),  # an option passed by position
    lambda q, k, v: sigmoid_attention(q, k, v, q=q),  # q twice
    lambda q, k, v: sigmoid_attention(q, k),  # v missing
], ids=["unknown-option", "positional-option", "q-twice", "v-missing"])
def test_a_call_the_signature_rejects_raises_type_error(call):
    q, k, v = qkv()
    with pytest.raises(TypeError):
        call(q, k, v)
