"""rcmha against the official RCMHA module (hermansh-id/rcmha @ 87df49b, rcmha/attention.py
``RelativeMultiHeadAttention``).

The official computation is re-expressed here in float64 from reading that code, in its own
layout and parameter names: sequence-first tensors (L, B, ...); ``query``, ``key``, ``value``
are each a linear map (``.0.linear``; only the value's has a bias) followed by a causal
depthwise Conv1d over time with one kernel per head channel shared by every head
(``.1.conv``, padding kernel - 1 on both sides, the last kernel - 1 outputs cut);
``output`` a biased linear map; ``key_pos_embeddings`` (2P, H, d), ``key_pos_bias``
(2P, H) and ``query_pos_bias`` (H, d) the learned position terms, read at the rows
P - Lk .. P + Lq - 1 and moved to their distance by the official's pad-and-reshape shift.
The causal mask is the one its model (rcmha/model.py) passes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import attnlab as al

from .common import Official, compare_with_official, leaf, linear

OFFICIAL = Official(
    mechanism="rcmha",
    code="hermansh-id/rcmha @ 87df49b, rcmha/attention.py, RelativeMultiHeadAttention",
    differences=(
        "no Transformer-XL memory (the official layer can attend to a detached memory of "
        "earlier segments; attnlab's decoding state keeps every key instead)",
        "dropout acts on the output (attnlab's common dropout) where the official drops the "
        "attention weights (its training config: 0)",
        "a key padding mask is accepted (contract; the official has none)",
        "distances beyond max_len read the table's farthest row (the official cannot run "
        "past max_len tokens: it slices outside its table)",
    ),
)

B = 2


def conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The official SpatialDepthWiseConvolution on (L, B, H, d): per channel of a head,
    shared by all heads, y_t = bias + sum_s w_s x_{t - (k - 1) + s} (zeros before t = 0)."""
    k = weight.shape[-1]
    padded = torch.cat([x.new_zeros(k - 1, *x.shape[1:]), x], 0)
    taps = [padded[s:s + x.shape[0]] * weight[:, 0, s] for s in range(k)]
    return torch.stack(taps).sum(0) + bias


def shift(x: Tensor) -> Tensor:
    """The official relative shift of (Lq, M, ...): a zero column appended on axis 1, the
    whole read as (M + 1, Lq, ...), its last row dropped, read back as (Lq, M, ...)."""
    lq, m = x.shape[:2]
    padded = torch.cat([x, x.new_zeros(lq, 1, *x.shape[2:])], 1)
    return padded.reshape(m + 1, lq, *x.shape[2:])[:-1].reshape(x.shape)


def official_forward(p: dict[str, Tensor], x: Tensor, heads: int, max_len: int) -> Tensor:
    """The official layer on x (B, L, C) (the test's batch-first layout in and out)."""
    xs = x.transpose(0, 1)  # (L, B, C)
    n, b, c = xs.shape
    d = c // heads

    def project(name: str) -> Tensor:
        y = linear(p, f"{name}.0.linear", xs).view(n, b, heads, d)
        return conv(y, p[f"{name}.1.conv.weight"], p[f"{name}.1.conv.bias"])

    q, k, v = project("query"), project("key"), project("value")
    emb = p["key_pos_embeddings"][max_len - n:max_len + n]  # (2n, H, d)
    bias = p["key_pos_bias"][max_len - n:max_len + n]  # (2n, H)
    content = torch.einsum("ibhd,jbhd->ijbh", q + p["query_pos_bias"], k)
    position = torch.einsum("ibhd,jhd->ijbh", q, emb) + bias[None, :, None, :]
    scores = (content + shift(position)[:, -n:]) / math.sqrt(d)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[:, :, None, None]
    attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=1)
    out = torch.einsum("ijbh,jbhd->ibhd", attn, v).reshape(n, b, c)
    return linear(p, "output", out).transpose(0, 1)


