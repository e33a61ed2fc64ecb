"""Agent attention."""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import SQUARE, Arg, deprecated_alias, is_square
from attnlab.core.call import Call
from attnlab.core.masks import key_padding_to_op
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import HeadShape, split_heads
from attnlab.modules.reset import reset_module
from attnlab.modules.spatial import DepthwiseConv, grid_of, masked_pool
from attnlab.ops.softmax import softmax_weights

BIAS_STD = 0.02  # the official trunc_normal_(std=.02) of every bias table


@register("agent", family="linear",
          paper="Agent Attention: On the Integration of Softmax and Linear Attention",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n m d", weights=True, cross=False, weights_exact=False,
          variants=({"local": False}, {"agents": 4}, {"position_bias": False}))
class AgentAttention(Attention):
    """Agent attention: m agent tokens aggregate from the keys, then broadcast to the queries.

    "Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV
    2024; official module ``AgentAttention`` of LeapLabTHU/Agent-Attention, Agent-Swin
    variant). A = pool(Q) to m agents (adaptive average pooling on the token grid, over real
    tokens; m = ``agents`` = 49 = 7 x 7 by default), per head with c = d^-1/2:

        V_A = softmax(c A K^T + B1) V,    O = softmax(c Q A^T + B2) V_A + DWC(V),

    B1[a, (i, j)] = resize(T1)[a, i, j] + r1[a, i] + s1[a, j] (agent -> key) and
    B2[(i, j), a] = resize(T2)[a, i, j] + r2[i, a] + s2[j, a] (query -> agent): (m, 7, 7)
    tables resized bilinearly to the token grid plus separable row and column biases sized
    for ``window`` (resized linearly when the grid differs), all initialised N(0, 0.02^2)
    (``position_bias=False``: none). DWC is a 3 x 3 depthwise convolution with bias on V
    (``local``; the ``local_term``). ``sr_ratio`` > 1 (Agent-PVT): keys and values are
    projected from LayerNorm(Conv_{r x r, stride r}(x)) (a grid not divisible by r is
    zero-padded to whole cells) and V is resized bilinearly back to the grid before DWC.
    ``cls_token=True`` (Agent-DeiT): the first token is a class token off the grid (input a
    sequence of 1 + s^2 tokens): a key and a query of the agents with its own biases (ac:
    agent -> class token, ca: class token -> agent), not pooled into agents, no DWC.
    ``bias`` (q, k, v and output projections) is on by default, as the official
    ``qkv_bias=True`` of every released model. The implied n x n matrix
    softmax(cQA^T + B2) softmax(cAK^T + B1) is non-negative with rows summing to 1.
    """

    # position-bias tables, made by setattr in __init__ (declared for the type checker)
    bias_to_keys: nn.Parameter
    bias_to_agents: nn.Parameter
    keys_row_bias: nn.Parameter
    keys_col_bias: nn.Parameter
    agents_row_bias: nn.Parameter
    agents_col_bias: nn.Parameter
    keys_cls_bias: nn.Parameter
    agents_cls_bias: nn.Parameter

    arguments: ClassVar[dict[str, Arg]] = {
        "agents": Arg("int", low=1, rule=SQUARE, test=is_square),
        "window": Arg("int_or_ints", low=1, length=2),
        "local": Arg("bool"),
        "position_bias": Arg("bool"),
        "sr_ratio": Arg("int", low=1),
        "cls_token": Arg("bool"),
        "dwconv": Arg("bool", optional=True),
        "bias": Arg("bool"),  # a common argument, declared here for its default True
    }

    def __init__(self, dim: int, heads: int, *, agents: int = 49,
                 window: int | tuple[int, int] = 14, local: bool = True,
                 position_bias: bool = True, sr_ratio: int = 1, cls_token: bool = False,
                 dwconv: bool | None = None, bias: bool = True, **kwargs) -> None:
        local = deprecated_alias("agent", "dwconv", dwconv, "local", local, True)
        if cls_token and sr_ratio > 1:
            raise ValueError("agent: cls_token=True (Agent-DeiT) takes no sr_ratio > 1")
        if sr_ratio > 1:
            kwargs["projection"] = lambda shape: ReducedKVProjection(shape, sr_ratio)
        super().__init__(dim, heads, bias=bias, **kwargs)
        side = math.isqrt(agents)
        self.agents, self.agent_grid, self.sr_ratio = agents, (side, side), sr_ratio
        self.cls_token = cls_token
        self.window = (window, window) if isinstance(window, int) else tuple(window)
        self._make_biases(position_bias)
        self.dwconv = DepthwiseConv(self.kv_heads * self.head_dim, 3) if local else None
        self.weights_reproduce_output = not local

    def _make_biases(self, on: bool) -> None:
        """The official tables (an, na, ah, aw, ha, wa), or none; key-side ones at the key
        grid (the window divided by ``sr_ratio``)."""
        self.position_bias = on
        if not on:
            return
        h, m, (wh, ww), r = self.heads, self.agents, self.window, self.sr_ratio
        shapes = {"bias_to_keys": (h, m, 7, 7), "bias_to_agents": (h, m, 7, 7),
                  "keys_row_bias": (h, m, max(wh // r, 1)),
                  "keys_col_bias": (h, m, max(ww // r, 1)),
                  "agents_row_bias": (h, wh, m), "agents_col_bias": (h, ww, m)}
        if self.cls_token:  # Agent-DeiT's ac (agent -> class token), ca (class token -> agent)
            shapes |= {"keys_cls_bias": (h, m), "agents_cls_bias": (h, m)}
        self._bias_tables = tuple(shapes)
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self._init_biases()

    def _init_biases(self) -> None:
        """The official trunc-normal tables, drawn in construction order."""
        with torch.no_grad():
            for name in getattr(self, "_bias_tables", ()) if self.position_bias else ():
                nn.init.trunc_normal_(getattr(self, name), std=BIAS_STD)

    def _reset_own(self) -> None:
        self._init_biases()
        if self.dwconv is not None:
            reset_module(self.dwconv)

    def _key_bias(self, grid: tuple[int, int]) -> Tensor | None:
        """B1 (heads, m, n): agent -> key bias on the key grid."""
        if not self.position_bias:
            return None
        table = _resize2d(self.bias_to_keys, grid)
        rows = _resize1d(self.keys_row_bias, grid[0])[..., :, None]
        cols = _resize1d(self.keys_col_bias, grid[1])[..., None, :]
        out = (table + rows + cols).flatten(2)
        return torch.cat([self.keys_cls_bias[..., None], out], 2) if self.cls_token else out

    def _agent_bias(self, grid: tuple[int, int]) -> Tensor | None:
        """B2 (heads, n, m): query -> agent bias on the query grid."""
        if not self.position_bias:
            return None
        table = _resize2d(self.bias_to_agents, grid).permute(0, 2, 3, 1)
        rows = _resize1d(self.agents_row_bias.transpose(1, 2), grid[0]).transpose(1, 2)
        cols = _resize1d(self.agents_col_bias.transpose(1, 2), grid[1]).transpose(1, 2)
        out = (table + rows[:, :, None, :] + cols[:, None, :, :]).flatten(1, 2)
        return torch.cat([self.agents_cls_bias[:, None], out], 1) if self.cls_token else out

    def _patch_grid(self, length: int, call: Call) -> tuple[int, int]:
        """The grid of the patch tokens: all tokens, or (with ``cls_token``) all but the
        first, which then must be s x s (Agent-DeiT: a sequence of 1 + s^2 tokens)."""
        if not self.cls_token:
            return grid_of(length, call.spatial)
        side = math.isqrt(max(length - 1, 0))
        if call.spatial is not None or length < 2 or side * side != length - 1:
            raise ValueError(f"agent: cls_token=True takes a sequence (B, 1 + s^2, C) of a "
                             f"class token and s x s patches, got {length} tokens"
                             f"{'' if call.spatial is None else f' on {call.spatial}'}")
        return side, side

    def _patches(self, t: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, H, L, D) tokens and (B, L) mask without the class token (if any)."""
        if not self.cls_token:
            return t, keep
        return t[:, :, 1:], None if keep is None else keep[:, 1:]

    def _parts(self, q: Tensor, k: Tensor, call: Call) -> tuple[Tensor, Tensor]:
        """softmax(c Q A^T + B2) (B, H, n, m) and softmax(c A K^T + B1) (B, H, m, n_k)."""
        grid = self._patch_grid(q.shape[2], call)
        agents = masked_pool(*self._patches(q, call.key_mask), grid, self.agent_grid)
        keep, kgrid = self._key_keep(call, grid)
        to_keys = softmax_weights(agents, k, mask=key_padding_to_op(keep),
                                  bias=self._key_bias(kgrid))
        to_agents = softmax_weights(q, agents, bias=self._agent_bias(grid))
        return to_agents, to_keys

    def _key_keep(self, call: Call, grid: tuple[int, int]
                  ) -> tuple[Tensor | None, tuple[int, int]]:
        """The keys' padding mask and grid (reduced by ``sr_ratio``: a reduced key is real
        when one of its r x r tokens is)."""
        if self.sr_ratio == 1:
            return call.key_mask, grid
        return reduced_keep(call.key_mask, grid, self.sr_ratio), reduced_grid(grid,
                                                                              self.sr_ratio)

    def _qkv(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        if self.sr_ratio == 1:
            return super()._qkv(call)
        q, k, v = self.qkv(call)  # the projection zeroes padding before the reduction
        keep, _ = self._key_keep(call, grid_of(call.x.shape[1], call.spatial))
        if keep is not None:
            pad = ~keep[:, None, :, None]
            k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
            key_mask = cast(Tensor, call.key_mask)  # keep is made from it
            q = q.masked_fill(~key_mask[:, None, :, None] & ~torch.isfinite(q), 0)
        q, k, v = self.prepare(q, k, v, call)
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        to_agents, to_keys = self._parts(q, k, call)
        return to_agents.to(v.dtype) @ (to_keys.to(v.dtype) @ self.expand_kv(v))

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        to_agents, to_keys = self._parts(q, k, call)
        return to_agents @ to_keys

    def local_term(self, v: Tensor, call: Call) -> Tensor | None:
        if self.dwconv is None:
            return None
        grid = self._patch_grid(call.x.shape[1], call)
        v, keep = self._patches(v, call.key_mask)
        flat = v.transpose(1, 2).flatten(2)  # (B, L_k, H_kv * D)
        if self.sr_ratio > 1:
            img = flat.transpose(1, 2).unflatten(2, reduced_grid(grid, self.sr_ratio))
            img = F.interpolate(img, size=grid, mode="bilinear", align_corners=False)
            flat = img.flatten(2).transpose(1, 2)
        out = self.dwconv(flat, grid, keep)
        if self.cls_token:  # no convolution reaches the class token
            out = F.pad(out, (0, 0, 1, 0))
        return self.expand_kv(self.split_heads(out, self.kv_heads))


class ReducedKVProjection(nn.Module):
    """Agent-PVT's projections: q from x; k and v from LayerNorm(Conv_{r x r, stride r}(x))
    on the token grid (padded tokens are zeroed before the convolution, and the grid is
    zero-padded to whole r x r cells)."""

    def __init__(self, shape: HeadShape, ratio: int) -> None:
        super().__init__()
        self.shape, self.ratio = shape, ratio
        self.q = nn.Linear(shape.dim, shape.heads * shape.qk_dim, bias=shape.bias)
        self.k = nn.Linear(shape.dim, shape.kv_heads * shape.qk_dim, bias=shape.bias)
        self.v = nn.Linear(shape.dim, shape.kv_heads * shape.head_dim, bias=shape.bias)
        self.sr = nn.Conv2d(shape.dim, shape.dim, ratio, stride=ratio)
        self.norm = nn.LayerNorm(shape.dim)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, s = call.x, self.shape
        grid = grid_of(x.shape[1], call.spatial)
        src = x if call.key_mask is None else x.masked_fill(~call.key_mask[..., None], 0)
        img = _pad_to_cells(src.transpose(1, 2).unflatten(2, grid), self.ratio)
        src = self.norm(self.sr(img).flatten(2).transpose(1, 2))
        return (split_heads(self.q(x), s.heads), split_heads(self.k(src), s.kv_heads),
                split_heads(self.v(src), s.kv_heads))


def _pad_to_cells(img: Tensor, ratio: int) -> Tensor:
    """(B, C, H, W) zero-padded at the bottom and right to whole ``ratio`` x ``ratio`` cells
    (the official code needs grids divisible by the ratio; a sequence is a 1 x L grid)."""
    return F.pad(img, (0, -img.shape[-1] % ratio, 0, -img.shape[-2] % ratio))


def reduced_grid(grid: tuple[int, int], ratio: int) -> tuple[int, int]:
    """The key grid after the stride-``ratio`` convolution over whole cells."""
    return -(-grid[0] // ratio), -(-grid[1] // ratio)


def reduced_keep(keep: Tensor | None, grid: tuple[int, int], ratio: int) -> Tensor | None:
    """(B, L) real-token mask -> (B, L_k): a reduced key is real when one of its tokens is."""
    if keep is None:
        return None
    img = _pad_to_cells(keep.to(torch.float32).unflatten(1, grid)[:, None], ratio)
    return F.max_pool2d(img, ratio, stride=ratio).flatten(1) > 0


def _resize2d(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """(heads, m, h, w) -> (heads, m, *grid), bilinear (the official interpolate)."""
    if tuple(table.shape[-2:]) == tuple(grid):
        return table
    return F.interpolate(table, size=grid, mode="bilinear", align_corners=False)


def _resize1d(table: Tensor, size: int) -> Tensor:
    """(heads, m, w) -> (heads, m, size): linear along the last axis (identity at its size)."""
    if table.shape[-1] == size:
        return table
    return F.interpolate(table, size=size, mode="linear", align_corners=False)
