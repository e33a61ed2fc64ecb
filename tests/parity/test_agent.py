"""agent against the official Agent Attention module (LeapLabTHU/Agent-Attention @ 207ce3e,
agent_transformer/models/agent_swin.py ``AgentAttention``; the Agent-PVT variant of
agent_transformer/models/agent_pvt.py ``AgentAttention`` with ``sr_ratio``, and the Agent-DeiT
variant of agent_transformer/models/agent_deit.py ``AgentAttention`` with its class token).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: a fused ``qkv`` (Swin) or ``q`` and ``kv`` (PVT, with ``sr`` and ``norm``
when sr_ratio > 1), ``proj``, the depthwise ``dwc`` and the six bias tables ``an_bias``,
``na_bias`` (heads, m, 7, 7), ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias`` (separable,
sized for the window), and DeiT's class-token biases ``ac_bias`` (1, heads, m, 1) and
``ca_bias`` (1, heads, 1, m).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="agent",
    code="LeapLabTHU/Agent-Attention @ 207ce3e, agent_transformer/models/agent_swin.py, "
         "AgentAttention",
    differences=(
        "grids other than `window`: the separable bias tables are resized linearly (the "
        "official sizes them for one resolution and fails on another; deliberate, the "
        "contract takes any grid and sequences)",
        "a key padding mask is accepted: agents pool real tokens, padded keys are hidden "
        "(contract; the official has none)",
    ),
)

B, DIM = 2, 24


def official_params(heads: int, agents: int, window: int, sr: int, qkv_bias: bool,
                    gen: torch.Generator, scale: float = 1.0,
                    cls: bool = False) -> dict[str, torch.Tensor]:
    """A random state dict in the official layout (Swin's fused qkv when sr == 0, PVT's q
    and kv otherwise; ``cls``: DeiT's, Swin's with ac/ca); ``scale``: the bias tables' std
    (trained scale ~1)."""
    def w(*shape, std=None):
        std = shape[-1] ** -0.5 if std is None else std
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    kw = window // max(sr, 1)
    p = {"proj.weight": w(DIM, DIM), "proj.bias": w(DIM),
         "dwc.weight": w(DIM, 1, 3, 3, std=0.3), "dwc.bias": w(DIM),
         "an_bias": w(heads, agents, 7, 7, std=scale), "na_bias": w(heads, agents, 7, 7,
                                                                    std=scale),
         "ah_bias": w(1, heads, agents, kw, 1, std=scale),
         "aw_bias": w(1, heads, agents, 1, kw, std=scale),
         "ha_bias": w(1, heads, window, 1, agents, std=scale),
         "wa_bias": w(1, heads, 1, window, agents, std=scale)}
    if cls:
        p["ac_bias"] = w(1, heads, agents, 1, std=scale)
        p["ca_bias"] = w(1, heads, 1, agents, std=scale)
    if sr == 0:
        p["qkv.weight"] = w(3 * DIM, DIM)
        if qkv_bias:
            p["qkv.bias"] = w(3 * DIM)
    else:
        p["q.weight"], p["kv.weight"] = w(DIM, DIM), w(2 * DIM, DIM)
        if qkv_bias:
            p["q.bias"], p["kv.bias"] = w(DIM), w(2 * DIM)
    if sr > 1:
        p.update({"sr.weight": w(DIM, DIM, sr, sr, std=(DIM * sr * sr) ** -0.5),
                  "sr.bias": w(DIM), "norm.weight": 1 + w(DIM, std=0.2),
                  "norm.bias": w(DIM, std=0.2)})
    return {k: leaf(v) for k, v in p.items()}


def _lin(p, name, x):
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def _project(p, x, side):
    """q (b, n, c) and k, v (b, n_k, c) of either layout; the key grid's side."""
    if "qkv.weight" in p:
        q, k, v = _lin(p, "qkv", x).chunk(3, -1)
        return q, k, v, side
    q = _lin(p, "q", x)
    src = x
    if "sr.weight" in p:
        r = p["sr.weight"].shape[-1]
        img = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        red = F.conv2d(img, p["sr.weight"], p["sr.bias"], stride=r).flatten(2).transpose(1, 2)
        src = F.layer_norm(red, (x.shape[2],), p["norm.weight"], p["norm.bias"], eps=1e-5)
        side = side // r
    k, v = _lin(p, "kv", src).chunk(2, -1)
    return q, k, v, side


