"""gated against the official Gated Attention module (qiuzh20/gated_attention @ 49645df,
modeling_qwen3.py ``Qwen3Attention``, eager path).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: ``q_proj`` holds, per key/value head, that group's query rows followed by
its gate rows (headwise: one per query head; elementwise: one per query channel), so the gate
has a bias exactly when ``q_proj`` does (``qkv_bias``); ``k_proj``, ``v_proj``, ``o_proj``;
q/k RMSNorm per head (eps 1e-6, with a weight) when ``use_qk_norm``; Hugging Face's default
RoPE (half-split pairs, base 10000, float32 angles); causal softmax with scale d^-1/2.
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf, linear
from .common import rms as rms_norm

OFFICIAL = Official(
    mechanism="gated",
    code="qiuzh20/gated_attention @ 49645df, modeling_qwen3.py, Qwen3Attention",
    differences=(
        "q/k RMSNorm and RoPE are options (qk_norm=True, rope=True), not defaults: Qwen3's "
        "backbone choices, shared by the paper's ungated baseline",
        "norms and softmax in the input's dtype (official: float32 under bfloat16)",
        "PyTorch's linear init (the official model's N(0, 0.02) is a model-level choice)",
    ),
)

B, N, DIM, HEADS, HD = 2, 7, 24, 4, 6
EPS = 1e-6


def official_params(kind, kv_heads, qkv_bias, qk_norm, gen):
    group = HEADS // kv_heads
    gate_width = group if kind == "headwise" else group * HD
    rows = kv_heads * (group * HD + gate_width)

    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * DIM ** -0.5

    p = {"q_proj.weight": w(rows, DIM), "k_proj.weight": w(kv_heads * HD, DIM),
         "v_proj.weight": w(kv_heads * HD, DIM), "o_proj.weight": w(DIM, HEADS * HD)}
    if qkv_bias:
        p.update({"q_proj.bias": w(rows), "k_proj.bias": w(kv_heads * HD),
                  "v_proj.bias": w(kv_heads * HD), "o_proj.bias": w(DIM)})
    if qk_norm:
        p["q_norm.weight"] = 1 + 0.3 * torch.randn(HD, generator=gen, dtype=torch.float64)
        p["k_norm.weight"] = 1 + 0.3 * torch.randn(HD, generator=gen, dtype=torch.float64)
    return {k: leaf(v) for k, v in p.items()}


def rms(t, weight):
    return rms_norm(t, weight, EPS)


def rope_cos_sin(n, dim, dtype):
    # Hugging Face's default rope: 1 / base^(2i/d) and the angles in float32
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    ang = torch.arange(n).float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate(t, cos, sin):
    half = t.shape[-1] // 2
    turned = torch.cat([-t[..., half:], t[..., :half]], -1)
    return t * cos + turned * sin


def official_forward(p, x, kind, kv_heads, qk_norm):
    b, n, _ = x.shape
    group = HEADS // kv_heads
    qg = linear(p, "q_proj", x).reshape(b, n, kv_heads, -1)
    q, g = qg[..., :group * HD], qg[..., group * HD:]
    gate = g.reshape(b, n, HEADS, 1 if kind == "headwise" else HD)
    q = q.reshape(b, n, HEADS, HD).transpose(1, 2)
    k = linear(p, "k_proj", x).reshape(b, n, kv_heads, HD).transpose(1, 2)
    v = linear(p, "v_proj", x).reshape(b, n, kv_heads, HD).transpose(1, 2)
    if qk_norm:
        q, k = rms(q, p["q_norm.weight"]), rms(k, p["k_norm.weight"])
    cos, sin = rope_cos_sin(n, HD, x.dtype)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k = k.repeat_interleave(group, 1)  # each kv head serves `group` consecutive query heads
    v = v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / HD ** 0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (torch.softmax(s, -1) @ v).transpose(1, 2)  # (B, N, H, HD)
    o = o * torch.sigmoid(gate)
    return linear(p, "o_proj", o.reshape(b, n, HEADS * HD))


def q_and_gate_rows(kind, kv_heads):
    """Row indices of q_proj that are attnlab's q rows and its gate rows, in attnlab order."""
    group = HEADS // kv_heads
    gw = group if kind == "headwise" else group * HD
    per = group * HD + gw
    q_rows = torch.cat([torch.arange(i * per, i * per + group * HD) for i in range(kv_heads)])
    g_rows = torch.cat([torch.arange(i * per + group * HD, (i + 1) * per)
                        for i in range(kv_heads)])
    return q_rows, g_rows