def official_params(dim: int, heads: int, max_len: int, kernel: int,
                    gen: torch.Generator) -> dict[str, Tensor]:
    d = dim // heads

    def w(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5

    p = {"query.0.linear.weight": w(dim, dim), "key.0.linear.weight": w(dim, dim),
         "value.0.linear.weight": w(dim, dim), "value.0.linear.bias": w(dim),
         "output.weight": w(dim, dim), "output.bias": w(dim),
         "key_pos_embeddings": w(2 * max_len, heads, d), "key_pos_bias": w(2 * max_len, heads),
         "query_pos_bias": w(heads, d)}
    for name in ("query", "key", "value"):
        p[f"{name}.1.conv.weight"] = w(d, 1, kernel)
        p[f"{name}.1.conv.bias"] = w(d)
    return {name: leaf(t) for name, t in p.items()}


NAMES = {"u": "query_pos_bias", "rel_emb": "key_pos_embeddings", "rel_bias": "key_pos_bias",
         "qkv.q.weight": "query.0.linear.weight", "qkv.k.weight": "key.0.linear.weight",
         "qkv.v.weight": "value.0.linear.weight", "qkv.v.bias": "value.0.linear.bias",
         "o_proj.weight": "output.weight", "o_proj.bias": "output.bias",
         **{f"qkv.conv_{a}.conv.{t}": f"{name}.1.conv.{t}"
            for a, name in (("q", "query"), ("k", "key"), ("v", "value"))
            for t in ("weight", "bias")}}


@pytest.mark.parametrize("n,heads,dim,max_len,kernel", [
    (9, 4, 24, 4096, 3),  # the official table size
    (12, 2, 16, 12, 3),   # a sequence as long as the table reaches
    (7, 3, 18, 10, 3),
    (8, 2, 16, 16, 5),    # another kernel
])
def test_rcmha_equals_the_official_module(n, heads, dim, max_len, kernel):
    gen = torch.Generator().manual_seed(7 * n + heads + max_len % 97)
    p = official_params(dim, heads, max_len, kernel, gen)
    x = torch.randn(B, n, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, n, dim, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_forward(p, xo, heads, max_len)
    (y_off * weight).sum().backward()
    attn = al.build("rcmha", dim=dim, heads=heads, causal=True, max_len=max_len,
                    kernel=kernel).double()
    compare_with_official(attn, p, NAMES, x, weight, y_off, xo)


def test_the_defaults_are_the_official_ones():
    """P = 4096, kernel 3, tables and u at 0, biases where the official has them (v, the
    convolutions, the output), PyTorch's default init of the linear maps and convolutions
    (uniform within 1/sqrt(fan in)) as the official modules."""
    dim, heads = 64, 4
    attn = al.build("rcmha", dim=dim, heads=heads)
    d = dim // heads
    shapes = {n: tuple(t.shape) for n, t in attn.named_parameters()}
    assert shapes == {"u": (heads, d), "rel_emb": (8192, heads, d), "rel_bias": (8192, heads),
                      "qkv.q.weight": (dim, dim), "qkv.k.weight": (dim, dim),
                      "qkv.v.weight": (dim, dim), "qkv.v.bias": (dim,),
                      "o_proj.weight": (dim, dim), "o_proj.bias": (dim,),
                      **{f"qkv.conv_{a}.conv.{t}": (d, 1, 3) if t == "weight" else (d,)
                         for a in "qkv" for t in ("weight", "bias")}}
    for name in ("u", "rel_emb", "rel_bias"):
        assert (getattr(attn, name) == 0).all()
    params = dict(attn.named_parameters())
    for name, fan_in in (("qkv.q.weight", dim), ("o_proj.bias", dim),
                         ("qkv.conv_k.conv.weight", 3), ("qkv.conv_v.conv.bias", 3)):
        t, bound = params[name], fan_in ** -0.5
        assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound, name
    assert al.build("rcmha", dim=dim, heads=heads, position_bias=False).position_bias is False
    assert not hasattr(al.build("rcmha", dim=dim, heads=heads, position_bias=False),
                       "rel_emb")


def test_distances_beyond_the_table_read_its_farthest_row():
    """q = 0 leaves the position bias alone in the scores: w_ij ~ exp(b[max(P - (i - j), 0)]
    / sqrt(d)) for a sequence longer than P (where the official cannot run)."""
    p_len, n, heads, dim = 4, 9, 2, 16
    attn = al.build("rcmha", dim=dim, heads=heads, max_len=p_len).double()
    with torch.no_grad():
        for t in (attn.qkv.q.weight, attn.qkv.conv_q.conv.weight, attn.qkv.conv_q.conv.bias):
            t.zero_()
        attn.rel_bias.normal_()
    w = attn.weights(torch.randn(1, n, dim, dtype=torch.float64))[0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    rows = (p_len - (i - j)).clamp(0, 2 * p_len - 1)  # (j > i: masked)
    for h in range(heads):
        s = (attn.rel_bias[rows, h] / math.sqrt(dim // heads)).masked_fill(j > i, -math.inf)
        torch.testing.assert_close(w[h], torch.softmax(s, -1), rtol=1e-12, atol=1e-14)
