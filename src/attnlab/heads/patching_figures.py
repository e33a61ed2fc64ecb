"""Heat maps of patching scores (``attnlab.heads.patching``): layer x head, layer x position,
or one head x position panel per layer, on a diverging colour map centred on 0, cells that
hold no score (NaN) left blank."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from attnlab.heads.metrics import PatchScores

__all__ = ["patching_heatmap"]

FORMATS = (".png", ".svg")
MAX_WRITTEN = 256  # cells per panel up to which the values are written in ...
MAX_WRITTEN_COLUMNS = 16  # ... when it has at most this many columns


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(scores: Tensor, axes: tuple[str, ...]) -> tuple[list[Tensor], list[str], str, str]:
    """The 2-d panels to draw, their titles and the row and column axis names."""
    if scores.dim() == 1:
        return [scores[:, None]], [""], axes[0], ""
    if scores.dim() == 2:
        return [scores], [""], axes[0], axes[1]
    if scores.dim() == 3:  # (layer, head, position): a head x position panel per layer
        return [scores[i] for i in range(scores.shape[0])], \
            [f"{axes[0]} {i}" for i in range(scores.shape[0])], axes[1], axes[2]
    raise ValueError(f"scores must have 1 to 3 axes, got {scores.dim()} ({axes})")


def patching_heatmap(scores: PatchScores, path: str | Path, *, normalised: bool = True,
                     title: str | None = None, tokens: Sequence[str] | None = None) -> Path:
    """Write ``scores`` as a heat map to ``path`` (``.png`` or ``.svg``) and return the path.

    (layer, head) and (layer, position) scores make one map, (layer, head, position) one
    head x position panel per layer, (layer,) a single column. ``normalised``: the scores as
    a fraction of the metric's clean - corrupted gap (``PatchScores.normalised``), else the
    raw change of the metric. ``tokens`` label the position axis (one per position).
    Red is a positive change, blue a negative one, white none; NaN cells (heads a layer
    lacks, layers not patched) are blank; the values are written in on small maps."""
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"path must end in {' or '.join(FORMATS)}, got {out.name!r}")
    values = (scores.normalised() if normalised else scores.scores).detach().double().cpu()
    if values.shape != scores.scores.shape or len(scores.axes) != values.dim():
        raise ValueError(f"scores of shape {tuple(values.shape)} do not match their axes "
                         f"{scores.axes}")
    panels, titles, row_axis, col_axis = _panels(values, scores.axes)
    if tokens is not None:
        if "position" not in scores.axes:
            raise ValueError(f"tokens label positions, and these scores have none "
                             f"({scores.axes})")
        count = values.shape[scores.axes.index("position")]
        if len(tokens) != count:
            raise ValueError(f"tokens has {len(tokens)} labels for {count} positions")
    finite = values[values.isfinite()]
    top = float(finite.abs().max()) if finite.numel() else 0.0
    top = top or 1.0
    plt = _pyplot()
    rows, cols = panels[0].shape
    columns = min(len(panels), 4 if cols <= 8 else 2 if cols <= 16 else 1)
    lines = math.ceil(len(panels) / columns)
    width = max(3.0, (0.42 if cols <= 16 else 0.3) * cols + 1.6)
    height = max(2.2, 0.36 * rows + 1.2)
    fig, grid = plt.subplots(lines, columns, figsize=(width * columns + 0.8, height * lines),
                             squeeze=False, layout="constrained")
    image = None
    for k, ax in enumerate(grid.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        panel = panels[k]
        image = ax.imshow(panel.numpy(), cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto",
                          interpolation="nearest")
        if panel.numel() <= MAX_WRITTEN and cols <= MAX_WRITTEN_COLUMNS:
            for i in range(rows):
                for j in range(cols):
                    v = float(panel[i, j])
                    if math.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if abs(v) > 0.6 * top else "black")
        ax.set_yticks(range(rows))
        ax.set_ylabel(row_axis)
        if col_axis:
            ax.set_xticks(range(cols))
            if col_axis == "position" and tokens is not None:
                ax.set_xticklabels([str(t) for t in tokens], rotation=90, fontsize=7)
            ax.set_xlabel(col_axis)
        else:
            ax.set_xticks([])
        if titles[k]:
            ax.set_title(titles[k], fontsize=8)
    label = "share of the clean - corrupted gap" if normalised else "change of the metric"
    fig.colorbar(image, ax=grid.ravel().tolist(), label=label, shrink=0.9 if lines > 1 else 1.0)
    heading = title or (f"{scores.method}, {scores.point} ({scores.direction}): clean "
                        f"{scores.clean:.3g}, corrupted {scores.corrupted:.3g}")
    fig.suptitle(textwrap.fill(heading, int(12 * width * columns)), fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format=out.suffix.lower()[1:], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out

