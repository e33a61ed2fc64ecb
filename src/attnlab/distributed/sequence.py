"""Sequence-parallel attention: each rank of a ``torch.distributed`` group holds a contiguous
piece of the sequence (queries, keys and values of the same positions) and gets the
attention output of its piece, equal to the single-process op's (forward and backward).

softmax, sigmoid and softplus (LSSA) go around a ring (``distributed.ring``); linear
attention needs only the sums of its keys: the pieces' states (S_r = sum phi(k)^T v, z_r =
sum phi(k)) are all-reduced, and each rank continues from the prefix of the ranks before it
(causal) or uses the total (bidirectional). Works with the gloo backend (CPU) and NCCL
(CUDA); collectives time out instead of hanging when a peer dies.
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from attnlab.distributed.layout import DEFAULT_TIMEOUT, AllReduceSum, layout, require_group
from attnlab.distributed.ring import KINDS, RingAttention, RingSpec
from attnlab.ops.common import check_qkv, expand_kv, upcast
from attnlab.ops.linear import FEATURE_MAPS, linear_attention, safe_divide

__all__ = ["SEQUENCE_PARALLEL_KINDS", "sequence_parallel_attention"]

SEQUENCE_PARALLEL_KINDS = (*KINDS, "linear")


def sequence_parallel_attention(q: Tensor, k: Tensor, v: Tensor, *, kind: str = "softmax",
                                causal: bool = False, key_mask: Tensor | None = None,
                                scale: float | None = None, bias: float | None = None,
                                feature_map: str = "elu", eps: float = 1e-6,
                                group: dist.ProcessGroup | None = None,
                                timeout: timedelta = DEFAULT_TIMEOUT) -> Tensor:
    """Attention of this rank's piece of a sequence split over ``group``'s ranks in rank
    order; every rank calls it with its own piece (pieces may differ in length).

    ``q`` (B, H, L_r, D), ``k``/``v`` (B, H_kv, L_r, D) (GQA: H_kv divides H): the positions
    of rank r's piece, which starts where rank r - 1's ends. ``key_mask`` (B, L_r) bool, True
    = a real token (key padding); ``causal``: each position sees the keys at or before it
    in the whole sequence. ``kind``: ``"softmax"`` (``scale`` default 1/sqrt(D)),
    ``"sigmoid"`` (``bias`` default -ln of the whole sequence's length), ``"softplus"``
    (LSSA: ``scale`` is c in alpha_i = c ln N_i, default ln D; LSSAR is not split) or
    ``"linear"`` (``feature_map``, ``eps`` as in ``ops.linear_attention``). Returns this
    piece's output (B, H, L_r, Dv) in q's dtype, as ``ops.<kind>_attention`` on the whole
    sequence would give it.
    """
    op = "sequence_parallel_attention"
    if kind not in SEQUENCE_PARALLEL_KINDS:
        raise ValueError(f"{op}: kind must be one of {SEQUENCE_PARALLEL_KINDS}, got {kind!r}")
    check_qkv(op, q, k, v, None)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: a rank's queries and keys are the same positions; got "
                         f"{q.shape[2]} queries and {k.shape[2]} keys")
    if key_mask is not None and (key_mask.dtype != torch.bool or
                                 key_mask.shape != (q.shape[0], k.shape[2])):
        raise ValueError(f"{op}: key_mask must be bool (B, L_r) = ({q.shape[0]}, "
                         f"{k.shape[2]}), got {key_mask.dtype} {tuple(key_mask.shape)}")
    require_group(op, group)
    valid = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device) \
        if key_mask is None else key_mask.to(q.device)
    lay = layout(q.shape[2], valid, group)
    dtype = q.dtype
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if kind == "linear":
        return _linear(q, k, v, valid, causal, feature_map, eps, lay.rank, lay.world,
                       group).to(dtype)
    q, k, v = upcast(q, k, v)
    alpha = q.new_zeros(())
    if kind == "softplus":
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k,
                                                                                      dim=-1)
        seen = lay.valid.to(q.device)
        if causal:
            counts = seen[:, :lay.rank].sum(1, keepdim=True) + valid.to(torch.int64).cumsum(-1)
        else:
            counts = seen.sum(1, keepdim=True).expand(-1, q.shape[2])
        log_d = math.log(q.shape[-1]) if scale is None else float(scale)
        alpha = (log_d * torch.log(counts.clamp_min(1).to(q.dtype)))[:, None, :, None]
    spec = RingSpec(kind, causal,
                    1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                    -math.log(max(lay.total, 1)) if bias is None else float(bias),
                    lay, group, timeout)
    out = RingAttention.apply(q, k, v, valid.to(q.dtype), alpha, spec)
    return out.to(dtype)


def _linear(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, causal: bool, feature_map: str,
            eps: float, rank: int, world: int, group: dist.ProcessGroup | None) -> Tensor:
    """Linear attention from the all-reduced states of the pieces."""
    phi = FEATURE_MAPS.get(feature_map)
    if phi is None:
        raise ValueError(f"sequence_parallel_attention: unknown feature_map {feature_map!r}; "
                         f"choose from {sorted(FEATURE_MAPS)}")
    q32, k32, v32 = upcast(q, k, v)
    keep = valid[:, None, :, None].to(k32.dtype)
    fk, vk = phi(k32) * keep, v32 * keep
    s_local, z_local = fk.transpose(-1, -2) @ vk, fk.sum(2)  # (B, H, D, Dv), (B, H, D)
    if not causal:
        s_all, z_all = AllReduceSum.apply(s_local, group), AllReduceSum.apply(z_local, group)
        fq = phi(q32)
        return safe_divide(fq @ s_all, (fq * z_all[:, :, None]).sum(-1), eps)
    # every rank's state in its own slot; the sum over slots gives them all to every rank
    slots_s = torch.stack([s_local if r == rank else torch.zeros_like(s_local)
                           for r in range(world)])
    slots_z = torch.stack([z_local if r == rank else torch.zeros_like(z_local)
                           for r in range(world)])
    states_s = AllReduceSum.apply(slots_s, group)
    states_z = AllReduceSum.apply(slots_z, group)
    prefix = (states_s[:rank].sum(0), states_z[:rank].sum(0))
    mask = valid[:, None, None, :]
    return linear_attention(q32, k32, v32, causal=True, mask=mask, state=prefix,
                            feature_map=feature_map, eps=eps)
