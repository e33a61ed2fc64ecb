"""Choose heads for an intervention: by how much their output depends on a context segment
(head divergence), by how much attention they pay to it, or at random (the control).

- ``head_divergence``: "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
  Divergence" (VHD): a head's divergence is the distance between its outputs with and
  without a context segment, at the positions both inputs share,
  VHD_h = mean_p || o_h(x)_p - o_h(x without the segment)_p' ||_2.
- ``segment_attention``: each head's attention mass on a key segment, averaged over chosen
  queries (VAR's selection of the heads that already look at the target: "See What You Are
  Told: Visual Attention Sink in Large Multimodal Models").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnlab.heads.ablate import head_outputs
from attnlab.heads.capture import capture
from attnlab.heads.sites import sites

__all__ = ["head_divergence", "random_heads", "segment_attention", "top_heads"]


def head_divergence(model: nn.Module, with_segment: Callable[..., object],
                    without_segment: Callable[..., object], keep_with: Tensor,
                    keep_without: Tensor) -> Tensor:
    """(layers, heads) VHD: ``with_segment()`` and ``without_segment()`` each run one forward;
    position ``keep_with[p]`` of the first and ``keep_without[p]`` of the second hold the same
    token (e.g. the tokens before the segment); the distance between each head's outputs is
    averaged over those positions and the batch."""
    keep_with, keep_without = keep_with.long().flatten(), keep_without.long().flatten()
    if keep_with.numel() != keep_without.numel() or keep_with.numel() == 0:
        raise ValueError(f"keep_with and keep_without must list the same, non-zero number of "
                         f"positions, got {keep_with.numel()} and {keep_without.numel()}")
    a = head_outputs(model, with_segment)
    b = head_outputs(model, without_segment)
    rows = []
    for layer in sorted(a):
        x = a[layer].float()[:, keep_with.to(a[layer].device)]  # (B, P, H, D)
        y = b[layer].float()[:, keep_without.to(b[layer].device)]
        if x.shape != y.shape:
            raise ValueError(f"layer {layer}: the two runs give head outputs of "
                             f"{tuple(x.shape)} and {tuple(y.shape)} at the kept positions")
        rows.append((x - y).norm(dim=-1).mean((0, 1)).cpu())
    return torch.stack(rows)


def segment_attention(model: nn.Module, run: Callable[[], object], segment: Tensor,
                      queries: Tensor | None = None) -> Tensor:
    """(layers, heads): the attention mass each head puts on the ``segment`` keys ((B, Lk)
    or (Lk,) bool), averaged over the ``queries`` ((B, Lq) or (Lq,) bool; default all) of
    one forward ``run()``."""
    model_sites = sites(model)
    names = [f"L{s.layer}.weights" for s in model_sites]
    with torch.no_grad(), capture(model, names) as cap:
        run()
    rows = []
    for s in model_sites:
        w = cap[f"L{s.layer}.weights"].float()  # (B, H, Lq, Lk)
        seg = segment.to(w.device).float()
        seg = seg.reshape(-1, 1, 1, w.shape[-1])
        mass = (w * seg).sum(-1)  # (B, H, Lq)
        q = torch.ones(mass.shape[0], mass.shape[-1], device=w.device) if queries is None \
            else queries.to(w.device).float().reshape(-1, mass.shape[-1]).expand(
                mass.shape[0], -1)
        rows.append(((mass * q[:, None]).sum((0, 2)) / q.sum().clamp_min(1)).cpu())
    return torch.stack(rows)


def top_heads(scores: Tensor, count: int) -> list[tuple[int, int]]:
    """The ``count`` (layer, head) pairs with the highest ``scores`` (layers, heads)."""
    if not 1 <= count <= scores.numel():
        raise ValueError(f"count must be between 1 and {scores.numel()}, got {count}")
    flat = scores.flatten().topk(count).indices.tolist()
    return [(i // scores.shape[1], i % scores.shape[1]) for i in flat]


def random_heads(model: nn.Module, count: int, generator: torch.Generator
                 ) -> list[tuple[int, int]]:
    """``count`` distinct (layer, head) pairs drawn uniformly (the control of a selection)."""
    every = [(s.layer, h) for s in sites(model) for h in range(s.heads)]
    if not 1 <= count <= len(every):
        raise ValueError(f"count must be between 1 and {len(every)}, got {count}")
    return [every[i] for i in torch.randperm(len(every), generator=generator)[:count].tolist()]
