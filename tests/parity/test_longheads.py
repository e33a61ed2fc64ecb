"""longheads against the official LongHeads attention (LuLuLuyi/LongHeads @ 1c9f72e,
modeling_longheads/modeling_llama.py ``LlamaAttention``, its prefill path with the
sequential encoding).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout (a Llama attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, no
biases; RoPE from float32 cos/sin tables, halves rotated): the sequence is padded with zeros
to whole chunks of ``window_size``; each chunk's key is its tokens' attention inside the
chunk (q, k rotated by the offset in the chunk), averaged, then used as a query over the
chunk's keys; the first ``begin_selective_length`` (= ``atten_length``, its default) tokens
get causal attention at their own positions; a later query scores the chunks with its
un-rotated q, forces chunk 0, the previous and its own chunk, takes the top of the rest
up to ``atten_length / window_size`` chunks, and attends to their keys laid side by side,
re-indexed from 0. ``own_key``: the official prefill gives a query the keys before it in its
chunk only ((K - 1) w + p keys, p its offset); its decode path and attnlab also the query's
own key, which the comparison uses (see OFFICIAL.differences).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import attnlab as al
from attnlab.modules.rotary import Rotary

from .common import Official, compare_with_official, leaf, linear

OFFICIAL = Official(
    mechanism="longheads",
    code="LuLuLuyi/LongHeads @ 1c9f72e, modeling_longheads/modeling_llama.py, LlamaAttention",
    differences=(
        "a query attends to its own key (official prefill: only the keys before it in its "
        "chunk, an off-by-one; its decode path includes it, as attnlab, whose decode must "
        "equal its forward)",
        "at a chunk's last token the official decode path keeps chunk 0, its own and the "
        "top of 1..c-1 (not the previous chunk); attnlab keeps the prefill's rule everywhere "
        "(contract: decode = forward)",
        "begin_selective_length is budget * chunk_size (the official default); other values "
        "are not offered",
        "rope is off by default (attnlab's common default); rope=True is the official Llama "
        "RoPE (float32 angles)",
        "padded keys are masked out of the attention (contract); the official only zeroes "
        "them in the chunk keys, as attnlab does",
    ),
)

B = 2


def rotate(t: Tensor, positions: Tensor, on: bool) -> Tensor:
    """Llama RoPE of (.., N, D) at ``positions`` (N,): cos/sin of float32 angles (the
    official cached tables), halves rotated; identity when not ``on``."""
    if not on:
        return t
    d = t.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    ang = positions.float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    half = torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1)
    return t * ang.cos().to(t.dtype) + half * ang.sin().to(t.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two axes, no mask."""
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def chunk_features(q: Tensor, k: Tensor, v: Tensor, w: int, rope: bool) -> Tensor:
    """(B, H, G, D): the official chunk key of every chunk of the padded q, k, v (B, H, T, D):
    in-chunk attention with in-chunk positions, its mean, then that mean's attention over
    the chunk's (rotated) keys."""
    b, h, t, d = q.shape
    local = torch.arange(t) % w
    qr, kr = rotate(q, local, rope), rotate(k, local, rope)
    qg, kg, vg = (z.reshape(b, h, t // w, w, d) for z in (qr, kr, v))
    value = attend(qg, kg, vg).mean(-2, keepdim=True)
    return attend(value, kg, kg).squeeze(-2)


def chosen_chunks(scores: Tensor, c: int, k_chunks: int) -> list[int]:
    """Sorted chunk indices a query of chunk ``c`` attends to (scores over all chunks)."""
    g = scores.shape[0]
    low, high = torch.finfo(scores.dtype).min, torch.finfo(scores.dtype).max
    s = scores.clone()
    s[torch.arange(g) > c] = low
    for forced in (0, c - 1, c):
        s[forced] = high
    return sorted(s.topk(k_chunks).indices.tolist())


def official_forward(p: dict[str, Tensor], x: Tensor, heads: int, w: int, k_chunks: int,
                     rope: bool, own_key: bool) -> Tensor:
    """The official prefill of one LongHeads Llama attention layer on x (B, N, C)."""
    b, n, c = x.shape
    d = c // heads
    t = -(-n // w) * w
    xp = torch.cat([x, x.new_zeros(b, t - n, c)], 1)
    q, k, v = (linear(p, name, xp).view(b, t, heads, d).transpose(1, 2)
               for name in ("q_proj", "k_proj", "v_proj"))
    keys = chunk_features(q, k, v, w, rope)
    begin = k_chunks * w
    out = torch.zeros(b, heads, n, d, dtype=x.dtype)
    first = min(n, begin)
    pos = torch.arange(first)
    qn, kn = rotate(q[:, :, :first], pos, rope), rotate(k[:, :, :first], pos, rope)
    causal = pos[:, None] >= pos[None, :]
    s = (qn @ kn.transpose(-1, -2) / d ** 0.5).masked_fill(~causal, float("-inf"))
    out[:, :, :first] = torch.softmax(s, -1) @ v[:, :, :first]
    for i in range(begin, n):
        chunk, offset = divmod(i, w)
        count = (k_chunks - 1) * w + offset + (1 if own_key else 0)
        qi = rotate(q[:, :, i:i + 1], torch.tensor([(k_chunks - 1) * w + offset]), rope)
        for bi in range(b):
            for h in range(heads):
                picked = chosen_chunks(q[bi, h, i] @ keys[bi, h].T, chunk, k_chunks)
                idx = torch.cat([torch.arange(g * w, g * w + w) for g in picked])[:count]
                ks = rotate(k[bi, h, idx], torch.arange(count), rope)
                out[bi, h, i] = attend(qi[bi, h], ks, v[bi, h, idx])[0]
    return linear(p, "o_proj", out.transpose(1, 2).reshape(b, n, c))


def official_params(dim: int, gen: torch.Generator) -> dict[str, Tensor]:
    return {f"{name}.weight": leaf(torch.randn(dim, dim, generator=gen, dtype=torch.float64)
                                   * dim ** -0.5)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")}


NAMES = {"qkv.q.weight": "q_proj.weight", "qkv.k.weight": "k_proj.weight",
         "qkv.v.weight": "v_proj.weight", "o_proj.weight": "o_proj.weight"}


@pytest.mark.parametrize("w,k_chunks,n,heads,dim,rope", [
    (2, 3, 17, 2, 16, True),   # budget = the three forced chunks
    (3, 4, 29, 3, 24, True),
    (4, 4, 30, 2, 16, True),   # a partial last chunk
    (3, 5, 31, 2, 16, True),
    (3, 4, 29, 3, 24, False),  # the official with the rotation taken out: attnlab rope=False
])
def test_longheads_equals_the_official_module(w, k_chunks, n, heads, dim, rope):
    gen = torch.Generator().manual_seed(40 + w * 7 + k_chunks + n)
    p = official_params(dim, gen)
    x = torch.randn(B, n, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, n, dim, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_forward(p, xo, heads, w, k_chunks, rope, own_key=True)
    (y_off * weight).sum().backward()
    attn = al.build("longheads", dim=dim, heads=heads, chunk_size=w, budget=k_chunks,
                    causal=True, rope=rope).double()
    compare_with_official(attn, p, NAMES, x, weight, y_off, xo)


def test_the_selection_is_not_the_mean_key_one():
    """The chunk keys matter here: the mean-key rule or no forced previous chunk picks other
    chunks for some queries (so the comparison above would see them)."""
    gen = torch.Generator().manual_seed(5)
    w, k_chunks, n, heads, dim = 3, 4, 29, 3, 24
    p = official_params(dim, gen)
    x = torch.randn(1, n, dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = (linear(p, name, x[:, :27]).view(1, 27, heads, -1).transpose(1, 2)
                   for name in ("q_proj", "k_proj", "v_proj"))
        pooled = chunk_features(q, k, v, w, rope=True)
        mean = k.reshape(1, heads, 9, w, -1).mean(-2)
        differ = sum(chosen_chunks(q[0, h, i] @ pooled[0, h].T, i // w, k_chunks)
                     != chosen_chunks(q[0, h, i] @ mean[0, h].T, i // w, k_chunks)
                     for h in range(heads) for i in range(k_chunks * w, 27))
    assert differ > 0


def test_the_defaults_are_the_official_ones():
    """window_size 256, atten_length 4096 (16 chunks), no biases, float32 RoPE angles; no
    parameter of its own (training-free: the weights are a pretrained Llama's)."""
    attn = al.build("longheads", dim=32, heads=4)
    assert (attn.chunk_size, attn.budget) == (256, 16)
    assert attn.causal
    assert {n for n, _ in attn.named_parameters()} == set(NAMES)
    roped = al.build("longheads", dim=32, heads=4, rope=True)
    assert isinstance(roped.rotary, Rotary) and roped.rotary.float32_frequencies
