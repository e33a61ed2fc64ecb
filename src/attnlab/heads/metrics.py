"""What patching and attribution share: how a model is run, the metrics, and the result.

``run_model`` calls an attnlab model or a Hugging Face model the same way (a token tensor,
or a mapping of keyword arguments such as ``input_ids`` and ``attention_mask``) and returns
its logits; ``logit_difference`` and ``answer_logit`` build the usual metrics; ``PatchScores``
holds one score per (layer, head[, position]) or (layer[, position]) with the metric's clean
and corrupted values, so that activation patching and attribution patching can be compared
entry by entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Inputs = Tensor | Mapping[str, Any]
Metric = Callable[[Tensor], Tensor]


def run_model(model: nn.Module, inputs: Inputs) -> Tensor:
    """The logits of ``model`` on ``inputs``: ``model(inputs)`` for a tensor, ``model(**inputs)``
    for a mapping; a Hugging Face output's ``.logits`` (else its first element)."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"{type(model).__name__} returned {type(out).__name__}, which has no "
                     "logits: pass forward= to say how to get them")


def _answers(tokens: Tensor | int, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(tokens, device=device).long()
    return t.expand(batch) if t.dim() == 0 else t


def answer_logit(answer: Tensor | int, position: int = -1) -> Metric:
    """Metric: the mean over the batch of the logit of ``answer`` (one token id, or one per
    sequence) at ``position``."""
    def metric(logits: Tensor) -> Tensor:
        last = logits[:, position]
        right = _answers(answer, last.shape[0], last.device)
        return last.gather(-1, right[:, None]).mean()
    return metric


def logit_difference(correct: Tensor | int, wrong: Tensor | int, position: int = -1) -> Metric:
    """Metric: the mean over the batch of logit(correct) - logit(wrong) at ``position``
    (each one token id, or one per sequence), the usual patching metric."""
    def metric(logits: Tensor) -> Tensor:
        last = logits[:, position]
        right = _answers(correct, last.shape[0], last.device)
        other = _answers(wrong, last.shape[0], last.device)
        return (last.gather(-1, right[:, None]) - last.gather(-1, other[:, None])).mean()
    return metric


@dataclass
class PatchScores:
    """Scores of one patching or attribution sweep.

    ``scores`` has the ``axes`` named (``("layer", "head")``, ``("layer", "head",
    "position")``, ``("layer", "position")``, ...); each entry is the change of the metric when
    that piece is patched (or, for attribution, its first-order estimate): metric(patched) -
    metric(unpatched run). Layers with fewer heads than the widest are NaN-padded.
    ``clean`` and ``corrupted`` are the metric on the two inputs; ``direction`` is
    ``"denoise"`` (clean activations into the corrupted run) or ``"noise"`` (corrupted into
    the clean run); ``point`` the hook point patched; ``method`` how the scores were made."""

    scores: Tensor
    axes: tuple[str, ...]
    point: str
    method: str
    direction: str
    clean: float
    corrupted: float

    def normalised(self) -> Tensor:
        """The scores as a fraction of the metric's gap: denoising, 1 = the piece restores the
        whole clean metric; noising, -1 = it destroys all of it."""
        gap = self.clean - self.corrupted
        if abs(gap) < 1e-12:
            raise ValueError(f"the metric is the same on both inputs ({self.clean:.4g}): "
                             "nothing to normalise by; choose inputs that differ on it")
        return self.scores / gap

    def top(self, k: int = 5) -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` entries of largest absolute score: (index along ``axes``, score)."""
        flat = self.scores.flatten().nan_to_num(0.0)
        order = flat.abs().argsort(descending=True)[:k]
        return [(tuple(int(i) for i in torch.unravel_index(o, self.scores.shape)),
                 float(flat[o])) for o in order]
