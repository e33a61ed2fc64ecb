"""Ring attention: each rank keeps its queries, the key/value blocks travel around the ring,
and the partial results merge exactly.

"A Unified View of Long-Sequence Models towards Modeling Million-Scale Dependencies"
(distributed multi-head attention). With the sequence split over P ranks, rank r meets the
key block of rank r - s at step s. Per block b and query row i:

- softmax: the split-KV merge of ``ops.decode``: running max m, sum l = sum_j exp(s_ij - m)
  and output acc, rescaled by exp(m_old - m_new) when a block raises the max;
  out = acc / l, and the backward recomputes p_ij = exp(s_ij - lse_i) per block;
- sigmoid: plain sums, out_i = sum_b sum_j sigmoid(c q_i.k_j + b) v_j;
- softplus (LSSA): out_i = sum_j u_ij v_j / sum_j u_ij with u = softplus(alpha_i q̂_i.k̂_j),
  both sums accumulated over blocks (alpha_i from the global count of visible keys).

Backward: the key/value blocks go around again with their gradient accumulators, each rank
adds its queries' contribution, and after P passes every block is home with its dk, dv.
Memory per rank: the local queries and one key block at a time, O(L/P) per rank for a
fixed block score matrix of (L/P)^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from attnlab.distributed.layout import Layout, pad_to, ring_pass

KINDS = ("softmax", "sigmoid", "softplus")


@dataclass(frozen=True)
class RingSpec:
    """What the ring computes: ``kind``, ``causal``, the score ``scale`` and sigmoid's
    ``bias``, over ``layout`` in ``group``."""

    kind: str
    causal: bool
    scale: float
    bias: float
    layout: Layout
    group: dist.ProcessGroup | None
    timeout: timedelta


def _visible(spec: RingSpec, src: int, q_pos: Tensor, valid: Tensor) -> Tensor:
    """(B, 1, Lq, Lk) bool: the keys of ``src``'s block each local query sees."""
    vis = valid.bool()[:, None, None, :]
    if spec.causal:
        k_pos = spec.layout.positions(src, q_pos.device)
        vis = vis & (q_pos[:, None] >= k_pos[None, :])
    return vis


def _skipped(spec: RingSpec, src: int, q_pos: Tensor) -> bool:
    """A causal block wholly after every local query contributes nothing."""
    if not len(q_pos):
        return True
    return spec.causal and spec.layout.offsets[src] > int(q_pos[-1])


class RingAttention(torch.autograd.Function):
    """Forward and backward of one ring kind; tensors float32, k/v with q's head count."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, alpha: Tensor,
                spec: RingSpec) -> Tensor:
        lay = spec.layout
        q_pos = torch.arange(q.shape[2], device=q.device) + lay.offsets[lay.rank]
        buffer = [pad_to(k, lay.longest, 2), pad_to(v, lay.longest, 2),
                  pad_to(valid, lay.longest, 1)]
        acc = q.new_zeros(*q.shape[:3], v.shape[-1])
        total = q.new_zeros(*q.shape[:3], 1)
        top = q.new_full((*q.shape[:3], 1), float("-inf"))
        for step in range(lay.world):
            src = (lay.rank - step) % lay.world
            k_b, v_b, valid_b = buffer
            if not _skipped(spec, src, q_pos):
                vis = _visible(spec, src, q_pos, valid_b)
                s = q @ k_b.transpose(-1, -2)
                if spec.kind == "softmax":
                    s = (s * spec.scale).masked_fill(~vis, float("-inf"))
                    new_top = torch.maximum(top, s.amax(-1, keepdim=True))
                    safe = torch.where(torch.isfinite(new_top), new_top, 0.0)
                    p = torch.exp(s - safe)
                    keep = torch.exp(top - safe)
                    acc = acc * keep + p @ v_b
                    total = total * keep + p.sum(-1, keepdim=True)
                    top = new_top
                elif spec.kind == "sigmoid":
                    w = torch.sigmoid(s * spec.scale + spec.bias).masked_fill(~vis, 0.0)
                    acc = acc + w @ v_b
                else:
                    u = F.softplus(alpha * s).masked_fill(~vis, 0.0)
                    acc = acc + u @ v_b
                    total = total + u.sum(-1, keepdim=True)
            if step < lay.world - 1:
                buffer = ring_pass(buffer, spec.group, spec.timeout)
        if spec.kind == "sigmoid":
            out, stat = acc, total
        else:
            seen = total > 0
            out = torch.where(seen, acc / torch.where(seen, total, 1.0), 0.0)
            stat = torch.where(seen, top + torch.log(torch.where(seen, total, 1.0)),
                               float("inf")) if spec.kind == "softmax" else total
        ctx.save_for_backward(q, k, v, valid, alpha, out, stat)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, valid, alpha, out, stat = ctx.saved_tensors
        spec: RingSpec = ctx.spec
        lay = spec.layout
        grad = grad.contiguous()
        q_pos = torch.arange(q.shape[2], device=q.device) + lay.offsets[lay.rank]
        dq = torch.zeros_like(q)
        row_dot = (grad * out).sum(-1, keepdim=True)
        buffer = [pad_to(k, lay.longest, 2), pad_to(v, lay.longest, 2),
                  pad_to(valid, lay.longest, 1), pad_to(torch.zeros_like(k), lay.longest, 2),
                  pad_to(torch.zeros_like(v), lay.longest, 2)]
        for step in range(lay.world):
            src = (lay.rank - step) % lay.world
            k_b, v_b, valid_b, dk_b, dv_b = buffer
            if not _skipped(spec, src, q_pos):
                vis = _visible(spec, src, q_pos, valid_b)
                s = q @ k_b.transpose(-1, -2)
                g_v = grad @ v_b.transpose(-1, -2)
                if spec.kind == "softmax":
                    p = torch.exp(s * spec.scale - stat).masked_fill(~vis, 0.0)
                    dv_b = dv_b + p.transpose(-1, -2) @ grad
                    ds = p * (g_v - row_dot) * spec.scale
                elif spec.kind == "sigmoid":
                    w = torch.sigmoid(s * spec.scale + spec.bias).masked_fill(~vis, 0.0)
                    dv_b = dv_b + w.transpose(-1, -2) @ grad
                    ds = w * (1 - w) * g_v * spec.scale
                else:
                    x = alpha * s
                    z = torch.where(stat > 0, stat, 1.0)
                    u = F.softplus(x).masked_fill(~vis, 0.0)
                    dv_b = dv_b + (u / z).transpose(-1, -2) @ grad
                    ds = ((g_v - row_dot) / z * torch.sigmoid(x) * alpha).masked_fill(~vis, 0.0)
                dq = dq + ds @ k_b
                dk_b = dk_b + ds.transpose(-1, -2) @ q
            buffer = ring_pass([k_b, v_b, valid_b, dk_b, dv_b], spec.group, spec.timeout)
        n = k.shape[2]
        return dq, buffer[3][:, :, :n], buffer[4][:, :, :n], None, None, None
