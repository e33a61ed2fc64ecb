"""dma against the official Dynamic Mask Attention (SmallDoges/flash-dmattn @ f024c28):
examples/modeling/modeling_doge.py ``DogeAttention`` (projections, q/k RMSNorm, RoPE, the
key bias from the values) with the attention core of the repository's Python reference,
``dynamic_mask_attention_python`` in benchmarks/forward_equivalence.py, and its mask,
``create_mask(type="topk")`` in flash_sparse_attn/utils/mask.py.

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and ``dt_proj`` (biases only
with ``attention_bias``), ``A`` (one per kv head), ``q_norm``/``k_norm`` (RMSNorm per head, eps
1e-6, with a weight); Hugging Face's default RoPE (half-split pairs, base 10000, float32
angles); the bias A * softplus(dt_proj(values of all kv heads)) per kv head and key; each
query keeps the ``window_size`` largest biases among the keys its mask allows (a kept slot
that holds the masked value is dropped), scores c q.k + bias, softmax over the kept keys.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab as al

from .common import Official, compare_with_official, hf_rotate, leaf, linear
from .common import rms as rms_norm

OFFICIAL = Official(
    mechanism="dma",
    code="SmallDoges/flash-dmattn @ f024c28, examples/modeling/modeling_doge.py, DogeAttention "
         "(core: dynamic_mask_attention_python)",
    differences=(
        "q/k RMSNorm and RoPE are options (qk_norm=True, rope=True), not defaults: Doge's "
        "backbone choices",
        "ties in the top-w choice go to the most recent key (official: torch.topk's order)",
        "the kernel's block smoothing (block_size, off by default there) is not implemented",
        "norm and bias in the input's dtype (official RMSNorm in float32)",
    ),
)

B, N, DIM, HEADS, HD = 2, 9, 24, 4, 6
EPS = 1e-6


def official_params(kv_heads, bias, gen):
    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5

    def vec(n):
        return torch.randn(n, generator=gen, dtype=torch.float64) * 0.3

    p = {"q_proj.weight": w(HEADS * HD, DIM), "k_proj.weight": w(kv_heads * HD, DIM),
         "v_proj.weight": w(kv_heads * HD, DIM), "o_proj.weight": w(DIM, HEADS * HD),
         "dt_proj.weight": w(kv_heads, kv_heads * HD),
         "A": 1.5 * torch.randn(kv_heads, generator=gen, dtype=torch.float64),
         "q_norm.weight": 1 + vec(HD), "k_norm.weight": 1 + vec(HD)}
    if bias:
        p.update({"q_proj.bias": vec(HEADS * HD), "k_proj.bias": vec(kv_heads * HD),
                  "v_proj.bias": vec(kv_heads * HD), "o_proj.bias": vec(DIM),
                  "dt_proj.bias": vec(kv_heads)})
    return {k: leaf(v) for k, v in p.items()}


def rms(t, weight):
    return rms_norm(t, weight, EPS)



def official_forward(p, x, kv_heads, window, causal):
    b, n, _ = x.shape
    group = HEADS // kv_heads
    q = rms(linear(p, "q_proj", x).reshape(b, n, HEADS, HD), p["q_norm.weight"]).transpose(1, 2)
    k = rms(linear(p, "k_proj", x).reshape(b, n, kv_heads, HD),
            p["k_norm.weight"]).transpose(1, 2)
    v = linear(p, "v_proj", x).reshape(b, n, kv_heads, HD).transpose(1, 2)
    q, k = hf_rotate(q), hf_rotate(k)
    dt = linear(p, "dt_proj", v.transpose(1, 2).reshape(b, n, kv_heads * HD))  # (B, N, kv)
    bias = (p["A"] * F.softplus(dt)).transpose(1, 2).unsqueeze(-2)  # (B, kv, 1, N)

    lowest = torch.finfo(x.dtype).min
    allowed = torch.ones(n, n, dtype=torch.bool).tril() if causal else \
        torch.ones(n, n, dtype=torch.bool)
    if window < n:  # the official masks only when the keys outnumber the window
        ranked = bias.detach().expand(b, kv_heads, n, n).masked_fill(~allowed, lowest)
        top = ranked.topk(window, dim=-1)
        keep = torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, top.indices,
                                                                  top.values != lowest)
    else:
        keep = allowed.expand(b, kv_heads, n, n)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    bias, keep = bias.repeat_interleave(group, 1), keep.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * HD ** -0.5 + bias
    o = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
    return linear(p, "o_proj", o.transpose(1, 2).reshape(b, n, HEADS * HD))


NAMES = {"qkv.q.weight": "q_proj.weight", "qkv.k.weight": "k_proj.weight",
         "qkv.v.weight": "v_proj.weight", "o_proj.weight": "o_proj.weight",
         "qkv.q.bias": "q_proj.bias", "qkv.k.bias": "k_proj.bias", "qkv.v.bias": "v_proj.bias",
         "o_proj.bias": "o_proj.bias", "delta_proj.weight": "dt_proj.weight",
         "delta_proj.bias": "dt_proj.bias", "A": "A", "qk_norm.q.weight": "q_norm.weight",
         "qk_norm.k.weight": "k_norm.weight"}


@pytest.mark.parametrize("kv_heads,window,causal,bias", [
    (2, 3, True, False), (4, 5, True, True), (1, 16, True, False), (2, 4, False, False)])
def test_dma_equals_the_official_module(kv_heads, window, causal, bias):
    gen = torch.Generator().manual_seed(30 + window)
    p = official_params(kv_heads, bias, gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)

    xo = leaf(x)
    y_off = official_forward(p, xo, kv_heads, window, causal)
    (y_off * weight).sum().backward()

    # Doge's attention: q/k RMSNorm and RoPE always on
    attn = al.build("dma", dim=DIM, heads=HEADS, kv_heads=kv_heads, head_dim=HD, causal=causal,
                    window=window, bias=bias, qk_norm=True, rope=True).double().train()
    compare_with_official(attn, p, NAMES, x, weight, y_off, xo)


def test_dma_defaults_are_the_official_ones():
    attn = al.build("dma", dim=16, heads=4)
    assert attn.window == 2048 and attn.delta_proj.bias is None
    assert al.build("dma", dim=16, heads=4, bias=True).delta_proj.bias is not None
    assert al.build("dma", dim=16, heads=4, delta_bias=True).delta_proj.bias is not None
