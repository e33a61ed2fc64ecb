"""The one ops API: each op and its weights function take the same arguments.

``op(q, k, v, causal=, mask=, scale=)`` must equal ``op_weights(q, k, causal=, mask=,
scale=) @ v`` on the reference backend, GQA keys included; GQA weights are checked head
by head against the weights of that head alone (no repetition on either side).
"""

import math
from functools import partial

import pytest
import torch

from attnlab.ops.lla import lla_weights, local_linear_attention
from attnlab.ops.rfa import random_feature_attention, random_feature_weights
from attnlab.ops.sigmoid import sigmoid_attention, sigmoid_weights
from attnlab.ops.softmax import softmax_attention, softmax_weights
from attnlab.ops.softplus import softplus_attention, softplus_weights

PAIRS = {
    "softmax": (softmax_attention, softmax_weights),
    "sigmoid": (sigmoid_attention, sigmoid_weights),
    "lssar": (partial(softplus_attention, reweight_p=3.0), partial(softplus_weights,
                                                                   reweight_p=3.0)),
    "lla": (partial(local_linear_attention, ridge=0.5), partial(lla_weights, ridge=0.5)),
    "rfa": (partial(random_feature_attention, activation="tanh"),
            partial(random_feature_weights, activation="tanh")),
}


def _qkv(h=4, hkv=2, lq=7, lk=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, lk, d, generator=g, dtype=torch.float64)
    return q, k, v


def _padding(lk=9):
    keep = torch.ones(2, lk, dtype=torch.bool)
    keep[1, :3] = False
    return keep[:, None, None, :]


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_weights_times_values_is_the_op(name, causal, masked, scale):
    op, weights = PAIRS[name]
    q, k, v = _qkv()
    mask = _padding() if masked else None
    w = weights(q, k, causal=causal, mask=mask, scale=scale)
    out = op(q, k, v, causal=causal, mask=mask, scale=scale, backend="reference")
    groups = q.shape[1] // k.shape[1]
    for h in range(q.shape[1]):  # each query head against its own kv head, no repetition
        expected = w[:, h] @ v[:, h // groups]
        torch.testing.assert_close(out[:, h], expected)


@pytest.mark.parametrize("name", PAIRS)
def test_gqa_weights_are_each_heads_own_weights(name):
    _, weights = PAIRS[name]
    q, k, _ = _qkv(h=6, hkv=2)
    w = weights(q, k, causal=True)
    for h in range(6):
        alone = weights(q[:, h:h + 1], k[:, h // 3:h // 3 + 1], causal=True)
        torch.testing.assert_close(w[:, h:h + 1], alone)


@pytest.mark.parametrize("name", PAIRS)
def test_causal_is_the_lower_triangular_mask_aligned_to_the_last_key(name):
    _, weights = PAIRS[name]
    q, k, _ = _qkv(lq=4, lk=9)
    rows = torch.arange(4)[:, None] + 5  # query i sits at position i + (Lk - Lq)
    tril = torch.arange(9)[None, :] <= rows
    torch.testing.assert_close(weights(q, k, causal=True), weights(q, k, mask=tril))


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "lla"])
def test_default_scale_is_one_over_root_d(name):
    _, weights = PAIRS[name]
    q, k, _ = _qkv(d=16)
    torch.testing.assert_close(weights(q, k), weights(q, k, scale=0.25))
    assert not torch.allclose(weights(q, k), weights(q, k, scale=0.5))


def test_softmax_weights_match_the_formula():
    q, k, _ = _qkv(h=2, hkv=2)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.3 + 0.1
    expected = s.exp() / s.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(softmax_weights(q, k, scale=0.3, bias=0.1), expected)


def test_softplus_scale_replaces_ln_d_in_the_length_scale():
    q, k, _ = _qkv(h=1, hkv=1, lq=1, lk=9, d=16)
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).mT
    a = torch.nn.functional.softplus(1.7 * torch.log(torch.tensor(9.0)) * cos)
    torch.testing.assert_close(softplus_weights(q, k, scale=1.7), a / a.sum(-1, keepdim=True))


@pytest.mark.parametrize("name", PAIRS)
def test_bad_inputs_are_named(name):
    _, weights = PAIRS[name]
    q, k, _ = _qkv(h=4, hkv=3)
    with pytest.raises(ValueError, match="kv heads"):
        weights(q, k)
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match="mask must be a bool"):
        weights(q, k, mask=torch.ones(2, 1, 1, 9))
    with pytest.raises(ValueError, match="4-D"):
        weights(q[0], k)


def test_random_feature_weights_match_the_formula():
    q, k, _ = _qkv(h=2, hkv=2, lq=5, lk=5)
    a = torch.tanh(torch.einsum("bhid,bhjd->bhij", q, k) * 0.3).tril()
    expected = a / torch.arange(1, 6, dtype=a.dtype)[:, None]
    got = random_feature_weights(q, k, causal=True, scale=0.3, activation="tanh")
    torch.testing.assert_close(got, expected)


def test_sigmoid_weights_match_the_formula():
    q, k, _ = _qkv(h=2, hkv=2)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.3
    torch.testing.assert_close(sigmoid_weights(q, k, scale=0.3), torch.sigmoid(s - math.log(9)))


@pytest.mark.parametrize("name", ["sigmoid", "lssar", "rfa", "lla"])
def test_fast_backend_follows_an_explicit_scale(name):
    op, _ = PAIRS[name]
    q, k, v = _qkv()
    ref = op(q, k, v, causal=True, scale=0.7, backend="reference")
    out = op(q, k, v, causal=True, scale=0.7)  # auto: tiled or chunked on CPU
    torch.testing.assert_close(out, ref)
