"""Record hook points of chosen layers and heads, and stream per-head aggregates.

``with capture(model, ["L0.weights", "L1.heads"]) as cap: model(x)`` keeps the tensors
(detached, on the CPU) under their names; ``cap.describe()`` lists names and shapes once.
``aggregate=True`` also streams, for every layer, statistics of its attention weights
(``HeadStats``), reduced as each forward runs, so long inputs never keep an L x L map per
head and input: entropy, mean attention distance, mass on the first token and on marked
(special) tokens, the mean map (for inputs of the first length seen) and the column sums
behind the sink score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnlab.heads.sites import Site, parse_point, sites

__all__ = ["Capture", "HeadStats", "capture"]

HEAD_DIM = {"q": 1, "weights": 1, "heads": 2}  # where the heads are; k and v keep kv heads


def visible_pairs(query_real: Tensor, key_real: Tensor, causal: bool) -> Tensor:
    """(B, 1, Lq, Lk): which query may see which key (real tokens; causal: aligned to the
    end of the keys)."""
    vis = query_real[:, None, :, None] & key_real[:, None, None, :]
    if causal:
        lq, lk = vis.shape[-2:]
        vis = vis & torch.ones(lq, lk, dtype=torch.bool, device=vis.device).tril(lk - lq)
    return vis


@dataclass
class HeadStats:
    """Streaming statistics of one layer's attention weights, per head (sums; the methods
    give the means). ``positions`` (L, P) sets the coordinates for distances (default: the
    token index); distances use the first rows of it."""

    heads: int
    rows: Tensor = None  # (H,) real query rows seen
    sums: dict[str, Tensor] = field(default_factory=dict)  # (H,) each
    column_mass: Tensor | None = None  # (H, L): sum over queries of A[q, k]
    column_seen: Tensor | None = None  # (L,): queries that could see key k
    map_sum: Tensor | None = None  # (H, Lq, Lk) of the first shape seen
    map_count: int = 0

    def update(self, w: Tensor, vis: Tensor, special: Tensor | None,
               positions: Tensor | None) -> None:
        w = w.detach().float()
        vis_f = vis.float()
        b, h, lq, lk = w.shape
        real_rows = vis.any(-1).float()  # (B, 1, Lq): rows that see at least one key
        if self.rows is None:
            self.rows = torch.zeros(h)
        self.rows += real_rows.sum((0, 2)).cpu().expand(h)
        p = w * vis_f
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (B, H, Lq)
        if positions is None:
            qpos = torch.arange(lk - lq, lk, device=w.device, dtype=torch.float32)[:, None]
            kpos = torch.arange(lk, device=w.device, dtype=torch.float32)[:, None]
        else:
            kpos = positions[:lk].to(w.device, torch.float32)
            qpos = kpos[lk - lq:]
        dist = torch.cdist(qpos, kpos)  # (Lq, Lk)
        terms = {"entropy": entropy, "distance": (p * dist).sum(-1), "first": p[..., 0]}
        if special is not None:
            terms["special"] = (p * special[:, None, None, :lk].float()).sum(-1)
        for name, value in terms.items():  # rows that see no key hold 0 (p is 0 there)
            self.sums[name] = self.sums.get(name, torch.zeros(h)) + value.sum((0, 2)).cpu()
        if self.column_mass is None or self.column_mass.shape[1] < lk:
            grow = lk if self.column_mass is None else lk - self.column_mass.shape[1]
            self.column_mass = _grow(self.column_mass, h, grow)
            self.column_seen = _grow(None if self.column_seen is None else
                                     self.column_seen[None], 1, grow)[0]
        self.column_mass[:, :lk] += p.sum((0, 2)).cpu()
        self.column_seen[:lk] += vis_f.sum((0, 1, 2)).cpu()
        if self.map_sum is None:
            self.map_sum = torch.zeros(h, lq, lk)
        if self.map_sum.shape[1:] == (lq, lk):
            self.map_sum += p.sum(0).cpu()
            self.map_count += b

    def mean(self, name: str) -> Tensor:
        """Per-head mean over the real query rows of ``entropy``, ``distance``, ``first``
        (mass on the first key) or ``special`` (mass on the marked keys)."""
        if name not in self.sums:
            raise KeyError(f"no {name!r} statistic (known: {', '.join(self.sums)}; "
                           "'special' needs cap.set_batch(special=...))")
        return self.sums[name] / self.rows.clamp_min(1)

    def mean_map(self) -> Tensor:
        """(H, Lq, Lk): the mean attention map over the inputs of the first length seen."""
        return self.map_sum / max(self.map_count, 1)

    def sink_scores(self) -> Tensor:
        """(H, L): alpha_k = sum_q A[q, k] / (queries that see k): Gu et al.'s sink score
        (T - k queries see key k in a causal model)."""
        return self.column_mass / self.column_seen.clamp_min(1)


def _grow(t: Tensor | None, rows: int, extra: int) -> Tensor:
    pad = torch.zeros(rows, extra)
    return pad if t is None else torch.cat([t, pad], 1)


class Capture:
    """What ``capture`` recorded: ``cap["L0.weights"]`` (the forwards' tensors joined on the
    batch axis), ``cap.records`` (one tensor per forward), ``cap.stats[layer]``."""

    def __init__(self, model_sites: list[Site]) -> None:
        self.sites = model_sites
        self.records: dict[str, list[Tensor]] = {}
        self.stats: dict[int, HeadStats] = {}
        self.key_mask: Tensor | None = None
        self.special: Tensor | None = None
        self.positions: Tensor | None = None

    def set_batch(self, key_mask: Tensor | None = None, special: Tensor | None = None) -> None:
        """Tell the aggregates about the next forward's batch: ``key_mask`` (B, L) True for
        real tokens (padding is left out of every statistic), ``special`` (B, L) True for the
        tokens whose attention mass ``stats[layer].mean("special")`` measures."""
        self.key_mask = None if key_mask is None else key_mask.bool()
        self.special = None if special is None else special.bool()

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.records:
            raise KeyError(f"{name!r} was not captured (captured: {', '.join(self.records)})")
        parts = self.records[name]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ValueError(f"{name}: the forwards had different shapes "
                             f"({sorted({tuple(p.shape) for p in parts})}); use "
                             f"cap.records[{name!r}]")
        return torch.cat(parts)

    def describe(self) -> str:
        """One line per captured name with its shape (of the first forward) and count."""
        return "\n".join(f"{name:<14} {tuple(parts[0].shape)}  x{len(parts)}"
                         for name, parts in self.records.items() if parts)

    def _record(self, name: str, tensor: Tensor, heads: list[int] | None, point: str) -> None:
        t = tensor.detach()
        if heads is not None and point in HEAD_DIM:
            t = t.index_select(HEAD_DIM[point], torch.tensor(heads, device=t.device))
        self.records.setdefault(name, []).append(t.cpu())

    def _aggregate(self, site: Site, w: Tensor) -> None:
        b, h, lq, lk = w.shape
        keys = self.key_mask if self.key_mask is not None else \
            torch.ones(b, lk, dtype=torch.bool)
        keys = keys[:, -lk:].to(w.device)
        vis = visible_pairs(keys[:, lk - lq:], keys, site.causal)
        stats = self.stats.setdefault(site.layer, HeadStats(h))
        special = None if self.special is None else self.special[:, -lk:].to(w.device)
        stats.update(w, vis, special, self.positions)


@contextlib.contextmanager
def capture(model: nn.Module, points: Sequence[str] = (), *,
            heads: Sequence[int] | None = None, aggregate: bool = False,
            layers: Sequence[int] | None = None,
            positions: Tensor | None = None) -> Iterator[Capture]:
    """Record ``points`` (names ``L<layer>.<q|k|v|weights|heads>``) of every forward run
    inside the block; ``heads`` keeps only those heads of q, weights and heads (k and v keep
    their kv heads). ``aggregate=True`` streams ``HeadStats`` for ``layers`` (default: all)
    from each forward's weights, which are then computed for those layers (the mechanism's
    ``weights()``) and dropped once reduced. ``positions`` (L, P): token coordinates for the
    mean attention distance (e.g. patch rows and columns of a ViT)."""
    model_sites = sites(model)
    cap = Capture(model_sites)
    cap.positions = positions
    parsed = [parse_point(name, model_sites) for name in points]
    handles = []
    try:
        for name, (site, point) in zip(points, parsed, strict=True):
            def record(_m, _i, out, name=name, point=point):
                cap._record(name, out, None if heads is None else list(heads), point)
            handles.append(site.hook(point).register_forward_hook(record))
        if aggregate:
            chosen = range(len(model_sites)) if layers is None else layers
            for layer in chosen:
                if not 0 <= layer < len(model_sites):
                    raise ValueError(f"layer {layer} out of range (0..{len(model_sites) - 1})")
                site = model_sites[layer]

                def stats(_m, _i, out, site=site):
                    cap._aggregate(site, out)
                handles.append(site.hook("weights").register_forward_hook(stats))
        yield cap
    finally:
        for handle in handles:
            handle.remove()
