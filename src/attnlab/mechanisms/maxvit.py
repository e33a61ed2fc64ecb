"""Multi-axis attention of MaxViT: block (local window) and grid (dilated global) attention."""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.spatial import grid_of
from attnlab.ops.softmax import softmax_attention, softmax_weights

AXES = ("block", "grid", "block+grid")


class Partition:
    """Tokens of an (H, W) grid, padded to multiples of the group shape, arranged in groups.

    ``block``: non-overlapping p_h x p_w windows; ``grid``: a p_h x p_w grid of tokens
    strided by (H / p_h, W / p_w). ``order`` (groups * size,) lists the padded token index of
    each (group, slot); ``slot_rc`` the slot's (row, col) inside the group; ``where`` (L,)
    the (group * size + slot) position of every real token.
    """

    def __init__(self, grid: tuple[int, int], size: int, kind: str, device) -> None:
        self.p = tuple(min(size, g) for g in grid)  # the group's shape
        self.n = tuple(-(-g // p) for g, p in zip(grid, self.p, strict=True))  # groups per axis
        self.padded = tuple(n * p for n, p in zip(self.n, self.p, strict=True))
        gi = torch.arange(self.n[0], device=device).view(-1, 1, 1, 1)
        gj = torch.arange(self.n[1], device=device).view(1, -1, 1, 1)
        a = torch.arange(self.p[0], device=device).view(1, 1, -1, 1)
        b = torch.arange(self.p[1], device=device).view(1, 1, 1, -1)
        if kind == "block":
            rows, cols = gi * self.p[0] + a, gj * self.p[1] + b
        else:
            rows, cols = a * self.n[0] + gi, b * self.n[1] + gj
        self.order = (rows * self.padded[1] + cols).reshape(-1)
        self.groups, self.size = self.n[0] * self.n[1], self.p[0] * self.p[1]
        self.slot_rc = torch.stack(torch.broadcast_tensors(a, b), -1).reshape(-1, 2)
        # the real (unpadded) tokens in padded coordinates
        r = torch.arange(grid[0], device=device)[:, None]
        c = torch.arange(grid[1], device=device)[None, :]
        self.real = (r * self.padded[1] + c).reshape(-1)
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(len(self.order), device=device)
        self.where = inverse[self.real]


class RelativeBias(nn.Module):
    """Learnable bias table (heads, 2P - 1, 2P - 1) over relative (row, col) offsets."""

    def __init__(self, heads: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.table = nn.Parameter(torch.zeros(heads, 2 * size - 1, 2 * size - 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official trunc-normal table, std 0.02."""
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, slot_rc: Tensor) -> Tensor:
        """(S, 2) slot coordinates -> (heads, S, S) bias."""
        d = slot_rc[:, None, :] - slot_rc[None, :, :] + self.size - 1
        return self.table[:, d[..., 0], d[..., 1]]


@register("maxvit", family="local", paper="MaxViT: Multi-Axis Vision Transformer",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n (P^2+G^2) d", weights=True, cross=False,
          variants=({"axis": "block", "window": 2}, {"axis": "grid", "grid": 2},
                    {"window": 3, "grid": 2}))
class MaxViTAttention(Attention):
    """Multi-axis attention: block attention in P x P windows and grid attention on a G x G
    grid of tokens spread over the whole image.

    "MaxViT: Multi-Axis Vision Transformer" (Tu et al., 2022): block attention partitions the
    (H, W) tokens into (H/P x W/P) windows of P x P and attends inside each; grid attention
    partitions them into a G x G grid with stride (H/G, W/G) and attends inside each grid
    group, a sparse global mixing. Each has a relative position bias table
    B in R^{heads x (2P-1) x (2P-1)}: O = softmax(c Q K^T + B) V within a group.
    ``axis="block"`` or ``"grid"`` is one of the paper's two attentions (MaxViT stacks block
    then grid); ``"block+grid"`` (default) gives half the heads to each, so that one module
    sees its window and its grid group at once (two such layers reach every token). Sizes
    that do not divide the image are padded (padded keys are
    invisible). A sequence is a 1 x L grid.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "window": Arg("int", low=1),
        "grid": Arg("int", low=1),
        "axis": Arg("str", choices=AXES),
    }

    def __init__(self, dim: int, heads: int, *, window: int = 7, grid: int = 7,
                 axis: str = "block+grid", **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        if axis == "block+grid" and heads < 2:
            raise ValueError("maxvit: axis='block+grid' splits the heads and needs heads >= 2")
        self.axis, self.window, self.grid = axis, window, grid
        split = heads // 2 if axis == "block+grid" else heads
        self.parts: list[tuple[str, int, int]] = []  # (kind, first head, number of heads)
        if axis in ("block", "block+grid"):
            self.parts.append(("block", 0, split))
        if axis in ("grid", "block+grid"):
            first = split if axis == "block+grid" else 0
            self.parts.append(("grid", first, heads - first))
        self.bias = nn.ModuleDict({kind: RelativeBias(n, window if kind == "block" else grid)
                                   for kind, _, n in self.parts})

    def _partition(self, kind: str, call: Call, length: int, device) -> Partition:
        size = self.window if kind == "block" else self.grid
        return Partition(grid_of(length, call.spatial), size, kind, device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        k, v = self.expand_kv(k), self.expand_kv(v)
        b, _, length, _ = q.shape
        outs = []
        for kind, first, n in self.parts:
            part = self._partition(kind, call, length, q.device)
            padded = math.prod(part.padded)

            def grouped(t: Tensor, part=part, first=first, n=n, padded=padded) -> Tensor:
                full = t.new_zeros(b, n, padded, t.shape[-1])
                full[:, :, part.real] = t[:, first:first + n]
                return full[:, :, part.order].view(b, n * part.groups, part.size, -1)

            keep = torch.zeros(b, padded, dtype=torch.bool, device=q.device)
            keep[:, part.real] = True if call.key_mask is None else call.key_mask
            mask = keep[:, part.order].view(b, 1, part.groups, 1, part.size)
            mask = mask.expand(b, n, -1, -1, -1).reshape(b, n * part.groups, 1, part.size)
            bias = self.bias[kind](part.slot_rc).to(q.dtype)  # (n, S, S)
            bias = bias[:, None].expand(-1, part.groups, -1, -1).reshape(
                1, n * part.groups, part.size, part.size)
            out = softmax_attention(grouped(q), grouped(k), grouped(v), mask=mask, bias=bias)
            out = out.reshape(b, n, padded, -1)[:, :, part.where]
            outs.append(out)
        return torch.cat(outs, 1)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        k = self.expand_kv(k)
        length = q.shape[2]
        weights = []
        for kind, first, n in self.parts:
            part = self._partition(kind, call, length, q.device)
            group, slot = part.where // part.size, part.where % part.size
            vis = (group[:, None] == group[None, :])[None, None]
            bias = self.bias[kind](part.slot_rc)[:, slot][:, :, slot]  # (n, L, L)
            if call.key_mask is not None:
                vis = vis & cast(Tensor, call.op_mask)
            weights.append(softmax_weights(q[:, first:first + n], k[:, first:first + n],
                                           mask=vis, bias=bias))
        return torch.cat(weights, 1)
