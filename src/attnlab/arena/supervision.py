"""Attention supervision: a training loss that aligns chosen heads' attention, for chosen
queries, with target key regions (the positional supervision of "MultiCrafter: High-Fidelity
Multi-Subject Generation via Spatially Disentangled Attention and Identity-Aware
Reinforcement Learning", which separates the attention regions of different subjects).

For a head h, a query i with target keys T_i and weights w_h(i, .),

    loss = lambda * mean_{h, i} -log sum_{j in T_i} w_h(i, j),

zero when each chosen query puts all its mass on its targets. ``AttentionSupervisor``
captures the chosen heads' weights (with their graph) during the training forward and gives
this loss; the arena trainer adds it to the task loss (``[train.supervise]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AttentionSupervisor", "supervision_loss", "target_mass"]


def target_mass(weights: Tensor, targets: Tensor) -> Tensor:
    """(B, h, Lq): each query's attention mass on its ``targets`` ((B, Lq, Lk) bool)."""
    if targets.shape[-2:] != weights.shape[-2:] or targets.shape[0] != weights.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not fit weights "
                         f"{tuple(weights.shape)}: expected (B, Lq, Lk)")
    return (weights.float() * targets[:, None].to(weights.device).float()).sum(-1)


def supervision_loss(weights: Tensor, targets: Tensor, queries: Tensor) -> Tensor:
    """mean over the ``queries`` ((B, Lq) bool) and heads of -log(mass on the targets)."""
    mass = target_mass(weights, targets)
    chosen = queries[:, None].to(mass.device).expand_as(mass)
    if not bool(chosen.any()):
        return mass.sum() * 0.0
    return -torch.log(mass[chosen].clamp_min(1e-6)).mean()


class AttentionSupervisor:
    """Hooks the ``heads`` ([(layer, head)]) of ``model``; after each forward,
    ``loss(targets, queries)`` is ``weight`` x the supervision loss of those heads (averaged
    over layers). ``remove()`` takes the hooks away. Layers are the model's
    ``attnlab.Attention`` modules, or the ``HeadSite`` hook points that
    ``integrations.hf.use_attnlab`` gives a Hugging Face model's attention modules."""

    def __init__(self, model: nn.Module, heads: Sequence[Sequence[int]], weight: float) -> None:
        if weight < 0:
            raise ValueError(f"the supervision weight must be >= 0, got {weight}")
        from attnlab.core.hooks import HeadSite
        from attnlab.mechanisms.base import Attention

        layers = [m for m in model.modules() if isinstance(m, Attention | HeadSite)]
        self.weight = float(weight)
        self.captured: dict[int, Tensor] = {}
        self.handles = []
        chosen: dict[int, list[int]] = {}
        for layer, head in (tuple(h) for h in heads):
            if not 0 <= layer < len(layers) or not 0 <= head < layers[layer].heads:
                raise ValueError(f"head ({layer}, {head}) out of range: the model has "
                                 f"{len(layers)} attention layers of "
                                 f"{layers[0].heads if layers else 0} heads")
            chosen.setdefault(layer, []).append(head)
        if not chosen:
            raise ValueError("supervise at least one (layer, head)")
        for layer, hs in sorted(chosen.items()):
            index = torch.tensor(sorted(set(hs)))

            def keep(_m, _i, w, layer=layer, index=index):
                self.captured[layer] = w.index_select(1, index.to(w.device))
            self.handles.append(layers[layer].hook_weights.register_forward_hook(keep))

    def loss(self, targets: Tensor, queries: Tensor) -> Tensor:
        if not self.captured:
            raise RuntimeError("no attention was captured: run the model's forward first")
        parts = [supervision_loss(w, targets, queries) for w in self.captured.values()]
        self.captured = {}
        return self.weight * torch.stack(parts).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.captured = [], {}
