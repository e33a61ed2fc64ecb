"""Mixture-of-Head attention: shared heads always on, routed heads chosen per token."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.common import at_least_float32, tracing
from attnlab.ops.softmax import softmax_attention, softmax_weights
from attnlab.ops.tiled import MIN_ROWS, TILE_ELEMENTS, row_tiles


@register("moh", family="head-mixing",
          paper="MoH: Multi-Head Attention as Mixture-of-Head Attention", causal=True,
          bidirectional=True, decode=True, domains=("image", "seq"), complexity="n^2 d (s+k)/H",
          weights=True, cross=False, unsupported=("gate",),
          variants=({"shared_heads": 1, "top_k": 1}, {"shared_heads": 2, "top_k": 2,
                                                      "kv_heads": 2}))
class MixtureOfHeadAttention(Attention):
    """Softmax attention whose heads are experts: h_s shared heads plus top-k routed heads.

    "MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin et al., 2024):
    routed heads: p = softmax(W_r x), keep the top-k, renormalise, times k; shared heads:
    softmax(W_s x) * h_s; [a1, a2] = 2 softmax(W_h x) scale the shared and routed gates;
    O = W_O concat_h(g_h head_h), so exactly h_s + k gates are non-zero per token.
    In eval mode a routed head is computed only for the tokens that selected it, a tile of
    those rows at a time (memory linear in L); traced (``torch.compile``, ``torch.export``),
    where the number of such rows is data-dependent, every row is computed and the zero
    gates drop the others (the training form: the same output up to rounding). The
    load-balance loss E * sum_i mean_t(p_i) * mean_t(1[i in top-k]) (E routed heads), times
    ``balance_weight`` = 0.01, is ``extra_loss()``. ``weights()`` folds the gates into the rows.

    Official code (SkyworkAI/MoH @ 2cefd57, MoH-DiT/models.py ``MoHAttention``, the same
    gating as MoH-ViT/attention.py ``Attention``): equal to 1e-15 of scale in float64, output,
    input and parameter gradients and the loss (tests/parity/test_moh.py), parameters mapped
    wg -> ``router``, wg_0 -> ``mix``, wg_1 -> ``shared_router``. As there: with no shared
    head the gates are the routed ones alone (no ``mix``), one shared head has gate 1 (no
    ``shared_router``), the top-k sum is clamped at the dtype's eps. Remaining differences
    (docs/mechanisms/moh.md): the official averages the loss over layers (pass
    ``balance_weight=0.01 / depth``), routes in at least float32, and also has all-shared
    layers (no routed head), which attnlab does not build.
    """

    rows_per_tile: int | None = None  # packed query rows per tile in eval; None: by memory

    arguments: ClassVar[dict[str, Arg]] = {
        "shared_heads": Arg("int", optional=True, low=0),
        "top_k": Arg("int", optional=True, low=1),
        "balance_weight": Arg("float", low=0),
    }

    def __init__(self, dim: int, heads: int, *, shared_heads: int | None = None,
                 top_k: int | None = None, balance_weight: float = 0.01, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        shared = max(1, heads // 4) if shared_heads is None else shared_heads
        routed = heads - shared
        top_k = max(1, routed // 2) if top_k is None else top_k
        if not 0 <= shared < heads or not 1 <= top_k <= routed:
            raise ValueError(f"moh: need 0 <= shared_heads < heads and 1 <= top_k <= routed "
                             f"heads, got shared_heads={shared}, top_k={top_k}, heads={heads}")
        self.shared_heads, self.top_k, self.balance_weight = shared, top_k, balance_weight
        self.router = nn.Linear(dim, routed, bias=False)  # official wg
        # official wg_1: only for two or more shared heads (one shared head's gate is 1)
        self.shared_router = nn.Linear(dim, shared, bias=False) if shared > 1 else None
        # official wg_0: the shared/routed mix exists only when there are shared heads
        self.mix = nn.Linear(dim, 2, bias=False) if shared else None
        self.rows_computed = 0  # query rows x heads the last forward computed (eval mode)

    def gates(self, x: Tensor) -> Tensor:
        """(B, L, H) head gates, zero for the routed heads a token did not select."""
        p = torch.softmax(_logits(self.router, x), -1)
        top = p.topk(self.top_k, dim=-1)
        chosen = torch.zeros_like(p).scatter_(-1, top.indices, 1.0)
        routed = chosen * p
        # the official clamps the denominator at the dtype's eps (all top-k underflowed)
        denom = routed.sum(-1, keepdim=True).clamp_min(torch.finfo(routed.dtype).eps)
        routed = routed / denom * self.top_k
        if self.training:
            e = p.shape[-1]
            load = (p.mean((0, 1)) * chosen.mean((0, 1))).sum() * e
            self._extra_loss = self.balance_weight * load
        if self.mix is None:  # no shared heads: the routed gates alone, no 2 softmax(W_h x)
            return routed.to(x.dtype)
        if self.shared_router is None:  # one shared head: softmax over one logit = 1
            shared = routed.new_ones(*routed.shape[:-1], 1)
        else:
            shared = torch.softmax(_logits(self.shared_router, x), -1) * \
                self.shared_heads
        a = 2 * torch.softmax(_logits(self.mix, x), -1)
        return torch.cat([a[..., :1] * shared, a[..., 1:] * routed], -1).to(x.dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        g = self.gates(call.x).transpose(1, 2).unsqueeze(-1)  # (B, H, L, 1)
        if self.training or tracing():
            # traced (torch.compile, torch.export) the dense form as well: the packed rows
            # of _sparse have data-dependent counts; the gates zero the same rows
            out = softmax_attention(q, k, v, causal=self.causal, mask=call.op_mask)
            self.rows_computed = q.shape[0] * q.shape[1] * q.shape[2]
            return out * g
        return self._sparse(q, k, v, call, g)

    def _sparse(self, q: Tensor, k: Tensor, v: Tensor, call: Call, g: Tensor) -> Tensor:
        """Each head only for the query rows whose gate is non-zero (packed per head)."""
        b, h, lq, _ = q.shape
        k, v = self.expand_kv(k), self.expand_kv(v)
        out = q.new_zeros(b, h, lq, v.shape[-1])
        keys = torch.arange(k.shape[2], device=q.device)
        self.rows_computed = 0
        for head in range(h):
            on = g[:, head, :, 0] != 0  # (B, L)
            count = on.sum(-1)
            n = int(count.max())
            if n == 0:
                continue
            self.rows_computed += int(count.sum())
            # the selected rows first, in order (stable sort), then padding rows
            order = torch.sort((~on).to(torch.int8), dim=-1, stable=True).indices[:, :n]
            valid = torch.arange(n, device=q.device)[None, :] < count[:, None]  # (B, n)
            # the packed rows a tile at a time: a (rows, Lk) mask, never (n, Lk)
            tile = self.rows_per_tile or max(MIN_ROWS, TILE_ELEMENTS // (b * k.shape[2]))
            for r0, r1 in row_tiles(n, tile):
                idx = order[:, r0:r1]
                rows = q[:, head].gather(1, idx[..., None].expand(-1, -1, q.shape[-1]))
                vis = valid[:, r0:r1, None].expand(-1, -1, k.shape[2])
                if self.causal:
                    pos = call.index[idx]  # (B, rows) places in the sequence
                    vis = vis & (keys[None, None, :] <= pos[..., None])
                if call.key_mask is not None:
                    vis = vis & call.key_mask[:, None, :]
                part = softmax_attention(rows[:, None], k[:, head:head + 1],
                                         v[:, head:head + 1], mask=vis[:, None])[:, 0]
                part = part * valid[:, r0:r1, None]
                out[:, head].scatter_(1, idx[..., None].expand(-1, -1, v.shape[-1]), part)
        return out * g

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        g = self.gates(call.x).transpose(1, 2).unsqueeze(-1)
        w = softmax_weights(q, k, causal=self.causal, mask=call.op_mask)
        return w * g


def _logits(layer: nn.Linear, x: Tensor) -> Tensor:
    """A router's logits computed in at least float32, inputs and weights, also under
    autocast (in bf16, 9 of 2048 tokens chose other heads than in float32)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(at_least_float32(x), at_least_float32(layer.weight))
