"""sigmoid against the official sigmoid attention module (apple/ml-sigmoid-attention @ 9273b49,
attention_simulator/src/attention_simulator/layers/attention.py ``Attention`` with
``attn_activ_fn=unnormalized_sigmoid_attention`` and ``masking_fn=softmax_masking_fn``;
``RoPEAttention`` with layers/position_embedding.py ``apply_rotary_emb``).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: one fused ``qkv`` linear (bias with ``bias=True``), per-head ``q_norm`` and
``k_norm`` = ``nn.LayerNorm(head_dim)`` (its default ``norm_layer``) when ``qk_norm``, the
optional rotation (adjacent channel pairs as complex numbers, frequencies 1 / 10000^(2i/d) in
float32), ``q * d^-1/2`` then ``q k^T``, masked logits set to -finfo.max, times
exp(attn_temp = 0), plus the fixed ``attn_bias`` b, sigmoid, times v, and ``proj``.
The official rotation multiplies in float32 (complex64) even for float64 inputs; here it runs
at the input's precision with the official float32 angles (see the differences).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="sigmoid",
    code="apple/ml-sigmoid-attention @ 9273b49, attention_simulator/src/attention_simulator/"
         "layers/attention.py, Attention (sigmoid activation)",
    differences=(
        "b is max_len-derived (-ln 1024) by default where the official takes attn_bias from "
        "its config (-ln 2048 = -7.62 in the RealNews recipe): score_bias= sets it",
        "RoPE (option) pairs channel i with i + D/2 where the official pairs 2i with 2i+1: "
        "the same function after permuting each head's q/k rows (the test maps them so)",
        "RoPE (option) rotates at the input's precision; the official rotates in float32 "
        "(complex64) even for float64 inputs",
        "dropout (default 0) acts on the output; the official attn_drop on the weights",
        "cross-attention has no always-on LayerNorm on V (the official CrossAttention's "
        "v_norm): attnlab has one module for self- and cross-attention",
    ),
)

B, N, DIM, HEADS = 2, 7, 24, 4
HD = DIM // HEADS
EPS = 1e-5  # nn.LayerNorm's default, the official q_norm / k_norm


def official_params(bias: bool, qk_norm: bool, gen: torch.Generator) -> dict[str, Tensor]:
    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * DIM ** -0.5

    p = {"qkv.weight": w(3 * DIM, DIM), "proj.weight": w(DIM, DIM)}
    if bias:
        p.update({"qkv.bias": w(3 * DIM), "proj.bias": w(DIM)})
    if qk_norm:  # away from the initial (1, 0), so that a wrong map shows
        for name in ("q_norm", "k_norm"):
            p[f"{name}.weight"] = 1 + 0.3 * torch.randn(HD, generator=gen, dtype=torch.float64)
            p[f"{name}.bias"] = 0.3 * torch.randn(HD, generator=gen, dtype=torch.float64)
    return {k: leaf(v) for k, v in p.items()}


def layer_norm(t: Tensor, p: dict[str, Tensor], name: str) -> Tensor:
    mean = t.mean(-1, keepdim=True)
    var = (t - mean).pow(2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + EPS) * p[f"{name}.weight"] + p[f"{name}.bias"]


def rotate_adjacent_pairs(t: Tensor) -> Tensor:
    """The official RoPE: channels (2i, 2i+1) as one complex number, times e^{i m theta_i},
    theta_i = 1 / 10000^(2i/d) and the angles m theta_i in float32 (precompute_freqs_cis)."""
    n, d = t.shape[-2], t.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2) / d))
    angles = torch.outer(torch.arange(n), freqs)  # float32
    cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
    a, b = t[..., 0::2], t[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def official_forward(p: dict[str, Tensor], x: Tensor, *, qk_norm: bool, rope: bool,
                     causal: bool, key_mask: Tensor | None, b: float) -> Tensor:
    bsz, n, c = x.shape
    qkv = x @ p["qkv.weight"].T
    if "qkv.bias" in p:
        qkv = qkv + p["qkv.bias"]
    q, k, v = qkv.reshape(bsz, n, 3, HEADS, HD).permute(2, 0, 3, 1, 4)
    if qk_norm:
        q, k = layer_norm(q, p, "q_norm"), layer_norm(k, p, "k_norm")
    if rope:
        q, k = rotate_adjacent_pairs(q), rotate_adjacent_pairs(k)
    logits = (q * HD ** -0.5) @ k.transpose(-2, -1)
    visible = torch.ones(n, n, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    if causal or key_mask is not None:
        logits = logits.masked_fill(~visible, -torch.finfo(logits.dtype).max)
    weights = torch.sigmoid(logits * math.exp(0.0) + b)
    y = (weights @ v).transpose(1, 2).reshape(bsz, n, c)
    y = y @ p["proj.weight"].T
    return y + p["proj.bias"] if "proj.bias" in p else y


def half_split_order(rope: bool) -> Tensor:
    """attnlab channel j of a head is official channel order[j]: with RoPE, attnlab's pair
    (i, i + D/2) is the official pair (2i, 2i+1)."""
    if not rope:
        return torch.arange(HD)
    return torch.cat([torch.arange(0, HD, 2), torch.arange(1, HD, 2)])


def weight_map(rope: bool) -> dict[str, tuple[str, Callable[[Tensor], Tensor]]]:
    """attnlab name -> (official name, the view of the official tensor it holds)."""
    order = half_split_order(rope)
    rows = (torch.arange(HEADS)[:, None] * HD + order[None, :]).reshape(-1)

    def part(i: int, permute: bool) -> Callable[[Tensor], Tensor]:
        def view(t: Tensor) -> Tensor:
            t = t.chunk(3, 0)[i]
            return t[rows] if permute else t
        return view

    names = {}
    for i, mine in enumerate("qkv"):
        names[f"qkv.{mine}.weight"] = ("qkv.weight", part(i, mine != "v"))
        names[f"qkv.{mine}.bias"] = ("qkv.bias", part(i, mine != "v"))
    names["o_proj.weight"] = ("proj.weight", lambda t: t)
    names["o_proj.bias"] = ("proj.bias", lambda t: t)
    for mine, theirs in (("q", "q_norm"), ("k", "k_norm")):
        for kind in ("weight", "bias"):
            names[f"qk_norm.{mine}.{kind}"] = (f"{theirs}.{kind}", lambda t: t[order])
    return names


CASES = {  # name: (build kwargs, causal, key padding, b)
    "bidirectional": (dict(), False, False, -math.log(1024)),
    "qk_norm": (dict(qk_norm=True, bias=True), False, False, -math.log(1024)),
    "causal_qk_norm_padding": (dict(qk_norm=True, causal=True, max_len=2048), True, True,
                               -math.log(2048)),
    "score_bias_-10": (dict(qk_norm=True, score_bias=-10.0), False, True, -10.0),
    "rope_qk_norm": (dict(qk_norm=True, rope=True, causal=True, bias=True), True, False,
                     -math.log(1024)),
    "rope": (dict(rope=True), False, True, -math.log(1024)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigmoid_equals_the_official_module(case):
    kwargs, causal, padded, b = CASES[case]
    qk_norm, rope = kwargs.get("qk_norm", False), kwargs.get("rope", False)
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    p = official_params(kwargs.get("bias", False), qk_norm, gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    key_mask = None
    if padded:
        key_mask = torch.ones(B, N, dtype=torch.bool)
        key_mask[0, -2:] = False
        weight = weight * key_mask[..., None]  # padded rows are no output of the contract

    xo = leaf(x)
    y_off = official_forward(p, xo, qk_norm=qk_norm, rope=rope, causal=causal,
                             key_mask=key_mask, b=b)
    (y_off * weight).sum().backward()

    attn = al.build("sigmoid", dim=DIM, heads=HEADS, **kwargs).double()
    names = weight_map(rope)
    own = dict(attn.named_parameters())
    assert {names[n][0] for n in own} == set(p), "every parameter mapped, both ways"
    with torch.no_grad():
        for mine, t in own.items():
            theirs, view = names[mine]
            t.copy_(view(p[theirs]))
    xa = leaf(x)
    y = attn(xa, mask=key_mask)
    (y * weight).sum().backward()

    real = torch.ones(B, N, 1, dtype=torch.float64) if key_mask is None else key_mask[..., None]
    pairs = {"out": (y * real, y_off * real), "grad x": (xa.grad, xo.grad)}
    for mine, t in own.items():
        theirs, view = names[mine]
        pairs[f"grad {mine}"] = (t.grad, view(p[theirs].grad))
    assert_parity(pairs)


def test_sigmoid_defaults_are_the_official_ones():
    attn = al.build("sigmoid", dim=DIM, heads=HEADS, qk_norm=True)
    for norm in (attn.qk_norm.q, attn.qk_norm.k):  # the official norm_layer: nn.LayerNorm
        assert type(norm) is nn.LayerNorm and norm.eps == EPS
        assert norm.normalized_shape == (HD,) and norm.elementwise_affine
        assert torch.equal(norm.weight, torch.ones(HD)) and torch.equal(norm.bias,
                                                                         torch.zeros(HD))
    assert attn.qk_norm.q is not attn.qk_norm.k
    # bias=False (the official default): no bias in q, k, v or the output projection
    assert all(not n.endswith("bias") for n, _ in attn.named_parameters()
               if not n.startswith("qk_norm"))
    # the projections keep nn.Linear's own init, as the official module's (its container's
    # trunc-normal init_weights_timm is applied by the model, to every linear layer)
    big = al.build("sigmoid", dim=256, heads=4)
    w = big.qkv.q.weight
    assert w.abs().max() <= 256 ** -0.5 and abs(w.std().item() - (3 * 256) ** -0.5) < 2e-3
    assert attn.score_bias(7) == -math.log(1024) and attn.head_bias is None
    assert isinstance(attn.out_norm, nn.Identity)  # no norm on the official output
    rms = al.build("sigmoid", dim=DIM, heads=HEADS, qk_norm=True, qk_norm_kind="rms")
    assert type(rms.qk_norm.q) is nn.RMSNorm  # the earlier sigmoid qk-norm
    plain = al.build("sigmoid", dim=DIM, heads=HEADS)
    assert isinstance(plain.qk_norm.q, nn.Identity)
