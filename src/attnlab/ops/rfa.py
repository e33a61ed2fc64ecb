"""Random-feature attention weights: W_ij = sigma(q_i.k_j) / N_i over the N_i visible keys.

"What can a Single Attention Layer Learn? A Study Through the Random Features Lens". The
weights are row-local, so besides the dense ``reference`` the memory-bounded ``tiled`` engine
serves them (forward and backward, no L x L matrix per head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.masks import visibility
from attnlab.ops.common import check_qkv, expand_kv, row_counts, upcast
from attnlab.ops.dispatch import choose
from attnlab.ops.tiled import BlockVisibility, RowMath, block_counts, row_tiled

ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
BACKENDS = ("tiled", "reference")  # in order of preference for backend="auto"


def random_feature_weights(q: Tensor, k: Tensor, visible: Tensor | None, *,
                           activation: str = "relu") -> Tensor:
    """sigma(q_i.k_j) / N_i for visible j, 0 elsewhere (the reference)."""
    q, k = upcast(q, k)
    a = ACTIVATIONS[activation](q @ k.transpose(-1, -2))
    if visible is not None:
        a = a.masked_fill(~visible, 0.0)
    return a / row_counts(visible, a).clamp_min(1.0)


class RandomFeatureRows(RowMath):
    """Tiled weights a / N with a = sigma(s); ds = sigma'(s) g / N (0 where masked)."""

    def __init__(self, activation: str) -> None:
        self.activation = activation

    def weights(self, s: Tensor, vis: BlockVisibility | None):
        n = block_counts(vis, s).clamp_min(1.0)
        a = {"relu": s.relu_, "sigmoid": s.sigmoid_, "tanh": s.tanh_}[self.activation]()
        if vis is not None:
            vis.fill_(a, 0.0)
        return a / n, (a, n)

    def vjp(self, g, w, aux, vis, rowdot) -> Tensor:
        a, n = aux
        if self.activation == "relu":
            ds = g.mul_(a > 0)
        elif self.activation == "sigmoid":
            ds = torch.ops.aten.sigmoid_backward(g, a)
        else:
            ds = torch.ops.aten.tanh_backward(g, a)
        ds = ds.div_(n)
        return ds if vis is None else vis.fill_(ds, 0.0)


def random_feature_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                             mask: Tensor | None = None, activation: str = "relu",
                             backend: str = "auto", block_size: int | None = None) -> Tensor:
    """sum_j sigma(q_i.k_j) v_j / N_i on (B, H, L, D) tensors (no 1/sqrt(d) scale: the
    random query-key matrices carry it). Backends: ``tiled`` (default), ``reference``."""
    check_qkv("random_feature_attention", q, k, v, mask)
    if activation not in ACTIVATIONS:
        raise ValueError(f"random_feature_attention: activation must be one of "
                         f"{sorted(ACTIVATIONS)}, got {activation!r}")
    backend = choose("random_feature_attention", backend, BACKENDS, q, k, v)
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if backend == "reference":
        vis = visibility(q.shape[2], k.shape[2], causal=causal, mask=mask, device=q.device)
        return random_feature_weights(q, k, vis, activation=activation).to(v.dtype) @ v
    return row_tiled(RandomFeatureRows(activation), q, k, v, causal=causal, mask=mask,
                     block_size=block_size)
