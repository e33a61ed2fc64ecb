"""Attention sinks: heads that put their mass on one token, and the tokens that draw it.

- Sink score (Gu et al., "When Attention Sink Emerges in Language Models"): for key k,
  alpha_k = sum_q A[q, k] / (queries that can see k) (T - k in a causal model); a head is a
  sink head for k when alpha_k exceeds a threshold (0.3 by default).
- Massive activations ("See What You Are Told: Visual Attention Sink in Large Multimodal
  Models", after Sun et al.): sink tokens carry huge values in a few fixed hidden
  dimensions; phi(x) = max over those dimensions of |x_d| / rms(x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["sink_scores", "sink_heads", "MassiveActivations", "massive_activations"]


def sink_scores(weights: Tensor, visible: Tensor | None = None) -> Tensor:
    """(..., H, Lq, Lk) weights -> (H, Lk) sink score per head and key: the attention a key
    receives summed over queries (and leading axes), divided by the number of queries that
    can see it (``visible`` broadcastable to the weights; default every query)."""
    w = weights.float()
    if visible is None:
        visible = torch.ones_like(w, dtype=torch.bool)
    visible = visible.expand_as(w)
    lead = tuple(range(w.dim() - 3))
    mass = (w * visible).sum((*lead, -2))
    seen = visible.float().sum((*lead, -2))
    return mass / seen.clamp_min(1)


def sink_heads(scores: Tensor | dict[int, Tensor], token: int = 0,
               threshold: float = 0.3) -> tuple[list[tuple[int, int]], float]:
    """Heads whose sink score on ``token`` exceeds ``threshold``: ([(layer, head)], share).
    ``scores``: (layers, H, L) or {layer: (H, L)}."""
    if isinstance(scores, dict):
        scores = torch.stack([scores[k] for k in sorted(scores)])
    if scores.shape[-1] <= token:
        raise ValueError(f"token {token} out of range: scores cover {scores.shape[-1]} keys")
    above = scores[..., token] > threshold  # (layers, H)
    pairs = [(int(a), int(b)) for a, b in above.nonzero().tolist()]
    return pairs, float(above.float().mean())


@dataclass
class MassiveActivations:
    """``phi`` (B, L): each token's max |x_d| / rms(x); ``tokens`` (B, L) bool: phi >= tau
    (the sink tokens); ``dims``: the dimensions where the sink tokens have that maximum;
    ``tau``: the threshold used."""

    dims: list[int]
    phi: Tensor
    tokens: Tensor
    tau: float


def massive_activations(hidden: Tensor, tau: float | None = None,
                        key_mask: Tensor | None = None,
                        dims: Sequence[int] | None = None) -> MassiveActivations:
    """Sink tokens of one layer's hidden states ``hidden`` (B, L, D): phi(x) = max_d |x_d| /
    rms(x) >= ``tau``. The paper's tau = 20 is for D = 4096; since phi <= sqrt(D), the
    default scales it to the same share of the token's energy in one dimension:
    tau = 20 sqrt(D / 4096) (phi^2 / D = x_d^2 / |x|^2 >= 400 / 4096, about 10%). Padded
    tokens (``key_mask`` False) are never sinks. ``dims``: look only at these dimensions
    (VAR's sink dimensions, those of a known sink token), max_{d in dims} |x_d| / rms(x)."""
    h = hidden.detach().float()
    d = h.shape[-1]
    tau = 20.0 * (d / 4096) ** 0.5 if tau is None else float(tau)
    real = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if key_mask is None \
        else key_mask.bool().to(h.device)
    rms = h.pow(2).mean(-1).sqrt().clamp_min(1e-12)
    if dims is not None:
        chosen = torch.tensor(list(dims), dtype=torch.long, device=h.device)
        top, where = h.abs().index_select(-1, chosen).max(-1)
        where = chosen[where]
    else:
        top, where = h.abs().max(-1)
    phi = (top / rms) * real
    tokens = phi >= tau
    dims = sorted(set(where[tokens].tolist()))
    return MassiveActivations(dims, phi.cpu(), tokens.cpu(), tau)
