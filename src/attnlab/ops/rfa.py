"""Random-feature attention weights: W_ij = sigma(c q_i.k_j) / N_i over the N_i visible keys.

"What can a Single Attention Layer Learn? A Study Through the Random Features Lens". The
weights are row-local, so besides the dense ``reference`` the memory-bounded ``tiled`` engine
serves them (forward and backward, no L x L matrix per head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.ops.common import begin, begin_weights, checked_weights, guarded_op, row_counts, upcast
from attnlab.ops.tiled import BlockVisibility, RowMath, block_counts, row_tiled

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "sigmoid": torch.sigmoid,
                                                     "tanh": torch.tanh}
BACKENDS = ("tiled", "reference")  # in order of preference for backend="auto"


@checked_weights("random_feature_weights")
def random_feature_weights(q: Tensor, k: Tensor, *, causal: bool = False,
                           mask: Tensor | None = None, scale: float | None = None,
                           activation: str = "relu") -> Tensor:
    """W_ij = sigma(c q_i.k_j) / N_i for visible j, 0 elsewhere (the reference).

    Args:
        q: (B, H, Lq, D) queries; k: (B, H_kv, Lk, D) keys, H_kv dividing H (GQA).
        causal, mask: which keys each query sees, as in :func:`random_feature_attention`.
        scale: c, default 1 (the random query-key matrices carry the scale).
        activation: sigma, one of ``relu``, ``sigmoid``, ``tanh``.

    Returns (B, H, Lq, Lk) in float32 at least.
    """
    _check_activation("random_feature_weights", activation)
    k, visible = begin_weights("random_feature_weights", q, k, causal=causal, mask=mask)
    q, k = upcast(q, k)
    a = ACTIVATIONS[activation]((q @ k.transpose(-1, -2)) * (1.0 if scale is None else scale))
    if visible is not None:
        a = a.masked_fill(~visible, 0.0)
    return a / row_counts(visible, a).clamp_min(1.0)


class RandomFeatureRows(RowMath):
    """Tiled weights a / N with a = sigma(s); ds = sigma'(s) g / N (0 where masked)."""

    def __init__(self, activation: str, scale: float) -> None:
        self.activation, self.scale = activation, scale

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


def _check_activation(op: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {sorted(ACTIVATIONS)}, "
                         f"got {activation!r}")


@guarded_op("random_feature_attention")
def random_feature_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                             mask: Tensor | None = None, scale: float | None = None,
                             activation: str = "relu", backend: str = "auto",
                             block_size: int | None = None) -> Tensor:
    """sum_j sigma(c q_i.k_j) v_j / N_i over the N_i visible keys.

    ``q`` (B, H, Lq, D), ``k``, ``v`` (B, H_kv, Lk, D) with H_kv dividing H (GQA); ``causal``
    aligns queries to the end of the keys; ``mask`` bool, True = may attend, broadcastable to
    (B, H, Lq, Lk); ``scale`` c defaults to 1 (no 1/sqrt(d): the random query-key matrices
    carry it). Returns (B, H, Lq, Dv). Backends: ``tiled`` (default), ``reference``.
    """
    _check_activation("random_feature_attention", activation)
    scale = 1.0 if scale is None else float(scale)
    name, q, k, v = begin("random_feature_attention", backend, BACKENDS, q, k, v)
    if name == "reference":
        w = random_feature_weights(q, k, causal=causal, mask=mask, scale=scale,
                                   activation=activation)
        return w.to(v.dtype) @ v
    return row_tiled(RandomFeatureRows(activation, scale), q, k, v, causal=causal, mask=mask,
                     block_size=block_size)
