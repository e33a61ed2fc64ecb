"""mala against the official MALA module (qhfan/MALA @ 7114e63,
classfication_release/model.py ``AddLinearAttention``, with that file's ``RoPE``).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: ``qkvo`` (a 1 x 1 convolution C -> 4C with bias: q, k, v and the linear
output gate o, each head-major), ``lepe`` (5 x 5 depthwise convolution with bias on v),
``proj`` (1 x 1 convolution with bias). phi = elu + 1; z from the unrotated features; the
2-D RoPE (frequencies base^-linspace(0, 1, D/4) in float32, each for two adjacent-channel
pairs, rows on the first half of the channels, columns on the second) turns phi(q), phi(k)
before the key-value product; output proj((res + lepe) * o).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab as al

from .common import Official, compare_with_official, leaf

OFFICIAL = Official(
    mechanism="mala",
    code="qhfan/MALA @ 7114e63, classfication_release/model.py, AddLinearAttention",
    differences=(
        "linear output gate, LePE and 2-D RoPE are options (gate='linear', local=True, "
        "rope=True), not defaults: the authors' softmax baseline VanillaSelfAttention has "
        "the same three (backbone parts)",
        "projection biases are an option (bias=True; attnlab's common default is no bias)",
        "PyTorch's init (the official model's trunc-normal std 0.02 of every conv is a "
        "model-level choice; the module's own init is PyTorch's, as attnlab's)",
        "key padding and a causal form are accepted (contract; the official has neither)",
    ),
)

B, GRID, HEADS, HD = 2, (3, 4), 2, 8
DIM = HEADS * HD


def official_params(gen: torch.Generator) -> dict[str, torch.Tensor]:
    def w(*shape, fan):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * fan ** -0.5
    p = {"qkvo.weight": w(4 * DIM, DIM, 1, 1, fan=DIM), "qkvo.bias": w(4 * DIM, fan=4),
         "lepe.weight": w(DIM, 1, 5, 5, fan=25), "lepe.bias": w(DIM, fan=4),
         "proj.weight": w(DIM, DIM, 1, 1, fan=DIM), "proj.bias": w(DIM, fan=4)}
    return {k: leaf(v) for k, v in p.items()}


def official_sin_cos(grid: tuple[int, int], head_dim: int) -> tuple[torch.Tensor, ...]:
    """The official RoPE module's (sin, cos), ((h w), D): its float32 frequency buffer, in
    float64 after ``module.double()``."""
    freq = (1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))).repeat_interleave(2).double()
    h = torch.arange(grid[0], dtype=torch.float64)[:, None] * freq
    w = torch.arange(grid[1], dtype=torch.float64)[:, None] * freq
    ang = torch.cat([h[:, None].expand(-1, grid[1], -1), w[None].expand(grid[0], -1, -1)], -1)
    return ang.flatten(0, 1).sin(), ang.flatten(0, 1).cos()


def shift_pairs(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x cos + (-x_{2i+1}, x_{2i}) sin, channel pairs (2i, 2i + 1)."""
    swapped = torch.stack([-t[..., 1::2], t[..., ::2]], -1).flatten(-2)
    return t * cos + swapped * sin


def official_forward(p: dict, x: torch.Tensor, rope: bool) -> torch.Tensor:
    """x (B, C, h, w) -> (B, C, h, w), one official AddLinearAttention."""
    b, c, h, w = x.shape
    qkvo = F.conv2d(x, p["qkvo.weight"], p["qkvo.bias"])
    v_map, o = qkvo[:, 2 * c:3 * c], qkvo[:, 3 * c:]
    lepe = F.conv2d(v_map, p["lepe.weight"], p["lepe.bias"], padding=2, groups=c)
    heads = qkvo[:, :3 * c].reshape(b, 3, HEADS, HD, h * w).transpose(-1, -2)
    q, k, v = F.elu(heads[:, 0]) + 1, F.elu(heads[:, 1]) + 1, heads[:, 2]
    scale = HD ** -0.5
    z = q @ k.mean(-2, keepdim=True).transpose(-1, -2) * scale
    if rope:
        sin, cos = official_sin_cos((h, w), HD)
        q, k = shift_pairs(q, sin, cos), shift_pairs(k, sin, cos)
    root = math.sqrt(scale / (h * w))
    kv = (k.transpose(-1, -2) * root) @ (v * root)
    res = q @ kv * (1 + 1 / (z + 1e-6)) - z * v.mean(2, keepdim=True)
    res = res.transpose(-1, -2).reshape(b, c, h, w) + lepe
    return F.conv2d(res * o, p["proj.weight"], p["proj.bias"])


NAMES = {"qkv.q.weight": "q", "qkv.k.weight": "k", "qkv.v.weight": "v",
         "gate.proj.weight": "o", "qkv.q.bias": "q", "qkv.k.bias": "k", "qkv.v.bias": "v",
         "gate.proj.bias": "o"}


