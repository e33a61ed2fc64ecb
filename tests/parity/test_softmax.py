"""softmax against torch.nn.MultiheadAttention, PyTorch's module of "Attention Is All You Need"
(the paper's own code, tensor2tensor, is TensorFlow), and against a float64 re-expression of
the paper's multi-head attention for what that module cannot express (grouped-query heads).

``nn.MultiheadAttention`` keeps one fused ``in_proj_weight`` (q rows, then k, then v) with
``in_proj_bias`` and ``out_proj``; here the fused tensors are built from three leaves, so each
part's gradient is that leaf's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="softmax",
    code="none: the paper's code (tensor2tensor) is TensorFlow; PyTorch's "
         "torch.nn.MultiheadAttention implements the same module",
    checked_against="torch.nn.MultiheadAttention in float64, causal and key padding (output, "
                    "input and parameter gradients); GQA against its float64 re-expression",
    differences=(
        "no projection biases by default (bias=True gives nn.MultiheadAttention's; the "
        "convention of current LMs)",
    ),
)

B, N, DIM, HEADS = 2, 9, 24, 4


def parts(gen: torch.Generator, kv_heads: int = HEADS) -> dict[str, torch.Tensor]:
    hd = DIM // HEADS

    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5

    return {k: leaf(v) for k, v in {
        "q.weight": w(DIM, DIM), "k.weight": w(kv_heads * hd, DIM),
        "v.weight": w(kv_heads * hd, DIM), "q.bias": w(DIM), "k.bias": w(kv_heads * hd),
        "v.bias": w(kv_heads * hd), "out_proj.weight": w(DIM, DIM), "out_proj.bias": w(DIM),
    }.items()}


NAMES = {"qkv.q.weight": "q.weight", "qkv.k.weight": "k.weight", "qkv.v.weight": "v.weight",
         "qkv.q.bias": "q.bias", "qkv.k.bias": "k.bias", "qkv.v.bias": "v.bias",
         "o_proj.weight": "out_proj.weight", "o_proj.bias": "out_proj.bias"}


def attnlab_run(p, x, weight, keep, **kwargs) -> dict:
    attn = al.build("softmax", dim=DIM, heads=HEADS, bias=True, **kwargs).double()
    own = dict(attn.named_parameters())
    with torch.no_grad():
        for mine, theirs in NAMES.items():
            own[mine].copy_(p[theirs])
    xa = leaf(x)
    y = attn(xa, mask=keep)
    (y * weight).sum().backward()
    return {"out": y, "grad x": xa.grad,
            **{f"grad {m}": own[m].grad for m in NAMES}}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_softmax_equals_torch_multihead_attention(causal, padded):
    gen = torch.Generator().manual_seed(3 + 2 * causal + padded)
    p = parts(gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    keep = torch.ones(B, N, dtype=torch.bool)
    if padded:
        keep[1, 6:] = False
        weight = weight * keep[..., None]  # padded rows are the caller's to ignore

    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.out_proj.weight.copy_(p["out_proj.weight"])
        mha.out_proj.bias.copy_(p["out_proj.bias"])
    # the fused input projection, made of the three leaves (its layout: q rows, k rows, v rows)
    del mha.in_proj_weight, mha.in_proj_bias
    mha.in_proj_weight = torch.cat([p["q.weight"], p["k.weight"], p["v.weight"]])
    mha.in_proj_bias = torch.cat([p["q.bias"], p["k.bias"], p["v.bias"]])
    xo = leaf(x)
    future = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None
    y_off, _ = mha(xo, xo, xo, key_padding_mask=~keep if padded else None,
                   attn_mask=future, need_weights=False)
    (y_off * weight).sum().backward()
    want = {"out": y_off, "grad x": xo.grad,
            **{f"grad {m}": (mha.out_proj.weight.grad if t == "out_proj.weight" else
                             mha.out_proj.bias.grad if t == "out_proj.bias" else p[t].grad)
               for m, t in NAMES.items()}}

    got = attnlab_run(p, x, weight, keep if padded else None, causal=causal)
    rows = keep[..., None]
    assert_parity({k: ((got[k] * rows, want[k] * rows) if k == "out" else (got[k], want[k]))
                   for k in want})


def reference_gqa(p, x, kv_heads: int, causal: bool) -> torch.Tensor:
    """Multi-head attention with each key/value head shared by HEADS / kv_heads query heads."""
    b, n, _ = x.shape
    hd = DIM // HEADS
    q = (x @ p["q.weight"].T + p["q.bias"]).view(b, n, HEADS, hd).transpose(1, 2)
    k = (x @ p["k.weight"].T + p["k.bias"]).view(b, n, kv_heads, hd).transpose(1, 2)
    v = (x @ p["v.weight"].T + p["v.bias"]).view(b, n, kv_heads, hd).transpose(1, 2)
    group = HEADS // kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / hd ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, DIM)
    return y @ p["out_proj.weight"].T + p["out_proj.bias"]


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_softmax_equals_its_re_expression(kv_heads):
    gen = torch.Generator().manual_seed(20 + kv_heads)
    p = parts(gen, kv_heads)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = reference_gqa(p, xo, kv_heads, causal=True)
    (y_off * weight).sum().backward()
    want = {"out": y_off, "grad x": xo.grad,
            **{f"grad {m}": p[t].grad for m, t in NAMES.items()}}
    got = attnlab_run(p, x, weight, None, causal=True, kv_heads=kv_heads)
    assert_parity({k: (got[k], want[k]) for k in want})
