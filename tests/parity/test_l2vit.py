"""l2vit against the official L2ViT global block (ChuanyangZheng/L2ViT @ fad0341,
classification/models/l2vit.py ``LGABlock`` with ``enhanced=True``, and its
``LinearAttention``).

The official computation is re-expressed here in float64 from reading that code, on tokens
(B, N, C) with their grid (H, W), in its own parameter layout: ``cpe.0.proj`` (3 x 3
depthwise convolution with bias, added to x), ``norm1``, ``attn.qkv`` (fused q | k | v,
with bias), ``attn.temperature`` (heads, 1, 1), ``attn.proj``, ``norm3`` and ``local_mp``
(the LCM: ``conv1`` 7 x 7 depthwise, GELU, BatchNorm ``bn``, ``conv2`` 7 x 7 depthwise),
``norm2`` and ``mlp.fc1`` / ``mlp.fc2``. The whole block, MLP included, is compared with
attnlab's ``models.blocks.Block`` around ``l2vit`` (the attention branch, the LCM branch
and the CPE it contributes), in eval mode (BatchNorm with random running statistics) and in
training mode (batch statistics; the running statistics' update is compared too); the bare
attention module is compared with ``LinearAttention``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab as al
from attnlab.models.blocks import Block

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="l2vit",
    code="ChuanyangZheng/L2ViT @ fad0341, classification/models/l2vit.py, LGABlock "
         "(enhanced) with LinearAttention",
    differences=(
        "the LCM and the CPE are residual branches of attnlab's Block (models/blocks.py), "
        "not of the bare attention module (deliberate: they are the block's, as in LGABlock)",
        "L2ViT's model-wide init (trunc-normal std 0.02 for every Linear and Conv2d, zero "
        "biases) is not applied: PyTorch's defaults, as the official modules' constructors "
        "(a backbone choice)",
        "a key padding mask is accepted: padded tokens are no keys and are zeroed before "
        "each convolution, the LCM's BatchNorm statistics cover real tokens only (contract; "
        "the official has none)",
    ),
)

LN_EPS = BN_EPS = 1e-5
MOMENTUM = 0.1
B = 2


def official_params(dim: int, heads: int, gen: torch.Generator, qkv_scale: float) -> dict:
    """LGABlock parameters (leaves) and the LCM BatchNorm's running statistics."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    def norm(name):
        return {f"{name}.weight": 1 + 0.3 * rnd(dim), f"{name}.bias": 0.3 * rnd(dim)}

    p = {"cpe.0.proj.weight": rnd(dim, 1, 3, 3, scale=1 / 3), "cpe.0.proj.bias": 0.3 * rnd(dim),
         **norm("norm1"), **norm("norm2"), **norm("norm3"),
         "attn.qkv.weight": rnd(3 * dim, dim, scale=qkv_scale * dim ** -0.5),
         "attn.qkv.bias": 0.3 * rnd(3 * dim),
         "attn.temperature": (dim // heads) ** -0.5 * (1 + 0.3 * rnd(heads, 1, 1)),
         "attn.proj.weight": rnd(dim, dim, scale=dim ** -0.5), "attn.proj.bias": 0.3 * rnd(dim),
         "local_mp.conv1.weight": rnd(dim, 1, 7, 7, scale=1 / 7),
         "local_mp.conv1.bias": 0.3 * rnd(dim),
         "local_mp.bn.weight": 1 + 0.3 * rnd(dim), "local_mp.bn.bias": 0.3 * rnd(dim),
         "local_mp.conv2.weight": rnd(dim, 1, 7, 7, scale=1 / 7),
         "local_mp.conv2.bias": 0.3 * rnd(dim),
         "mlp.fc1.weight": rnd(4 * dim, dim, scale=dim ** -0.5), "mlp.fc1.bias": 0.3 * rnd(4 * dim),
         "mlp.fc2.weight": rnd(dim, 4 * dim, scale=(4 * dim) ** -0.5),
         "mlp.fc2.bias": 0.3 * rnd(dim)}
    p = {k: leaf(v) for k, v in p.items()}
    stats = {"local_mp.bn.running_mean": 0.3 * rnd(dim),
             "local_mp.bn.running_var": torch.rand(dim, generator=gen, dtype=torch.float64) + .5}
    return {**p, **stats}


def layer_norm(p, name, x):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * p[f"{name}.weight"] + p[f"{name}.bias"]


def depthwise(p, name, x, size):
    """A depthwise convolution (padding k // 2, with bias) of tokens (B, N, C) on ``size``."""
    b, n, c = x.shape
    img = x.transpose(1, 2).reshape(b, c, *size)
    w = p[f"{name}.weight"]
    img = F.conv2d(img, w, p[f"{name}.bias"], padding=w.shape[-1] // 2, groups=c)
    return img.flatten(2).transpose(1, 2)


def linear_attention(p, x, heads: int, floors: list | None = None):
    """LinearAttention on tokens (B, N, C)."""
    b, n, c = x.shape
    qkv = (x @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).reshape(b, n, 3, heads, c // heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, h, N, d)
    q, k = torch.relu(q), torch.relu(k)
    raw = q @ k.transpose(-2, -1).sum(-1, keepdim=True)  # (B, h, N, 1)
    if floors is not None:
        floors.append(raw.detach())
    denom = torch.clamp(raw, min=100.0)
    out = q @ ((k.transpose(-2, -1) @ v) * p["attn.temperature"]) / denom
    out = out.transpose(1, 2).reshape(b, n, c)
    return out @ p["attn.proj.weight"].T + p["attn.proj.bias"]


def batch_norm(p, x, training: bool):
    """BatchNorm2d on tokens (B, N, C): statistics over the batch and every position."""
    name = "local_mp.bn"
    if training:
        mean, var = x.mean((0, 1)), x.var((0, 1), unbiased=False)
        count = x.shape[0] * x.shape[1]
        with torch.no_grad():
            p[f"{name}.running_mean"].mul_(1 - MOMENTUM).add_(MOMENTUM * mean)
            p[f"{name}.running_var"].mul_(1 - MOMENTUM).add_(
                MOMENTUM * var * count / (count - 1))
    else:
        mean, var = p[f"{name}.running_mean"], p[f"{name}.running_var"]
    return (x - mean) / torch.sqrt(var + BN_EPS) * p[f"{name}.weight"] + p[f"{name}.bias"]


def official_block(p, x, size, heads: int, training: bool, floors: list | None = None):
    """LGABlock (enhanced) on tokens (B, N, C) of grid ``size``."""
    x = x + depthwise(p, "cpe.0.proj", x, size)
    x = x + linear_attention(p, layer_norm(p, "norm1", x), heads, floors)
    h = F.gelu(depthwise(p, "local_mp.conv1", layer_norm(p, "norm3", x), size))
    x = x + depthwise(p, "local_mp.conv2", batch_norm(p, h, training), size)
    h = F.gelu(layer_norm(p, "norm2", x) @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"])
    return x + h @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]


ATTENTION_NAMES = {"tau": ("attn.temperature", None), "qkv.q.weight": ("attn.qkv.weight", 0),
                   "qkv.k.weight": ("attn.qkv.weight", 1), "qkv.v.weight": ("attn.qkv.weight", 2),
                   "qkv.q.bias": ("attn.qkv.bias", 0), "qkv.k.bias": ("attn.qkv.bias", 1),
                   "qkv.v.bias": ("attn.qkv.bias", 2), "o_proj.weight": ("attn.proj.weight", None),
                   "o_proj.bias": ("attn.proj.bias", None)}
BLOCK_NAMES = {
    **{f"attn.{k}": v for k, v in ATTENTION_NAMES.items()},
    **{f"{mine}.{w}": (f"{theirs}.{w}", None) for w in ("weight", "bias")
       for mine, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("after.norm", "norm3"),
                            ("before.conv.conv", "cpe.0.proj"), ("mlp.0", "mlp.fc1"),
                            ("mlp.2", "mlp.fc2"),
                            ("after.lcm.conv1.conv", "local_mp.conv1"),
                            ("after.lcm.norm", "local_mp.bn"),
                            ("after.lcm.conv2.conv", "local_mp.conv2"))}}


def official_part(p: dict, theirs: str, part: int | None):
    t = p[theirs]
    return t.reshape(-1) if theirs == "attn.temperature" else (
        t if part is None else t.chunk(3, 0)[part])


def copy_into(module: torch.nn.Module, p: dict, names: dict) -> None:
    own = dict(module.named_parameters())
    assert set(own) == set(names), "every attnlab parameter mapped"
    with torch.no_grad():
        for mine, (theirs, part) in names.items():
            own[mine].copy_(official_part(p, theirs, part))


CASES = [(16, 2, (4, 5), 1.0), (24, 3, (3, 3), 3.0), (32, 4, (6, 4), 2.0), (8, 1, (1, 9), 4.0)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dim,heads,size,qkv_scale", CASES)
def test_l2vit_block_equals_the_official_lgablock(dim, heads, size, qkv_scale, training):
    gen = torch.Generator().manual_seed(dim + heads)
    p = official_params(dim, heads, gen, qkv_scale)
    n = size[0] * size[1]
    x = torch.randn(B, n, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, n, dim, generator=gen, dtype=torch.float64)

    block = Block(dim, heads, "l2vit", {"causal": False}, 4, 0.0).double().train(training)
    copy_into(block, p, BLOCK_NAMES)
    bn = block.after.lcm.norm
    with torch.no_grad():
        bn.running_mean.copy_(p["local_mp.bn.running_mean"])
        bn.running_var.copy_(p["local_mp.bn.running_var"])

    xo = leaf(x)
    y_off = official_block(p, xo, size, heads, training)
    (y_off * weight).sum().backward()

    xa = leaf(x.reshape(B, *size, dim))  # attnlab's blocks take images as (B, H, W, C)
    y = block(xa)
    (y * weight.reshape(B, *size, dim)).sum().backward()

    own = dict(block.named_parameters())
    pairs = {"out": (y.reshape(B, n, dim), y_off), "grad x": (xa.grad.reshape(B, n, dim),
                                                               xo.grad)}
    for mine, (theirs, part) in BLOCK_NAMES.items():
        pairs[f"grad {mine}"] = (own[mine].grad, official_part(
            {theirs: p[theirs].grad}, theirs, part))
    pairs["running mean"] = (bn.running_mean, p["local_mp.bn.running_mean"])
    pairs["running var"] = (bn.running_var, p["local_mp.bn.running_var"])
    assert_parity(pairs)


@pytest.mark.parametrize("dim,heads,size,qkv_scale", CASES)
def test_bare_l2vit_equals_the_official_linear_attention(dim, heads, size, qkv_scale):
    gen = torch.Generator().manual_seed(dim + heads)
    p = official_params(dim, heads, gen, qkv_scale)
    p = {k: v for k, v in p.items() if k.startswith("attn.")}
    n = size[0] * size[1]
    x = torch.randn(B, n, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, n, dim, generator=gen, dtype=torch.float64)
    xo, floors = leaf(x), []
    y_off = linear_attention(p, xo, heads, floors)
    (y_off * weight).sum().backward()
    if qkv_scale >= 2:  # the floor of 100 binds for some rows, not for others
        assert (floors[0] < 100).any() and (floors[0] > 100).any()

    attn = al.build("l2vit", dim=dim, heads=heads).double()
    copy_into(attn, p, ATTENTION_NAMES)
    xa = leaf(x)  # global attention: the grid does not matter
    y = attn(xa)
    (y * weight).sum().backward()
    own = dict(attn.named_parameters())
    pairs = {"out": (y, y_off), "grad x": (xa.grad, xo.grad)}
    for mine, (theirs, part) in ATTENTION_NAMES.items():
        pairs[f"grad {mine}"] = (own[mine].grad, official_part(
            {theirs: p[theirs].grad}, theirs, part))
    assert_parity(pairs)


def test_l2vit_defaults_are_the_official_ones():
    """LGABlock's defaults: biases on q, k, v and the output, tau = d^-1/2, LCM and CPE as
    the block's branches with the official constructors' initialisation (PyTorch's)."""
    attn = al.build("l2vit", dim=96, heads=3)
    assert attn.local and attn.cpe and attn.qkv.q.bias is not None
    assert attn.o_proj.bias is not None
    torch.testing.assert_close(attn.tau, torch.full((3,), 32 ** -0.5))
    branches = attn.residual_branches()
    assert set(branches) == {"before", "after"}
    conv = branches["after"].lcm.conv1.conv
    assert conv.kernel_size == (7, 7) and conv.groups == 96 and conv.bias is not None
    assert branches["before"].conv.conv.kernel_size == (3, 3)
    assert isinstance(branches["after"].norm, torch.nn.LayerNorm)
    assert branches["after"].lcm.norm.eps == BN_EPS and branches["after"].lcm.norm.momentum == .1
    assert al.build("l2vit", dim=96, heads=3, local=False, cpe=False).residual_branches() == {}


def test_l2vit_lcm_alias_is_deprecated():
    with pytest.warns(FutureWarning, match="local="):
        attn = al.build("l2vit", dim=16, heads=2, lcm=False)
    assert not attn.local and "after" not in attn.residual_branches()
