"""maxvit against timm's MaxViT attention (huggingface/pytorch-image-models @ aa4b585,
timm/models/maxxvit.py ``PartitionAttentionCl`` (window/grid partition) around ``AttentionCl``,
with timm/layers/pos_embed_rel.py ``RelPosBias`` (timm layout) or ``RelPosBiasTf`` (the
layout of the TensorFlow MaxViT checkpoints, google-research/maxvit)).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: a fused ``qkv`` (with bias) whose rows are, in the timm layout
(``head_first=True``), per head that head's q, k and v rows, and in the TF layout
(``head_first=False``) all q rows, then all k rows, then all v rows; ``proj`` (with bias);
``rel_pos.relative_position_bias_table``: timm (``(2P-1)^2``, heads) indexed by the
query-minus-key offset (row-major), TF (heads, 2P-1, 2P-1) indexed by the key-minus-query
offset. Block partition: P x P windows; grid partition: a P x P grid strided by (H/P, W/P).
The attention is softmax(d^-1/2 q k^T + bias) v within each partition.
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf, linear

OFFICIAL = Official(
    mechanism="maxvit",
    code="huggingface/pytorch-image-models @ aa4b585, timm/models/maxxvit.py, "
         "AttentionCl in PartitionAttentionCl (RelPosBias / RelPosBiasTf)",
    differences=(
        "default axis='block+grid' gives half the heads to each partition in one module "
        "(deliberate: one layer sees both axes; axis='block' and axis='grid' are timm's two "
        "modules, which MaxViT runs one after the other with a norm and residual between)",
        "projections without bias by default (the contract's bias=False for every mechanism; "
        "bias=True is timm's attn_bias=True)",
    ),
)

B = 2
TABLE = "rel_pos.relative_position_bias_table"


def official_params(layout: str, heads: int, head_dim: int, size: int,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state dict of one timm ``AttentionCl`` (float64 leaves)."""
    c = heads * head_dim

    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5

    span = 2 * size - 1
    table = (torch.randn(span * span, heads, generator=gen, dtype=torch.float64)
             if layout == "timm" else
             torch.randn(heads, span, span, generator=gen, dtype=torch.float64))
    p = {"qkv.weight": w(3 * c, c), "qkv.bias": w(3 * c), "proj.weight": w(c, c),
         "proj.bias": w(c), TABLE: table}
    return {k: leaf(v) for k, v in p.items()}


