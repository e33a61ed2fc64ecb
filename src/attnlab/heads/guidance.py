"""Perturbation guidance with head selection ("Fine-Grained Perturbation Guidance via
Attention Head Selection"): a weak model is the same model with chosen heads' maps moved
toward the identity (SoftPAG, strength u), and the output is pushed away from it,

    f_guided = f + s (f - f_perturbed);

HeadHunter picks the heads greedily, one at a time, each time the one whose addition gives
the best objective of the guided output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.heads.sites import sites
from attnlab.heads.steer import edit_weights, toward_identity

__all__ = ["HeadHunt", "guided", "head_hunter"]


def guided(model: nn.Module, run: Callable[[], Tensor], heads: Sequence[tuple[int, int]],
           strength: float = 1.0, scale: float = 1.0, *, plain: Tensor | None = None) -> Tensor:
    """f + scale (f - f_perturbed), f = ``run()`` (the model's output; pass it as ``plain``
    when already computed), f_perturbed the same with ``heads`` moved toward the identity
    with ``strength`` (SoftPAG; 1 = PAG)."""
    with torch.no_grad():
        plain = run() if plain is None else plain
        if not heads:
            return plain
        with edit_weights(model, list(heads), lambda w: toward_identity(w, strength)):
            perturbed = run()
    return plain + scale * (plain - perturbed)


@dataclass
class HeadHunt:
    """``chosen`` heads in the order picked, ``scores[i]`` the objective with the first i + 1
    of them; ``start`` the objective of the unguided output."""

    chosen: list[tuple[int, int]]
    scores: list[float]
    start: float


def head_hunter(model: nn.Module, run: Callable[[], Tensor],
                objective: Callable[[Tensor], float], count: int, *,
                candidates: Sequence[tuple[int, int]] | None = None, strength: float = 1.0,
                scale: float = 1.0, progress: Callable[[], None] | None = None) -> HeadHunt:
    """Greedy HeadHunter: ``count`` times, add the candidate head (default: every head) that
    maximises ``objective(guided output)`` with the heads chosen so far."""
    pool = list(candidates) if candidates is not None else \
        [(s.layer, h) for s in sites(model) for h in range(s.heads)]
    if not 1 <= count <= len(pool):
        raise ValueError(f"count must be between 1 and the {len(pool)} candidate heads, "
                         f"got {count}")
    chosen: list[tuple[int, int]] = []
    scores: list[float] = []
    with torch.no_grad():
        plain = run()  # the same for every candidate: computed once
    start = float(objective(plain))
    for _ in range(count):
        best, best_score = None, float("-inf")
        for head in pool:
            if head in chosen:
                continue
            score = float(objective(guided(model, run, [*chosen, head], strength, scale,
                                           plain=plain)))
            if score > best_score:
                best, best_score = head, score
            if progress:
                progress()
        assert best is not None  # count <= len(pool): a candidate is left
        chosen.append(best)
        scores.append(best_score)
    return HeadHunt(chosen, scores, start)
