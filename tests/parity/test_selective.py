"""selective against the official Selective Attention code (umich-sota/selective_attention
@ 4ea6520, lit_gpt/gpt_2_PTS.py ``CausalSelfAttention`` with its ``scaled_dot_product_attention``,
the GPT-2 model its pretraining and fine-tuning scripts full_gpt2_PTS.py / full_gpt2_FT_PTS.py
train).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: one fused ``c_attn`` (q, k, v, with bias as GPT-2's default config), ``c_proj``
(with bias), one scalar ``beta`` per layer (initialised at 1.5); the scaled logits of query row
i (1-based) are multiplied by 1 + exp(-exp(beta)) ln(i), then the causal mask and softmax.
The released code has this position temperature only (no token or value temperature).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="selective",
    code="umich-sota/selective_attention @ 4ea6520, lit_gpt/gpt_2_PTS.py, CausalSelfAttention",
    differences=(
        "the paper's token temperature tanh(f(x)) is on by default (the released code has the "
        "position term only); f starts at 0, so at init it computes the official function",
        "ln(i) in the input's dtype (official: a float32 buffer)",
    ),
)

B, N, DIM, HEADS = 2, 9, 24, 4


def official_params(beta, gen):
    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5
    p = {"c_attn.weight": w(3 * DIM, DIM), "c_attn.bias": w(3 * DIM),
         "c_proj.weight": w(DIM, DIM), "c_proj.bias": w(DIM),
         "beta": torch.tensor(beta, dtype=torch.float64)}
    return {k: leaf(v) for k, v in p.items()}


def official_forward(p, x):
    b, n, c = x.shape
    hd = c // HEADS
    q, k, v = (x @ p["c_attn.weight"].T + p["c_attn.bias"]).split(c, dim=2)
    q, k, v = (t.reshape(b, n, HEADS, hd).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
    rows = torch.arange(1, n + 1, dtype=x.dtype)[:, None]  # the query's 1-based position
    att = att * (1 + torch.exp(-torch.exp(p["beta"])) * torch.log(rows))
    att = att.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    y = (torch.softmax(att, -1) @ v).transpose(1, 2).reshape(b, n, c)
    return y @ p["c_proj.weight"].T + p["c_proj.bias"]


def load(attn, p):
    """Copy the official weights; attnlab name -> (official name, part of c_attn or None)."""
    names = {"qkv.q.weight": ("c_attn.weight", 0), "qkv.k.weight": ("c_attn.weight", 1),
             "qkv.v.weight": ("c_attn.weight", 2), "qkv.q.bias": ("c_attn.bias", 0),
             "qkv.k.bias": ("c_attn.bias", 1), "qkv.v.bias": ("c_attn.bias", 2),
             "o_proj.weight": ("c_proj.weight", None), "o_proj.bias": ("c_proj.bias", None),
             "query_temperature.beta": ("beta", None)}
    own = dict(attn.named_parameters())
    with torch.no_grad():
        for mine, (theirs, part) in names.items():
            src = p[theirs] if part is None else p[theirs].chunk(3, 0)[part]
            own[mine].copy_(src.expand_as(own[mine]))
    return names


@pytest.mark.parametrize("beta,token,per_head", [
    (1.5, False, False), (-0.8, False, False), (-0.8, False, True), (1.5, True, False)])
def test_selective_equals_the_official_module(beta, token, per_head):
    """token=True: the default module at initialisation (its token temperature starts at 0);
    per_head: one beta per head, all equal (their gradients sum to the official one)."""
    gen = torch.Generator().manual_seed(40 + int(10 * beta))
    p = official_params(beta, gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)

    xo = leaf(x)
    y_off = official_forward(p, xo)
    (y_off * weight).sum().backward()

    attn = al.build("selective", dim=DIM, heads=HEADS, causal=True, bias=True,
                    token_temperature=token, beta_per_head=per_head).double()
    names = load(attn, p)
    own = dict(attn.named_parameters())
    extra = set(own) - set(names)
    assert extra == ({"query_temperature.token.weight", "query_temperature.token.bias"}
                     if token else set()), "every other parameter mapped"
    xa = leaf(x)
    y = attn(xa)
    (y * weight).sum().backward()

    pairs = {"out": (y, y_off), "grad x": (xa.grad, xo.grad)}
    for mine, (theirs, part) in names.items():
        g = p[theirs].grad if part is None else p[theirs].grad.chunk(3, 0)[part]
        got = own[mine].grad.sum(0, keepdim=True).reshape(g.shape) if mine.endswith("beta") \
            else own[mine].grad
        pairs[f"grad {mine}"] = (got, g)
    assert_parity(pairs)