def partition(x: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * groups, size * size, C): windows (block) or strided grids."""
    b, h, w, c = x.shape
    if kind == "block":  # (B, H/P, P, W/P, P, C): group (i, j), slot (a, b)
        x = x.reshape(b, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
    else:  # (B, P, H/P, P, W/P, C): slot (a, b), group (i, j)
        x = x.reshape(b, size, h // size, size, w // size, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, size * size, c)


def unpartition(y: torch.Tensor, kind: str, size: int, shape) -> torch.Tensor:
    b, h, w, c = shape
    if kind == "block":
        y = y.reshape(b, h // size, w // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    else:
        y = y.reshape(b, h // size, w // size, size, size, c).permute(0, 3, 1, 4, 2, 5)
    return y.reshape(b, h, w, c)


def relative_bias(table: torch.Tensor, layout: str, size: int) -> torch.Tensor:
    """(heads, P*P, P*P) bias of query slot i and key slot j."""
    span = 2 * size - 1
    slots = [(r, c) for r in range(size) for c in range(size)]
    if layout == "timm":  # row-major index of (q - k) + P - 1 into the flat table
        index = torch.tensor([[(qr - kr + size - 1) * span + (qc - kc + size - 1)
                               for kr, kc in slots] for qr, qc in slots])
        return table[index].permute(2, 0, 1)
    # TF: one-hot lookups per axis of (k - q) + P - 1, as google-research/maxvit
    look = torch.zeros(size, size, span, dtype=table.dtype)
    for i in range(size):
        for j in range(size):
            look[i, j, j - i + size - 1] = 1
    full = torch.einsum("nhw,ixh,jyw->nijxy", table, look, look)  # (n, qr, qc, kr, kc)
    return full.reshape(table.shape[0], size * size, size * size)


def official_attention(p: dict, x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """timm's AttentionCl on (groups, n, C) tokens of one partition each."""
    g, n, c = x.shape
    d = c // heads
    qkv = linear(p, "qkv", x)
    if layout == "timm":  # head_first: per head [q | k | v]
        q, k, v = qkv.reshape(g, n, heads, 3 * d).transpose(1, 2).chunk(3, -1)
    else:  # [q of all heads | k | v]
        q, k, v = qkv.reshape(g, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    size = round(n ** 0.5)
    scores = (q * d ** -0.5) @ k.transpose(-1, -2) + relative_bias(p[TABLE], layout, size)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(g, n, c)
    return linear(p, "proj", out)


def official_forward(p: dict, x: torch.Tensor, kind: str, size: int, layout: str,
                     heads: int) -> torch.Tensor:
    """PartitionAttentionCl's attention branch on a (B, H, W, C) image (norm excluded)."""
    y = official_attention(p, partition(x, kind, size), layout, heads)
    return unpartition(y, kind, size, x.shape)


def to_attnlab(p: dict, layout: str, heads: int, kind: str) -> dict[str, torch.Tensor]:
    """attnlab parameter name -> the same tensor cut from the official layout (applied to
    the official gradients as well)."""
    c = p["proj.weight"].shape[0]
    d = c // heads
    if layout == "timm":
        rows = torch.arange(3 * c).reshape(heads, 3, d).transpose(0, 1).reshape(3, c)
    else:
        rows = torch.arange(3 * c).reshape(3, c)
    out = {"o_proj.weight": p["proj.weight"], "o_proj.bias": p["proj.bias"]}
    for i, s in enumerate("qkv"):
        out[f"qkv.{s}.weight"] = p["qkv.weight"][rows[i]]
        out[f"qkv.{s}.bias"] = p["qkv.bias"][rows[i]]
    span = round((p[TABLE].numel() / heads) ** 0.5)  # 2P - 1
    table = (p[TABLE].T.reshape(heads, span, span) if layout == "timm"
             else p[TABLE].flip(1, 2))
    out[f"bias.{kind}.table"] = table
    return out


CASES = [("block", "timm", (6, 9), 3, 2), ("grid", "timm", (6, 9), 3, 2),
         ("block", "tf", (8, 4), 4, 3), ("grid", "tf", (4, 6), 2, 3),
         ("grid", "timm", (8, 8), 4, 1), ("block", "tf", (6, 6), 2, 2)]


@pytest.mark.parametrize("kind,layout,image,size,heads", CASES)
def test_maxvit_equals_timm(kind, layout, image, size, heads):
    head_dim = 4
    gen = torch.Generator().manual_seed(70 + size + heads)
    p = official_params(layout, heads, head_dim, size, gen)
    x = torch.randn(B, *image, heads * head_dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_forward(p, xo, kind, size, layout, heads)
    (y_off * weight).sum().backward()

    axis = {"window": size} if kind == "block" else {"grid": size}
    attn = al.build("maxvit", dim=heads * head_dim, heads=heads, axis=kind, bias=True,
                    **axis).double()
    own = dict(attn.named_parameters())
    mapped = to_attnlab(p, layout, heads, kind)
    assert set(mapped) == set(own), "every parameter mapped"
    with torch.no_grad():
        for name, t in mapped.items():
            own[name].copy_(t)
    xa = leaf(x)
    y = attn(xa)
    (y * weight).sum().backward()
    grads = to_attnlab({k: v.grad for k, v in p.items()}, layout, heads, kind)
    pairs = {"out": (y, y_off), "grad x": (xa.grad, xo.grad)}
    pairs.update({f"grad {n}": (own[n].grad, grads[n]) for n in own})
    assert_parity(pairs)


def test_maxvit_defaults_are_timm_ones():
    dim, heads = 64, 2
    attn = al.build("maxvit", dim=dim, heads=heads, axis="block")
    # timm MaxViT at 224: partition 224 / 32 = 7 for both the window and the grid
    assert (attn.window, attn.grid) == (7, 7)
    grid = al.build("maxvit", dim=dim, heads=heads, axis="grid")
    assert tuple(grid.bias["grid"].table.shape) == (heads, 13, 13)
    # RelPosBias: trunc_normal_(std=.02) (cut at +-2, i.e. never at this std)
    big = al.build("maxvit", dim=256, heads=8, axis="block")
    table = big.bias["block"].table.detach()
    assert abs(table.std().item() - 0.02) < 0.001 and abs(table.mean().item()) < 0.001
    # AttentionCl's Linear layers keep torch's default init (U(+-1/sqrt(fan_in)))
    bound = dim ** -0.5
    for name in ("qkv.q.weight", "qkv.k.weight", "qkv.v.weight", "o_proj.weight"):
        t = dict(attn.named_parameters())[name].detach()
        assert t.abs().max().item() <= bound and t.abs().max().item() > 0.9 * bound
