"""Head importance and pruning ("Are Sixteen Heads Really Better than One?", Michel et al.).

Importance of head h: I_h = sum over batches of |d loss / d xi_h|, xi the head mask
(attnlab's ``head_scale``, 1 = kept), each layer's scores divided by their L2 norm. Next to
it, exhaustive single-head ablation (metric with the head zeroed, minus the full model's),
their Spearman rank correlation, and iterative pruning curves.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.heads.ablate import ablate
from attnlab.heads.sites import Site, sites

__all__ = ["head_importance", "ablation_scores", "rank_correlation", "real_heads", "PruningCurve",
           "pruning_curve", "pruning_steps"]


@contextlib.contextmanager
def _head_mask_gradients(model_sites: list[Site]) -> Iterator[list[Tensor]]:
    scales = [s.module.head_scale for s in model_sites]
    for scale in scales:
        scale.requires_grad_(True)
        scale.grad = None
    try:
        yield scales
    finally:
        for scale in scales:
            scale.requires_grad_(False)
            scale.grad = None


def head_importance(model: nn.Module, losses: Iterable[Callable[[], Tensor]],
                    normalize: bool = True, progress: Callable[[], None] | None = None
                    ) -> Tensor:
    """(layers, heads) importance: sum over ``losses`` (each a call that runs the model on
    one batch and returns a scalar loss) of |d loss / d head_scale|, the heads already
    masked (head_scale 0) keeping 0; ``normalize``: each layer divided by its L2 norm.
    Layers with fewer heads than the widest (an encoder-decoder's decoder, per-layer head
    counts) are padded with 0, as in ``ablation_scores``."""
    model_sites = sites(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # only the head mask's gradient is needed
        p.requires_grad_(False)
    total = torch.zeros(len(model_sites), max(s.heads for s in model_sites))
    try:
        with _head_mask_gradients(model_sites) as scales, torch.enable_grad():
            for loss_of in losses:
                loss = loss_of()
                grads = torch.autograd.grad(loss, scales, allow_unused=True)
                for i, g in enumerate(grads):
                    if g is not None:
                        total[i, :g.numel()] += g.detach().abs().float().cpu()
                if progress is not None:
                    progress()
    finally:
        for p in params:
            p.requires_grad_(True)
    if normalize:
        total = total / total.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return total


def ablation_scores(model: nn.Module, metric: Callable[[], float],
                    progress: Callable[[], None] | None = None) -> tuple[float, Tensor]:
    """(the full model's metric, (layers, heads) metric with each head zeroed alone minus
    the full one): the exhaustive single-head ablation. Layers with fewer heads than the
    widest are padded with 0, as in ``head_importance``."""
    model_sites = sites(model)
    with torch.no_grad():
        base = float(metric())
        out = torch.zeros(len(model_sites), max(s.heads for s in model_sites))
        for s in model_sites:
            for h in range(s.heads):
                with ablate(model, [(s.layer, h)]):
                    out[s.layer, h] = float(metric()) - base
                if progress is not None:
                    progress()
    return base, out


def real_heads(model: nn.Module) -> Tensor:
    """(layers, widest layer's heads) bool: True where a head exists (the entries of
    ``head_importance`` and ``ablation_scores`` that are not padding)."""
    model_sites = sites(model)
    keep = torch.zeros(len(model_sites), max(s.heads for s in model_sites), dtype=torch.bool)
    for s in model_sites:
        keep[s.layer, :s.heads] = True
    return keep


def rank_correlation(a: Tensor, b: Tensor, keep: Tensor | None = None) -> float:
    """Spearman's rank correlation of two score tensors of the same shape, over the entries
    where ``keep`` is True (default all; ``real_heads(model)`` leaves out the padding of
    layers with fewer heads)."""
    from scipy.stats import spearmanr

    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    if keep is not None:
        if keep.shape != a.shape:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, the scores "
                             f"{tuple(a.shape)}")
        a, b = a[keep], b[keep]
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


@dataclass
class PruningCurve:
    """After pruning ``fractions[i]`` of the ``total`` heads the metric is ``metrics[i]``;
    ``pruned``: the heads in the order they went."""

    order: str
    total: int
    fractions: list[float]
    metrics: list[float]
    pruned: list[tuple[int, int]]

    def heads_before(self, floor: float) -> int:
        """How many heads are pruned at the last point before the metric first drops below
        ``floor`` (all of them when it never does)."""
        for i, m in enumerate(self.metrics):
            if m < floor:
                return round(self.fractions[i - 1] * self.total) if i else 0
        return round(self.fractions[-1] * self.total)


def _heads_per_step(total: int, step: float) -> int:
    return max(1, round(step * total))


def pruning_steps(model: nn.Module, step: float) -> int:
    """How many pruning steps ``pruning_curve(model, ..., step)`` takes (for progress)."""
    total = sum(s.heads for s in sites(model))
    return math.ceil(total / _heads_per_step(total, step))


def pruning_curve(model: nn.Module, metric: Callable[[], float], step: float = 0.1,
                  importance: Callable[[], Tensor] | None = None, seed: int = 0,
                  progress: Callable[[], None] | None = None) -> PruningCurve:
    """Prune heads ``step`` (a fraction of all heads) at a time and measure ``metric``
    after each step. With ``importance`` (a call returning (layers, heads) scores with the
    current heads masked), the least important remaining heads go first, re-scored after
    each step (Michel et al.'s iterative pruning); without, a random order (``seed``). The
    curve runs until every head is pruned; the model's heads are restored after."""
    model_sites = sites(model)
    all_heads = [(s.layer, h) for s in model_sites for h in range(s.heads)]
    per_step = _heads_per_step(len(all_heads), step)
    order = all_heads[:]
    random.Random(seed).shuffle(order)
    pruned: list[tuple[int, int]] = []
    fractions, metrics = [0.0], []
    saved = [s.module.head_scale.clone() for s in model_sites]
    try:
        with torch.no_grad():
            metrics.append(float(metric()))
        while len(pruned) < len(all_heads):
            left = [p for p in (order if importance is None else all_heads) if p not in pruned]
            if importance is not None:
                scores = importance()
                left.sort(key=lambda p: float(scores[p[0], p[1]]))
            for layer, head in left[:per_step]:
                model_sites[layer].module.head_scale[head] = 0
                pruned.append((layer, head))
            with torch.no_grad():
                metrics.append(float(metric()))
            fractions.append(len(pruned) / len(all_heads))
            if progress is not None:
                progress()
    finally:
        for s, scale in zip(model_sites, saved, strict=True):
            s.module.head_scale.copy_(scale)
    return PruningCurve("importance" if importance is not None else "random",
                        len(all_heads), fractions, metrics, pruned)