def to_attnlab(attn, p, kind, kv_heads):
    """Copy the official weights into ``attn``; attnlab name -> (official name, rows)."""
    q_rows, g_rows = q_and_gate_rows(kind, kv_heads)
    names = {"qkv.q.weight": ("q_proj.weight", q_rows), "qkv.q.bias": ("q_proj.bias", q_rows),
             "gate.proj.weight": ("q_proj.weight", g_rows),
             "gate.proj.bias": ("q_proj.bias", g_rows),
             "qkv.k.weight": ("k_proj.weight", None), "qkv.k.bias": ("k_proj.bias", None),
             "qkv.v.weight": ("v_proj.weight", None), "qkv.v.bias": ("v_proj.bias", None),
             "o_proj.weight": ("o_proj.weight", None), "o_proj.bias": ("o_proj.bias", None),
             "qk_norm.q.weight": ("q_norm.weight", None),
             "qk_norm.k.weight": ("k_norm.weight", None)}
    own = dict(attn.named_parameters())
    mapped = {}
    with torch.no_grad():
        for mine, (theirs, rows) in names.items():
            if theirs not in p or mine not in own:
                continue
            own[mine].copy_(p[theirs] if rows is None else p[theirs][rows])
            mapped[mine] = (theirs, rows)
    return mapped


@pytest.mark.parametrize("kind,kv_heads,qkv_bias,qk_norm", [
    ("elementwise", 2, False, True), ("headwise", 4, False, True),
    ("headwise", 1, True, False), ("elementwise", 4, True, True)])
def test_gated_equals_the_official_module(kind, kv_heads, qkv_bias, qk_norm):
    gen = torch.Generator().manual_seed(20 + kv_heads)
    p = official_params(kind, kv_heads, qkv_bias, qk_norm, gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)

    xo = leaf(x)
    y_off = official_forward(p, xo, kind, kv_heads, qk_norm)
    (y_off * weight).sum().backward()

    # the official module: causal, RoPE always on, q/k norm per config (default on)
    attn = al.build("gated", dim=DIM, heads=HEADS, kv_heads=kv_heads, head_dim=HD,
                    causal=True, gate=kind, bias=qkv_bias, qk_norm=qk_norm,
                    rope=True).double()
    mapped = to_attnlab(attn, p, kind, kv_heads)
    assert set(mapped) == {n for n, _ in attn.named_parameters()}, "every parameter mapped"
    xa = leaf(x)
    y = attn(xa)
    (y * weight).sum().backward()

    pairs = {"out": (y, y_off), "grad x": (xa.grad, xo.grad)}
    own = dict(attn.named_parameters())
    for mine, (theirs, rows) in mapped.items():
        g = p[theirs].grad if rows is None else p[theirs].grad[rows]
        pairs[f"grad {mine}"] = (own[mine].grad, g)
    assert_parity(pairs)


def test_gated_default_has_no_gate_bias_and_the_switch_restores_it():
    assert al.build("gated", dim=16, heads=4).gate.proj.bias is None
    assert al.build("gated", dim=16, heads=4, bias=True).gate.proj.bias is not None
    assert al.build("gated", dim=16, heads=4, gate_bias=True).gate.proj.bias is not None