def _heads(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def official_forward(p: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """One official AgentAttention (Swin, PVT or DeiT layout, chosen by the keys) on x
    (b, n, c), n = side^2 (DeiT: 1 + side^2) and side the window the tables are sized for."""
    b, n, c = x.shape
    side, agents = math.isqrt(n), p["an_bias"].shape[1]
    cls = int("ac_bias" in p)
    scale = (c // heads) ** -0.5
    q, k, v, kside = _project(p, x, side)
    pooled = F.adaptive_avg_pool2d(q[:, cls:].transpose(1, 2).reshape(b, c, side, side),
                                   math.isqrt(agents))
    a = _heads(pooled.reshape(b, c, agents).transpose(1, 2), heads)
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)

    b1 = F.interpolate(p["an_bias"], size=(kside, kside), mode="bilinear").reshape(
        heads, agents, -1) + (p["ah_bias"] + p["aw_bias"]).reshape(heads, agents, -1)
    if cls:
        b1 = torch.cat([p["ac_bias"][0], b1], -1)
    agent_v = torch.softmax((a * scale) @ k.transpose(-1, -2) + b1, -1) @ v
    b2 = F.interpolate(p["na_bias"], size=(side, side), mode="bilinear").reshape(
        heads, agents, -1).transpose(1, 2) + (p["ha_bias"] + p["wa_bias"]).reshape(
        heads, n - cls, agents)
    if cls:
        b2 = torch.cat([p["ca_bias"][0], b2], -2)
    out = (torch.softmax((q * scale) @ a.transpose(-1, -2) + b2, -1) @ agent_v)
    out = out.transpose(1, 2).reshape(b, n, c)
    vimg = v[:, :, cls:].transpose(1, 2).reshape(b, kside, kside, c).permute(0, 3, 1, 2)
    if kside != side:
        vimg = F.interpolate(vimg, size=(side, side), mode="bilinear")
    conv = F.conv2d(vimg, p["dwc.weight"], p["dwc.bias"], padding=1, groups=c)
    out = torch.cat([out[:, :cls], out[:, cls:] + conv.flatten(2).transpose(1, 2)], 1)
    return _lin(p, "proj", out)


def _rows(i):
    return lambda t: t.chunk(3, 0)[i]


def _kv(i):
    return lambda t: t.chunk(2, 0)[i]


def weight_map(p: dict[str, torch.Tensor], heads: int) -> dict[str, tuple[str, object]]:
    """attnlab name -> (official name, official tensor -> attnlab tensor)."""
    def same(t):
        return t

    def flat(axis):  # (1, heads, ..) with one axis of 1 -> (heads, shape[axis], rest)
        return lambda t: t.reshape(heads, t.shape[axis], -1)

    def vec(t):  # DeiT's (1, heads, m, 1) / (1, heads, 1, m) -> (heads, m)
        return t.reshape(heads, -1)
    names = {"o_proj.weight": ("proj.weight", same), "o_proj.bias": ("proj.bias", same),
             "dwconv.conv.weight": ("dwc.weight", same), "dwconv.conv.bias": ("dwc.bias", same),
             "bias_to_keys": ("an_bias", same), "bias_to_agents": ("na_bias", same),
             "keys_row_bias": ("ah_bias", flat(2)), "keys_col_bias": ("aw_bias", flat(2)),
             "agents_row_bias": ("ha_bias", flat(2)), "agents_col_bias": ("wa_bias", flat(3))}
    if "ac_bias" in p:
        names |= {"keys_cls_bias": ("ac_bias", vec), "agents_cls_bias": ("ca_bias", vec)}
    for part in ("weight", "bias"):
        if f"qkv.{part}" in p:
            for i, s in enumerate("qkv"):
                names[f"qkv.{s}.{part}"] = (f"qkv.{part}", _rows(i))
        if f"q.{part}" in p:
            names[f"qkv.q.{part}"] = (f"q.{part}", same)
            names[f"qkv.k.{part}"] = (f"kv.{part}", _kv(0))
            names[f"qkv.v.{part}"] = (f"kv.{part}", _kv(1))
        for mod in ("sr", "norm"):
            if f"{mod}.{part}" in p:
                names[f"qkv.{mod}.{part}"] = (f"{mod}.{part}", same)
    return names


def run_parity(attn, p, heads: int, side: int, gen: torch.Generator) -> dict:
    """Copy p into attn, run both on the same input and loss, compare everything."""
    cls = int("ac_bias" in p)
    n = side * side + cls
    x = torch.randn(B, n, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, n, DIM, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_forward(p, xo, heads)
    (y_off * weight).sum().backward()

    names = weight_map(p, heads)
    own = dict(attn.named_parameters())
    assert set(names) == set(own), "every attnlab parameter mapped"
    assert {n for n, _ in names.values()} == set(p), "every official parameter mapped"
    with torch.no_grad():
        for mine, (theirs, f) in names.items():
            own[mine].copy_(f(p[theirs]))
    xa = leaf(x)
    y = attn(xa) if cls else attn(xa.reshape(B, side, side, DIM)).reshape(B, n, DIM)
    (y * weight).sum().backward()
    pairs = {"out": (y, y_off), "grad x": (xa.grad, xo.grad)}
    for mine, (theirs, f) in names.items():
        pairs[f"grad {mine}"] = (own[mine].grad, f(p[theirs].grad))
    return assert_parity(pairs)


SWIN = [(2, 4, 6, 1.0), (4, 9, 7, 1.0), (3, 9, 14, 0.02), (4, 49, 14, 1.0)]


@pytest.mark.parametrize("heads,agents,window,scale", SWIN)
def test_agent_equals_the_official_swin_module(heads, agents, window, scale):
    gen = torch.Generator().manual_seed(heads * 100 + window)
    p = official_params(heads, agents, window, 0, True, gen, scale)
    attn = al.build("agent", dim=DIM, heads=heads, agents=agents, window=window).double()
    run_parity(attn, p, heads, window, gen)


@pytest.mark.parametrize("sr,window,qkv_bias", [(2, 8, False), (4, 8, True), (1, 6, True)])
def test_agent_equals_the_official_pvt_module(sr, window, qkv_bias):
    gen = torch.Generator().manual_seed(7 * sr + window)
    heads, agents = 3, 4
    p = official_params(heads, agents, window, sr, qkv_bias, gen)
    attn = al.build("agent", dim=DIM, heads=heads, agents=agents, window=window,
                    sr_ratio=sr, bias=qkv_bias).double()
    if not qkv_bias:  # PVT's proj always has a bias; attnlab's bias=False drops it
        attn.o_proj.bias = torch.nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
    run_parity(attn, p, heads, window, gen)


@pytest.mark.parametrize("heads,agents,window", [(3, 4, 5), (4, 49, 14)])
def test_agent_equals_the_official_deit_module(heads, agents, window):
    gen = torch.Generator().manual_seed(heads * 10 + window)
    p = official_params(heads, agents, window, 0, True, gen, cls=True)
    attn = al.build("agent", dim=DIM, heads=heads, agents=agents, window=window,
                    cls_token=True).double()
    run_parity(attn, p, heads, window, gen)


def test_agent_defaults_are_the_official_ones():
    torch.manual_seed(0)
    attn = al.build("agent", dim=96, heads=4)
    assert attn.agents == 49 and attn.window == (14, 14) and attn.sr_ratio == 1
    assert attn.dwconv is not None and attn.dwconv.conv.bias is not None
    assert attn.qkv.q.bias is not None and attn.o_proj.bias is not None  # qkv_bias=True
    shapes = {"bias_to_keys": (4, 49, 7, 7), "bias_to_agents": (4, 49, 7, 7),
              "keys_row_bias": (4, 49, 14), "keys_col_bias": (4, 49, 14),
              "agents_row_bias": (4, 14, 49), "agents_col_bias": (4, 14, 49)}
    for name, shape in shapes.items():
        t = getattr(attn, name).detach()
        assert tuple(t.shape) == shape, name
        assert abs(t.std().item() - 0.02) < 0.002 and abs(t.mean().item()) < 0.002, name
        assert t.abs().max() <= 2.0, name  # timm's trunc_normal_ bounds (a=-2, b=2)


def test_agent_without_position_bias_or_local_term():
    attn = al.build("agent", dim=DIM, heads=2, position_bias=False, local=False)
    names = {n for n, _ in attn.named_parameters()}
    assert names == {"qkv.q.weight", "qkv.q.bias", "qkv.k.weight", "qkv.k.bias",
                     "qkv.v.weight", "qkv.v.bias", "o_proj.weight", "o_proj.bias"}


def test_agent_dwconv_is_a_deprecated_alias_of_local():
    with pytest.warns(FutureWarning, match="local"):
        attn = al.build("agent", dim=DIM, heads=2, dwconv=False)
    assert attn.dwconv is None


@pytest.mark.parametrize("grid", [(7, 5), (1, 9), (8, 8)])
def test_agent_sr_ratio_ignores_what_padding_holds(grid):
    """sr_ratio > 1 is no conformance variant (its keys are r x r cells, not tokens, so
    weights() is (B, H, n, n_k)); padding must still not leak, on any grid."""
    torch.manual_seed(1)
    attn = al.build("agent", dim=DIM, heads=3, agents=4, window=8, sr_ratio=3).double()
    n = grid[0] * grid[1]
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, -4:] = False
    other = x.clone()
    other[0, -4:] = 1e30
    y, y2 = (attn(t, mask=keep, spatial=grid if grid[0] > 1 else None) for t in (x, other))
    assert torch.isfinite(y).all() and (y - y2)[keep].abs().max() == 0
    cells = -(-grid[0] // 3) * -(-grid[1] // 3)
    w = attn.weights(x, mask=keep, spatial=grid if grid[0] > 1 else None)
    assert w.shape == (2, 3, n, cells)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, n, dtype=torch.float64))


def test_agent_cls_token_ignores_what_padding_holds_and_needs_1_plus_s2_tokens():
    torch.manual_seed(2)
    attn = al.build("agent", dim=DIM, heads=3, agents=4, window=5, cls_token=True).double()
    x = torch.randn(2, 26, DIM, dtype=torch.float64)
    keep = torch.ones(2, 26, dtype=torch.bool)
    keep[1, -6:] = False
    other = x.clone()
    other[1, -6:] = float("nan")
    y, y2 = attn(x, mask=keep), attn(other, mask=keep)
    assert torch.isfinite(y).all() and (y - y2)[keep].abs().max() == 0
    torch.testing.assert_close(attn.weights(x, mask=keep).sum(-1),
                               torch.ones(2, 3, 26, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"1 \+ s\^2"):
        attn(torch.randn(2, 25, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="no sr_ratio"):
        al.build("agent", dim=DIM, heads=3, cls_token=True, sr_ratio=2)
