"""Boolean masks (``True`` = may attend, the SDPA convention) and their checks."""

from __future__ import annotations

import torch
from torch import Tensor


def causal_visibility(lq: int, lk: int, device: torch.device | None = None, *,
                      q_start: int = 0, q_total: int | None = None,
                      k_end: int | None = None) -> Tensor:
    """Causal bool visibility, with queries aligned to the *end* of the keys.

    Of ``q_total`` queries over ``lk`` keys, query ``i`` sits at absolute position
    ``i + (lk - q_total)`` (a KV cache holds the earlier keys) and sees keys
    ``j <= i + (lk - q_total)``. Returns rows ``q_start .. q_start + lq`` and key columns
    ``0 .. k_end`` only, so a tile never builds the full matrix.
    """
    q_total = lq if q_total is None else q_total
    offset = lk - q_total
    rows = torch.arange(q_start, q_start + lq, device=device).unsqueeze(-1)
    cols = torch.arange(lk if k_end is None else k_end, device=device)
    return cols <= rows + offset


def key_padding_to_op(key_mask: Tensor | None) -> Tensor | None:
    """Module-level key padding ``(B, Lk)`` -> op-level mask ``(B, 1, 1, Lk)``."""
    return None if key_mask is None else key_mask[:, None, None, :]


def visibility(lq: int, lk: int, *, causal: bool, mask: Tensor | None,
               device: torch.device | None, q_start: int = 0, q_total: int | None = None
               ) -> Tensor | None:
    """The bool visibility of query rows ``q_start .. q_start+lq`` (of ``q_total``) over keys.

    Combines ``causal`` with an op-level ``mask`` broadcastable to ``(B, H, Lq_total, Lk)``.
    Returns ``None`` when everything is visible.
    """
    q_total = lq if q_total is None else q_total
    vis = None
    if causal:
        vis = causal_visibility(lq, lk, device, q_start=q_start, q_total=q_total)
    if mask is not None:
        m = mask if mask.shape[-2] == 1 else mask[..., q_start:q_start + lq, :]
        vis = m if vis is None else (m & vis)
    return vis


def check_op_mask(mask: Tensor | None, q: Tensor, k: Tensor, op: str = "op") -> None:
    """Validate an op-level mask: bool and broadcastable to ``(B, H, Lq, Lk)``; errors name
    ``op``."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{op}: mask must be a bool tensor (True = may attend), got {got}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if not broadcasts(mask, target):
        raise ValueError(f"{op}: mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(B, H, Lq, Lk) = {target}")


def broadcasts(t: Tensor, target: tuple[int, ...]) -> bool:
    """Whether ``t`` broadcasts to ``target`` (no more dims; each size 1 or the target's)."""
    if t.dim() > len(target):
        return False
    shape = (1,) * (len(target) - t.dim()) + tuple(t.shape)
    return all(s in (1, n) for s, n in zip(shape, target, strict=True))


def check_key_padding(mask: Tensor | None, batch: int, length: int, who: str,
                      spatial: tuple[int, ...] | None = None) -> Tensor | None:
    """Validate a module-level key padding mask; returns it flattened to ``(B, L)``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{who}: mask must be a bool tensor of shape (B, L) with True = real "
                         f"token, got {got}")
    if spatial is not None and tuple(mask.shape) == (batch, *spatial):
        mask = mask.reshape(batch, length)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{who}: mask must have shape (B, L) = ({batch}, {length}), "
                         f"got {tuple(mask.shape)}")
    return mask


NO_KEY = torch.iinfo(torch.int64).min  # the rank of a key nobody may select


def ranked_keys(priority: Tensor, visible: Tensor | None = None) -> Tensor:
    """int64 (.., Lk) ranks that order the keys by ``priority`` (float), ties going to the
    later key; invisible keys get ``NO_KEY``, below every real rank. The ranks are distinct,
    so "the w keys of highest priority" is "the keys whose rank is >= the w-th largest".

    rank = order_bits(priority) * 2^32 + key index, where order_bits maps a float32 to an
    int32 with the same order (negative floats have their magnitude bits flipped).
    """
    lk = priority.shape[-1]
    bits = (priority.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: no -0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    rank = bits * (1 << 32) + torch.arange(lk, device=priority.device)
    if visible is not None:
        rank = rank.masked_fill(~visible, NO_KEY)
    return rank


def top_keys(priority: Tensor, visible: Tensor, window: int) -> Tensor:
    """Bool (.., Lq, Lk): per row, the ``window`` visible keys of highest ``priority``
    (.., 1 or Lq, Lk); ties go to the later key. Everything visible when window >= Lk.
    A row that sees fewer than ``window`` keys keeps them all."""
    lk = priority.shape[-1]
    if window >= lk:
        return visible
    rank = ranked_keys(priority.expand(visible.shape), visible)
    return (rank >= window_threshold(rank, window)) & visible


def window_threshold(rank: Tensor, window: int) -> Tensor:
    """(.., Lq, 1): each row's ``window``-th largest of ``ranked_keys`` (quickselect, no
    sort), the least rank :func:`top_keys` keeps; NO_KEY when fewer keys are visible."""
    return rank.kthvalue(rank.shape[-1] - window + 1, dim=-1, keepdim=True).values


def rows_seeing(marked: Tensor, lq: int, *, causal: bool, mask: Tensor | None = None
                ) -> Tensor:
    """Bool (.., Lq): the query rows that may see at least one ``marked`` key.

    ``marked`` (.., Lk) bool, e.g. the keys that hold a non-finite number; ``causal`` aligns
    the queries to the end of the keys; ``mask`` an op-level mask broadcastable to
    (.., Lq, Lk). A key padding mask (Lq axis of size 1) is applied without building the
    (Lq, Lk) matrix: prefix sums along the keys answer the causal case.
    """
    lk = marked.shape[-1]
    if mask is not None:
        mask = mask.reshape((1,) * (marked.dim() + 1 - mask.dim()) + tuple(mask.shape))
        if mask.shape[-2] != 1:
            vis = visibility(lq, lk, causal=causal, mask=mask, device=marked.device)
            assert vis is not None  # a mask was given
            return (vis & marked.unsqueeze(-2)).any(-1)
        marked = marked & mask.squeeze(-2)
    shape = (*marked.shape[:-1], lq)
    if lk == 0:
        return torch.zeros(shape, dtype=torch.bool, device=marked.device)
    if not causal or lq == 1:  # one causal query (a decoding step) sees every key
        return marked.any(-1, keepdim=True).expand(shape)
    seen_up_to = marked.cumsum(-1) > 0  # (.., Lk): a marked key at or before j
    last = torch.arange(lq, device=marked.device) + (lk - lq)  # each row's last visible key
    return seen_up_to[..., last.clamp(0, lk - 1)] & (last >= 0)
