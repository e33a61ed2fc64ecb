"""cca against the official CCA module of ZAYA1 (Zyphra/transformers @ ff3f2ee, branch zaya1,
src/transformers/models/zaya/modeling_zaya.py: ``ZayaCCAProjection``, ``ZayaQKNorm`` and
``ZayaAttention`` with its partial RoPE, ``ZayaRotaryEmbedding`` for the default "hybrid"
layer: base 5e6, partial_rotary_factor 0.5).

Re-expressed here in float64 from reading that code, in its parameter layout (``q_proj``,
``k_proj``, ``v_proj_current``, ``v_proj_delayed``, ``conv_qk_depthwise``,
``conv_qk_grouped``, ``qk_norm.temp``, ``o_proj``), with a padding mask (left-padded row) and
the loss on real tokens only. The rotary angles are computed in float32 as the official does
even for a float64 model; the softmax in the input's dtype (the official's default SDPA path;
its eager path takes a float32 softmax).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="cca",
    code="Zyphra/transformers @ ff3f2ee (zaya1), src/transformers/models/zaya/modeling_zaya.py, "
         "ZayaCCAProjection + ZayaAttention",
    differences=(
        "convolution kernel sizes fixed at the official defaults 2 and 2 (no option)",
        "no sliding-window layer type (a per-layer model choice of ZAYA1)",
        "projections keep PyTorch's init; the official model re-initialises every linear "
        "N(0, 0.02) (a model-level choice)",
        "softmax in the input's dtype as the official SDPA path (its eager path upcasts)",
    ),
)

B, L, C, H, HD = 2, 9, 64, 4, 8  # compression 2: C / (H * HD)
BASE, FRACTION = 5_000_000.0, 0.5


def official_params(kv: int, bias: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def w(*shape, fan=None):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * (fan or shape[-1]) ** -0.5
    conv = (H + kv) * HD
    p = {"q_proj.weight": w(H * HD, C), "k_proj.weight": w(kv * HD, C),
         "v_proj_current.weight": w(kv * HD // 2, C), "v_proj_delayed.weight": w(kv * HD // 2, C),
         "conv_qk_depthwise.weight": w(conv, 1, 2), "conv_qk_depthwise.bias": w(conv, fan=2),
         "conv_qk_grouped.weight": w(conv, HD, 2), "conv_qk_grouped.bias": w(conv, fan=2 * HD),
         "temp": 1 + 0.3 * torch.randn(kv, generator=gen, dtype=torch.float64),
         "o_proj.weight": w(C, H * HD)}
    if bias:
        p |= {"q_proj.bias": w(H * HD, fan=C), "k_proj.bias": w(kv * HD, fan=C),
              "v_proj_current.bias": w(kv * HD // 2, fan=C),
              "v_proj_delayed.bias": w(kv * HD // 2, fan=C), "o_proj.bias": w(C, fan=C)}
    return {k: leaf(v) for k, v in p.items()}


def linear(p, name, x):
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def official_forward(p, x, keep, kv: int, rope_on: bool = True):
    b, n, _ = x.shape
    groups = H // kv
    x = x * keep[:, :, None].to(x.dtype)  # the official zeroes padded hidden states first
    q, k = linear(p, "q_proj", x), linear(p, "k_proj", x)
    # residuals: per query head the mean of it and its kv head; per kv head, its group's mean
    q_res = (q.view(b, n, H, HD) + k.view(b, n, kv, HD).repeat_interleave(groups, 2)) / 2
    k_res = q_res.view(b, n, kv, groups, HD).mean(3)
    # both convolutions over a sequence with two zeros in front, no padding inside the convs
    qk = F.pad(torch.cat([q, k], -1).transpose(1, 2), (2, 0))
    qk = F.conv1d(qk, p["conv_qk_depthwise.weight"], p["conv_qk_depthwise.bias"],
                  groups=(H + kv) * HD)
    qk = F.conv1d(qk, p["conv_qk_grouped.weight"], p["conv_qk_grouped.bias"], groups=H + kv)
    qk = qk.transpose(1, 2)
    query = qk[..., :H * HD].reshape(b, n, H, HD) + q_res
    key = qk[..., H * HD:].reshape(b, n, kv, HD) + k_res
    # values: current half, then the delayed half (the previous token's, a zero token's at 0)
    delayed = linear(p, "v_proj_delayed", x)
    first = linear(p, "v_proj_delayed", x.new_zeros(b, 1, C))
    value = torch.cat([linear(p, "v_proj_current", x),
                       torch.cat([first, delayed[:, :-1]], 1)], -1).view(b, n, kv, HD)
    # q, k to norm sqrt(HD) (norm clamped at eps), keys times the per-kv-head temperature
    eps = torch.finfo(x.dtype).eps
    query = query * (HD ** 0.5 / query.norm(dim=-1, keepdim=True).clamp_min(eps))
    key = key * (HD ** 0.5 / key.norm(dim=-1, keepdim=True).clamp_min(eps)) * \
        p["temp"][None, None, :, None]
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, heads, n, HD)
    # partial RoPE, angles in float32 as the official rotary embedding computes them
    dim = int(HD * FRACTION)
    inv = 1.0 / (BASE ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    ang = (inv[:, None] @ torch.arange(n, dtype=torch.float32)[None, :]).T
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    width = cos.shape[-1]

    def rope(t):
        r, rest = t[..., :width], t[..., width:]
        half = width // 2
        turned = torch.cat([-r[..., half:], r[..., :half]], -1)
        return torch.cat([r * cos + turned * sin, rest], -1)
    if rope_on:
        query, key = rope(query), rope(key)
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * HD ** -0.5
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(x.dtype).min)
    out = (torch.softmax(scores, -1) @ value).transpose(1, 2).reshape(b, n, H * HD)
    return linear(p, "o_proj", out)


def to_attnlab(attn, p, bias: bool) -> dict[str, tuple]:
    """Copy the official weights in; attnlab name -> how to get the official gradient."""
    spec = {"qkv.q.weight": ["q_proj.weight"], "qkv.k.weight": ["k_proj.weight"],
            "qkv.v.weight": ["v_proj_current.weight", "v_proj_delayed.weight"],
            "qkv.conv_depthwise.conv.weight": ["conv_qk_depthwise.weight"],
            "qkv.conv_depthwise.conv.bias": ["conv_qk_depthwise.bias"],
            "qkv.conv_heads.conv.weight": ["conv_qk_grouped.weight"],
            "qkv.conv_heads.conv.bias": ["conv_qk_grouped.bias"],
            "qkv.key_temperature": ["temp"], "o_proj.weight": ["o_proj.weight"]}
    if bias:
        spec |= {"qkv.q.bias": ["q_proj.bias"], "qkv.k.bias": ["k_proj.bias"],
                 "qkv.v.bias": ["v_proj_current.bias", "v_proj_delayed.bias"],
                 "o_proj.bias": ["o_proj.bias"]}
    own = dict(attn.named_parameters())
    assert set(own) == set(spec), "every parameter mapped"
    with torch.no_grad():
        for mine, theirs in spec.items():
            own[mine].copy_(torch.cat([p[t] for t in theirs]))
    return spec


@pytest.mark.parametrize("kv,bias", [(1, False), (2, True), (4, False)])
def test_cca_equals_the_official_zaya_cca(kv, bias):
    gen = torch.Generator().manual_seed(kv)
    p = official_params(kv, bias, gen)
    x = torch.randn(B, L, C, generator=gen, dtype=torch.float64)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, :3] = False  # a left-padded row
    weight = torch.randn(B, L, C, generator=gen, dtype=torch.float64) * keep[..., None]

    xo = leaf(x)
    y_off = official_forward(p, xo, keep, kv)
    (y_off * weight).sum().backward()

    attn = al.build("cca", dim=C, heads=H, kv_heads=kv, bias=bias).double()
    assert attn.head_dim == HD and attn.uses_rope
    spec = to_attnlab(attn, p, bias)
    xa = leaf(x)
    y = attn(xa, mask=keep)
    (y * weight).sum().backward()

    real = keep[..., None].expand_as(y)
    pairs = {"out": (y[real], y_off[real]), "grad x": (xa.grad, xo.grad)}
    own = dict(attn.named_parameters())
    for mine, theirs in spec.items():
        pairs[f"grad {mine}"] = (own[mine].grad, torch.cat([p[t].grad for t in theirs]))
    assert_parity(pairs)


def test_cca_key_temperature_starts_at_zero_as_the_official():
    attn = al.build("cca", dim=C, heads=H, kv_heads=2)
    assert (attn.qkv.key_temperature == 0).all()
