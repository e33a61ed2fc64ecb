"""moh against the official MoH module (SkyworkAI/MoH @ 2cefd57, MoH-DiT/models.py
``MoHAttention``; the gating is the same in MoH-ViT/attention.py ``Attention``).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: one fused ``qkv`` (with bias), ``proj`` (with bias), ``wg`` (routed heads),
``wg_0`` (shared/routed mix, only with shared heads), ``wg_1`` (shared heads, only with two
or more); its load-balance loss is taken with the 0.01 its training loops use.
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="moh",
    code="SkyworkAI/MoH @ 2cefd57, MoH-DiT/models.py, MoHAttention",
    differences=(
        "a model sums its layers' balance losses where the official loop averages them "
        "(contract: a module does not know the model's depth; balance_weight=0.01/depth "
        "matches)",
        "routers in at least float32 (deliberate: low-precision rounding must not flip top-k)",
        "a key padding mask is accepted (contract; the official has none)",
    ),
)

B, N, DIM, HEADS = 2, 7, 24, 6


def official_params(shared: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5
    p = {"qkv.weight": w(3 * DIM, DIM), "qkv.bias": w(3 * DIM), "proj.weight": w(DIM, DIM),
         "proj.bias": w(DIM), "wg.weight": w(HEADS - shared, DIM)}
    if shared > 0:
        p["wg_0.weight"] = w(2, DIM)
    if shared > 1:
        p["wg_1.weight"] = w(shared, DIM)
    return {k: leaf(v) for k, v in p.items()}


def official_forward(p, x, shared: int, routed: int):
    """Output (B, N, C) and the load-balance term of one official MoH layer."""
    b, n, c = x.shape
    hd = c // HEADS
    tok = x.reshape(b * n, c)
    probs = torch.softmax(tok @ p["wg.weight"].T, dim=1)
    experts = probs.shape[1]
    picked = torch.zeros_like(probs).scatter(1, probs.topk(routed, dim=1).indices, 1.0)
    balance = (probs.mean(0) * picked.mean(0)).mean() * experts * experts
    kept = probs * picked
    kept = kept / kept.sum(1, keepdim=True).clamp(min=torch.finfo(kept.dtype).eps)
    routed_g = (kept * routed).reshape(b, n, experts)

    qkv = (x @ p["qkv.weight"].T + p["qkv.bias"]).reshape(b, n, 3, HEADS, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, hd)
    att = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1)
    heads = (att @ v).transpose(1, 2)  # (B, N, H, hd)

    if shared == 0:
        gates = routed_g
    else:
        if shared > 1:
            shared_g = torch.softmax(tok @ p["wg_1.weight"].T, dim=1) * shared
        else:
            shared_g = torch.ones(b * n, 1, dtype=x.dtype) * shared
        mix = torch.softmax(tok @ p["wg_0.weight"].T, dim=1) * 2
        gates = torch.cat([mix[:, :1] * shared_g, mix[:, 1:] * kept * routed], 1)
        gates = gates.reshape(b, n, HEADS)
    y = (heads * gates[..., None]).reshape(b, n, c)
    return y @ p["proj.weight"].T + p["proj.bias"], balance


def to_attnlab(attn, p) -> dict[str, str]:
    """Copy the official weights into ``attn``; return attnlab name -> official name of
    every mapped parameter (for the gradient comparison)."""
    names = {"qkv.q.weight": ("qkv.weight", 0), "qkv.k.weight": ("qkv.weight", 1),
             "qkv.v.weight": ("qkv.weight", 2), "qkv.q.bias": ("qkv.bias", 0),
             "qkv.k.bias": ("qkv.bias", 1), "qkv.v.bias": ("qkv.bias", 2),
             "o_proj.weight": ("proj.weight", None), "o_proj.bias": ("proj.bias", None),
             "router.weight": ("wg.weight", None), "mix.weight": ("wg_0.weight", None),
             "shared_router.weight": ("wg_1.weight", None)}
    own = dict(attn.named_parameters())
    mapped = {}
    with torch.no_grad():
        for mine, (theirs, part) in names.items():
            if theirs not in p:
                continue
            src = p[theirs] if part is None else p[theirs].chunk(3, 0)[part]
            own[mine].copy_(src)
            mapped[mine] = (theirs, part)
    return mapped


@pytest.mark.parametrize("shared,routed", [(0, 2), (1, 2), (2, 3)])
def test_moh_equals_the_official_module(shared, routed):
    gen = torch.Generator().manual_seed(10 + shared)
    p = official_params(shared, gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)

    xo = leaf(x)
    y_off, balance = official_forward(p, xo, shared, routed)
    (((y_off * weight).sum()) + 0.01 * balance).backward()

    attn = al.build("moh", dim=DIM, heads=HEADS, shared_heads=shared, top_k=routed,
                    bias=True).double().train()
    mapped = to_attnlab(attn, p)
    assert set(mapped) == {n for n, _ in attn.named_parameters()}, "every parameter mapped"
    xa = leaf(x)
    y = attn(xa)
    loss = (y * weight).sum() + attn.extra_loss()
    loss.backward()

    pairs = {"out": (y, y_off), "extra_loss": (attn.extra_loss(), 0.01 * balance),
             "grad x": (xa.grad, xo.grad)}
    own = dict(attn.named_parameters())
    for mine, (theirs, part) in mapped.items():
        g = p[theirs].grad if part is None else p[theirs].grad.chunk(3, 0)[part]
        pairs[f"grad {mine}"] = (own[mine].grad, g)
    assert_parity(pairs)
    with torch.no_grad():  # the packed inference path computes the same function
        assert_parity({"out eval": (attn.eval()(x), y_off)})
