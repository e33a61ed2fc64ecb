"""Where heads look in space, and which heads look alike: the visual-analytics measures of
"How Does Attention Work in Vision Transformers? A Visual Analytics Attempt" (Li et al.,
2023), next to per-head importance (``heads.importance``).

- Attention strength against spatial distance: ``HeadStats.distance_profile()`` streams,
  per head, the mean attention weight of a (query, key) pair at each Chebyshev distance d
  (the ring of patches d steps around the query; the token gap in a sequence), given the
  patch coordinates of ``grid_positions``.
- Attention patterns: ``offset_patterns`` turns a head's mean attention map into its mean
  weight at each relative offset (key position - query position), a picture of the head
  that does not depend on where the query sits; ``cluster_heads`` groups heads by
  these patterns (hierarchical clustering, average linkage on cosine distance, scipy; the
  number of clusters by the silhouette score unless given, one for fewer than 3 heads).
  The paper summarises per-patch patterns with an autoencoder; clustering the heads' offset
  patterns answers the same question ("what patterns have the heads learned, and which
  heads share one") directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["HeadClusters", "cluster_heads", "grid_positions", "offset_patterns"]


def grid_positions(grid: tuple[int, int]) -> Tensor:
    """(h * w, 2) row and column of each patch, in a ViT's row-major token order."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], 1)


def offset_patterns(mean_map: Tensor, positions: Tensor | None = None,
                    per: str = "pair", reach: int | None = None) -> Tensor:
    """(H, Lq, Lk) mean attention maps -> (H, 2m+1, ...) attention at each offset key -
    query, one axis per coordinate of ``positions`` (Lk, P), integer-valued (default: the
    token index); offset 0 at the centre; queries are the last Lq keys (causal).

    ``per="pair"``: the mean weight of the map's (query, key) pairs at that offset (uniform
    attention over n keys is 1/n at every offset, so the grid's shape does not show through:
    what ``cluster_heads`` compares); ``per="query"``: the share of the map's mass at that
    offset (sums to 1 per head). Offsets no pair has are 0."""
    if per not in ("pair", "query"):
        raise ValueError(f"per must be 'pair' or 'query', got {per!r}")
    heads, lq, lk = mean_map.shape
    pos = torch.arange(lk)[:, None] if positions is None else positions[:lk]
    if pos.dtype.is_floating_point:
        if not torch.equal(pos, pos.round()):
            raise ValueError("offset_patterns needs integer positions (patch coordinates)")
        pos = pos.long()
    offsets = pos[None, :, :] - pos[lk - lq:, None, :]  # (Lq, Lk, P)
    reach = int(offsets.abs().max()) if reach is None else reach
    side, axes = 2 * reach + 1, pos.shape[1]
    strides = torch.tensor([side ** i for i in reversed(range(axes))])
    kept = (offsets.abs() <= reach).all(-1).flatten()  # (Lq * Lk,)
    flat = ((offsets + reach) * strides).sum(-1).flatten()[kept]
    mass = torch.zeros(heads, side ** axes, dtype=torch.float64)
    mass.index_add_(1, flat, mean_map.reshape(heads, -1)[:, kept].double())
    if per == "pair":
        pairs = torch.bincount(flat, minlength=side ** axes).double()
        out = mass / pairs.clamp_min(1)
    else:
        total = mass.sum(1, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError("a head's mean map holds no attention mass")
        out = mass / total
    return out.float().reshape(heads, *(side,) * axes)


@dataclass
class HeadClusters:
    """Heads grouped by their attention patterns. ``heads[i]`` = (layer, head) is in cluster
    ``labels[i]`` (0 .. k-1, numbered by first appearance in layer-head order);
    ``centroids[c]`` is the mean pattern of cluster c; ``silhouette`` the score of each k
    tried (cosine distance), ``linkage`` scipy's merge table for a dendrogram."""

    heads: list[tuple[int, int]]
    labels: list[int]
    k: int
    centroids: Tensor
    silhouette: dict[int, float] = field(default_factory=dict)
    linkage: np.ndarray | None = None

    def members(self, cluster: int) -> list[tuple[int, int]]:
        return [h for h, c in zip(self.heads, self.labels, strict=True) if c == cluster]


def cluster_heads(patterns: Mapping[int, Tensor], k: int | None = None,
                  max_k: int = 8) -> HeadClusters:
    """Cluster the heads of ``patterns`` {layer: (H, ...) pattern per head} (e.g.
    ``offset_patterns`` of each layer's mean map) by average-linkage hierarchical
    clustering on cosine distance. ``k`` clusters, or the k in 2..``max_k`` with the best
    silhouette score (scikit-learn) when None (1 for fewer than 3 heads)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    heads = [(layer, h) for layer in sorted(patterns) for h in range(patterns[layer].shape[0])]
    stacked = torch.cat([patterns[layer] for layer in sorted(patterns)])
    n = len(heads)
    features = stacked.reshape(n, -1).double().numpy()
    if n < 2:
        raise ValueError(f"need at least 2 heads to cluster, got {n}")
    if k is not None and not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of heads ({n}), got {k}")
    merges = linkage(features, method="average", metric="cosine")

    def cut(clusters: int) -> list[int]:
        raw = fcluster(merges, clusters, criterion="maxclust")
        order: dict[int, int] = {}
        return [order.setdefault(int(c), len(order)) for c in raw]

    scores: dict[int, float] = {}
    if k is None and n < 3:
        k = 1  # the silhouette needs 2 <= k <= n - 1
    if k is None:
        try:
            from sklearn.metrics import silhouette_score
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("choosing the number of clusters needs scikit-learn: pip "
                              "install 'attnlab[tasks]', or pass k") from err
        for clusters in range(2, min(max_k, n - 1) + 1):
            labels = cut(clusters)
            if len(set(labels)) > 1:
                scores[clusters] = float(silhouette_score(features, labels, metric="cosine"))
        if not scores:  # every cut gave a single cluster: identical patterns
            scores[1] = float("nan")
        k = max(scores, key=lambda c: (scores[c], -c))
    labels = cut(k)
    k = len(set(labels))  # fewer when heads have identical patterns
    label_t = torch.tensor(labels)
    centroids = torch.stack([stacked[label_t == c].mean(0) for c in range(k)])
    return HeadClusters(heads, labels, k, centroids, scores, merges)