def to_attnlab(attn, p: dict) -> None:
    """Copy the official weights into ``attn`` (1 x 1 convolutions are linear maps)."""
    own = dict(attn.named_parameters())
    with torch.no_grad():
        for mine, part in NAMES.items():
            i = "qkvo".index(part)
            src = p["qkvo." + mine.rsplit(".", 1)[1]].chunk(4, 0)[i]
            own[mine].copy_(src.reshape(own[mine].shape))
        own["o_proj.weight"].copy_(p["proj.weight"].flatten(1))
        own["o_proj.bias"].copy_(p["proj.bias"])
        own["lepe.conv.weight"].copy_(p["lepe.weight"])
        own["lepe.conv.bias"].copy_(p["lepe.bias"])


def grads_of_official(attn, p: dict) -> dict:
    """attnlab parameter -> the official gradient of the same numbers."""
    out = {}
    for mine, part in NAMES.items():
        g = p["qkvo." + mine.rsplit(".", 1)[1]].grad.chunk(4, 0)["qkvo".index(part)]
        out[mine] = g.reshape(g.shape[0], -1) if g.dim() > 1 else g
    out["o_proj.weight"] = p["proj.weight"].grad.flatten(1)
    out["o_proj.bias"] = p["proj.bias"].grad
    out["lepe.conv.weight"], out["lepe.conv.bias"] = p["lepe.weight"].grad, p["lepe.bias"].grad
    return out


def run_both(rope: bool, grid: tuple[int, int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    p = official_params(gen)
    x = torch.randn(B, *grid, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, *grid, DIM, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_forward(p, xo.permute(0, 3, 1, 2), rope).permute(0, 2, 3, 1)
    (y_off * weight).sum().backward()
    attn = al.build("mala", dim=DIM, heads=HEADS, gate="linear", local=True, rope=rope,
                    bias=True).double()
    to_attnlab(attn, p)
    return attn, p, x, weight, y_off, xo


@pytest.mark.parametrize("rope,grid,seed", [(True, (3, 4), 0), (True, (5, 5), 1),
                                            (False, (4, 3), 2)])
def test_mala_equals_the_official_module(rope, grid, seed):
    attn, p, x, weight, y_off, xo = run_both(rope, grid, seed)
    official = grads_of_official(attn, p)
    # compare_with_official copies by name: give it the already mapped tensors
    mapped = {}
    for mine, t in attn.named_parameters():
        mapped[mine] = t.detach().clone().requires_grad_()
        mapped[mine].grad = official[mine]
    compare_with_official(attn, mapped, {n: n for n in mapped}, x, weight, y_off, xo)


def test_mala_defaults():
    """Default: the MALA core alone (no gate, LePE or RoPE: backbone parts, see the page);
    eps 1e-6 as the official; the parts it adds carry PyTorch's init as the official module's
    own convolutions do (uniform within 1 / sqrt(fan_in))."""
    attn = al.build("mala", dim=DIM, heads=HEADS)
    assert attn.eps == 1e-6 and attn.lepe is None and not attn.uses_rope
    assert not any("gate" in n for n, _ in attn.named_parameters())
    full = al.build("mala", dim=64, heads=4, gate="linear", local=True, rope=True, bias=True)
    lepe = full.lepe.conv.weight
    assert lepe.shape == (64, 1, 5, 5) and lepe.abs().max() <= 1 / 5
    assert lepe.std() > 0.8 / 5 / math.sqrt(3)  # uniform(-1/5, 1/5): std 0.115
    assert full.gate.proj.weight.abs().max() <= 64 ** -0.5
    causal = al.build("mala", dim=DIM, heads=HEADS, local=True, causal=True)
    assert causal.lepe.conv.weight.shape == (DIM, 1, 5)  # over the last 5 tokens


def _full(causal: bool):
    torch.manual_seed(0)
    attn = al.build("mala", dim=DIM, heads=HEADS, gate="linear", local=True, rope=True,
                    bias=True, causal=causal).double()
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, :3], keep[1, -4:] = False, False
    return attn, torch.randn(2, 13, DIM, dtype=torch.float64), keep


@pytest.mark.parametrize("causal", [False, True])
def test_mala_official_parts_keep_the_contract(causal):
    """local=True is in no registered variant (the conformance suite runs every variant with
    context=, which LePE refuses), so its contract is checked here: padding invariance and,
    causal, decode = full forward (the LePE's last inputs travel in the state)."""
    attn, x, keep = _full(causal)
    y = attn(x, mask=keep)
    y2 = attn(torch.where(keep[..., None], x, float("nan")), mask=keep)
    torch.testing.assert_close(y2[keep], y[keep], rtol=1e-12, atol=1e-12)
    if causal:
        state = attn.new_state(batch_size=2)
        parts = [attn(x[:, :6], mask=keep[:, :6], state=state)]
        parts += [attn(x[:, t:t + 1], mask=keep[:, t:t + 1], state=state) for t in range(6, 13)]
        torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="self-attention"):
            al.build("mala", dim=DIM, heads=HEADS, local=True).double()(x, context=x)
