"""Pictures of heads: a layer x head grid of attention maps, heat maps of per-head scores,
pruning curves. Each returns PNG bytes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from attnlab.arena.report import png
from attnlab.heads.importance import PruningCurve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_grid(maps: dict[int, Tensor], title: str, size: int = 48) -> bytes:
    """``maps`` {layer: (H, Lq, Lk)} mean attention maps, one panel per head (the first
    ``size`` queries and keys)."""
    plt = _pyplot()
    layers = sorted(maps)
    heads = max(m.shape[0] for m in maps.values())
    fig, axes = plt.subplots(len(layers), heads, figsize=(1.1 * heads, 1.1 * len(layers)),
                             squeeze=False)
    for r, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[r][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < maps[layer].shape[0]:
                ax.imshow(maps[layer][h, :size, :size].numpy(), cmap="viridis",
                          interpolation="nearest", aspect="auto")
            if h == 0:
                ax.set_ylabel(f"L{layer}", fontsize=7)
            if r == 0:
                ax.set_title(f"h{h}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return png(fig, plt)


def head_heatmap(scores: Tensor, title: str, label: str, fmt: str = ".2f") -> bytes:
    """(layers, heads) scores as a heat map with the values written in."""
    plt = _pyplot()
    layers, heads = scores.shape
    fig, ax = plt.subplots(figsize=(0.55 * heads + 1.5, 0.45 * layers + 1.2))
    image = ax.imshow(scores.numpy(), cmap="magma", aspect="auto")
    for i in range(layers):
        for j in range(heads):
            ax.text(j, i, format(float(scores[i, j]), fmt), ha="center", va="center",
                    fontsize=6, color="white" if scores[i, j] < scores.max() * 0.6 else "black")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    return png(fig, plt)


def pruning_plot(guided: PruningCurve, randoms: Sequence[PruningCurve], metric_name: str,
                 floor: float | None, title: str) -> bytes:
    """Metric against the fraction of heads pruned: the importance order, and the random
    orders' mean with their range."""
    import textwrap

    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(guided.fractions, guided.metrics, marker="o", markersize=3,
            label="importance order (iterative)")
    if randoms:
        table = np.array([c.metrics for c in randoms])
        ax.plot(randoms[0].fractions, table.mean(0), marker="s", markersize=3,
                label=f"random order (mean of {len(randoms)})")
        ax.fill_between(randoms[0].fractions, table.min(0), table.max(0), alpha=0.2,
                        label="random order (range)")
    if floor is not None:
        ax.axhline(floor, color="grey", linestyle="--", label=f"{floor}")
    ax.set_xlabel("fraction of heads pruned")
    ax.set_ylabel(textwrap.fill(metric_name, 36), fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png(fig, plt)


def distance_plot(profiles: dict[int, Tensor], title: str, xlabel: str, ylabel: str,
                  baseline: Tensor | None = None) -> bytes:
    """``profiles`` {layer: (H, D)}: one panel per layer, a line per head against distance
    (``baseline`` (D,): a dashed reference line in each panel, e.g. uniform attention)."""
    plt = _pyplot()
    layers = sorted(profiles)
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers) + 0.6, 2.8),
                             sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for h, row in enumerate(profiles[layer]):
            ax.plot(range(len(row)), row.numpy(), marker="o", markersize=2.5, label=f"h{h}")
        if baseline is not None:
            ax.plot(range(len(baseline)), baseline.numpy(), color="grey", linestyle="--",
                    label="uniform")
        ax.set_title(f"L{layer}", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return png(fig, plt)


def pattern_panels(maps: Tensor, titles: Sequence[str], title: str, *,
                   cmap: str = "viridis", symmetric: bool = False) -> bytes:
    """(N, a, b) patterns side by side, each with its title (a = 1: strips);
    ``symmetric``: each panel's colour range centred on 0 (for signed maps)."""
    plt = _pyplot()
    count = maps.shape[0]
    fig, axes = plt.subplots(1, count, figsize=(1.6 * count + 0.4, 2.0), squeeze=False)
    for ax, image, name in zip(axes[0], maps, titles, strict=True):
        top = float(image.abs().max()) or 1.0
        ax.imshow(image.numpy(), cmap=cmap, interpolation="nearest",
                  aspect="auto" if image.shape[0] == 1 else "equal",
                  **({"vmin": -top, "vmax": top} if symmetric else {}))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return png(fig, plt)


def dendrogram_plot(linkage, labels: Sequence[str], threshold: float | None,
                    title: str) -> bytes:
    """scipy's dendrogram of a linkage table, leaves named, coloured below ``threshold``."""
    from scipy.cluster.hierarchy import dendrogram

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * len(labels) + 1.5), 3.2))
    dendrogram(linkage, labels=list(labels), color_threshold=threshold, ax=ax,
               leaf_font_size=7)
    ax.set_ylabel("cosine distance (average linkage)", fontsize=8)
    ax.set_title(title, fontsize=9)
    return png(fig, plt)
