"""Record hook points of chosen layers and heads, and stream per-head aggregates.

``with capture(model, ["L0.weights", "L1.heads"]) as cap: model(x)`` keeps the tensors
(detached, on the CPU) under their names; ``cap.describe()`` lists names and shapes once.
``aggregate=True`` also streams, for every layer, statistics of its attention weights
(``HeadStats``), reduced as each forward runs, so long inputs never keep an L x L map per
head and input: entropy, mean attention distance, attention against distance (rings of
Chebyshev distance: the token gap, or patch rings of a ViT), mass on the first token and on
marked (special) tokens, the mean map (for inputs of the first length seen) and the column
sums behind the sink score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

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
    rows: Tensor | None = None  # (H,) real query rows seen
    sums: dict[str, Tensor] = field(default_factory=dict)  # (H,) each
    column_mass: Tensor | None = None  # (H, L): sum over queries of A[q, k]
    column_seen: Tensor | None = None  # (L,): queries that could see key k
    ring_mass: Tensor | None = None  # (H, D): attention mass at Chebyshev distance d
    ring_pairs: Tensor | None = None  # (D,): visible (query, key) pairs at distance d
    ring_uniform: Tensor | None = None  # (D,): the ring mass if every head were uniform
    uniform_distance: float = 0.0  # the distance sum if every head were uniform
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
        ring = (qpos[:, None] - kpos[None]).abs().amax(-1).round().long().flatten().cpu()
        terms = {"entropy": entropy, "distance": (p * dist).sum(-1), "first": p[..., 0]}
        if special is not None:
            terms["special"] = (p * special[:, None, None, :lk].float()).sum(-1)
        for name, value in terms.items():  # rows that see no key hold 0 (p is 0 there)
            self.sums[name] = self.sums.get(name, torch.zeros(h)) + value.sum((0, 2)).cpu()
        self.column_mass = _padded(self.column_mass, lk, h)
        self.column_seen = _padded(self.column_seen, lk)
        self.column_mass[:, :lk] += p.sum((0, 2)).cpu()
        self.column_seen[:lk] += vis_f.sum((0, 1, 2)).cpu()
        rings = int(ring.max()) + 1
        self.ring_mass = _padded(self.ring_mass, rings, h)
        self.ring_pairs = _padded(self.ring_pairs, rings)
        self.ring_uniform = _padded(self.ring_uniform, rings)
        self.ring_mass.index_add_(1, ring, p.sum(0).reshape(h, -1).cpu())
        self.ring_pairs.index_add_(0, ring, vis_f.sum((0, 1)).flatten().cpu())
        uniform = vis_f / vis_f.sum(-1, keepdim=True).clamp_min(1)  # (B, 1, Lq, Lk)
        self.ring_uniform.index_add_(0, ring, uniform.sum((0, 1)).flatten().cpu())
        self.uniform_distance += float((uniform * dist).sum())
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
        return self.sums[name] / _seen(self.rows).clamp_min(1)

    def mean_map(self) -> Tensor:
        """(H, Lq, Lk): the mean attention map over the inputs of the first length seen."""
        return _seen(self.map_sum) / max(self.map_count, 1)

    def distance_profile(self, per: str = "pair") -> Tensor:
        """(H, D): attention against distance d = 0, 1, ... (Chebyshev distance of the
        positions: the token gap, or the ring of patches around the query in a ViT).
        ``per="pair"``: the mean attention weight of a visible (query, key) pair at distance d
        (the "attention strength" of "How Does Attention Work in Vision Transformers?"; uniform
        attention over n keys gives 1/n at every d); ``per="query"``: the share of a query's
        mass at distance d (sums to 1 over d)."""
        return self._per(_seen(self.ring_mass), per)

    def uniform_profile(self, per: str = "pair") -> Tensor:
        """(D,): ``distance_profile`` of a head attending uniformly to every key it may see,
        on the same inputs (padding, causality and lengths as they were): the baseline."""
        return self._per(_seen(self.ring_uniform), per)

    def _per(self, mass: Tensor, per: str) -> Tensor:
        if per == "pair":
            return mass / _seen(self.ring_pairs).clamp_min(1)
        if per == "query":  # every head saw the same rows
            return mass / _seen(self.rows)[0].clamp_min(1)
        raise ValueError(f"per must be 'pair' or 'query', got {per!r}")

    def uniform_mean_distance(self) -> float:
        """``mean("distance")`` of uniform attention on the same inputs."""
        return self.uniform_distance / float(_seen(self.rows)[0].clamp_min(1))

    def sink_scores(self) -> Tensor:
        """(H, L): alpha_k = sum_q A[q, k] / (queries that see k): Gu et al.'s sink score
        (T - k queries see key k in a causal model)."""
        return _seen(self.column_mass) / _seen(self.column_seen).clamp_min(1)


def _seen(t: Tensor | None) -> Tensor:
    """A HeadStats sum, which exists once weights were seen (ValueError before)."""
    if t is None:
        raise ValueError("no attention weights were captured yet (run the model inside "
                         "capture(...) first)")
    return t


def _padded(t: Tensor | None, size: int, rows: int | None = None) -> Tensor:
    """``t`` zero-padded on its last axis to at least ``size`` (None: zeros of (``rows``,
    ``size``), or (``size``,) without rows)."""
    if t is None:
        return torch.zeros(size) if rows is None else torch.zeros(rows, size)
    return t if t.shape[-1] >= size else nn.functional.pad(t, (0, size - t.shape[-1]))


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
        self.model_masks: dict[int, Tensor | None] = {}  # attnlab layers: the call's padding

    def set_batch(self, key_mask: Tensor | None = None, special: Tensor | None = None) -> None:
        """Tell the aggregates about the next forward's batch: ``special`` (B, L) True for the
        tokens whose attention mass ``stats[layer].mean("special")`` measures; ``key_mask``
        (B, L) True for real tokens, used only where the model's own mask is not known (an
        attnlab layer called without ``mask=``): the statistics follow the mask the model
        used, so padding, windows and prefixes are never counted as keys a query saw."""
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

    def _visible(self, site: Site, w: Tensor) -> Tensor:
        """(B, 1, Lq, Lk): the keys each query of this call saw. On a Hugging Face model the
        mask the model passed (padding, causality, sliding windows, prefix-LM: whatever it
        holds); on an attnlab layer the key padding the layer was called with (else the one
        given to ``set_batch``) with its causality."""
        b, _, lq, lk = w.shape
        if hasattr(site.module, "visible"):  # integrations.hf: the call's own mask
            vis = cast(Tensor | None, site.module.visible)
            if vis is None:  # the model masked nothing
                return torch.ones(b, 1, lq, lk, dtype=torch.bool, device=w.device)
            if vis.dim() != 4 or vis.shape[1] != 1:
                raise ValueError(f"{site}: the model's mask has shape {tuple(vis.shape)}, "
                                 "expected (B, 1, Lq, Lk)")
            return vis.to(w.device).expand(b, 1, lq, lk)
        keys = self.model_masks.get(site.layer)
        if keys is None or keys.shape != (b, lk):
            keys = self.key_mask[:, -lk:] if self.key_mask is not None else \
                torch.ones(b, lk, dtype=torch.bool)
        keys = keys.to(w.device)
        return visible_pairs(keys[:, lk - lq:], keys, site.causal)

    def _aggregate(self, site: Site, w: Tensor) -> None:
        b, h, lq, lk = w.shape
        vis = self._visible(site, w)
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
                if not hasattr(site.module, "visible"):  # an attnlab layer: its mask= call
                    def padding(_m, _args, kwargs, layer=layer):
                        mask = kwargs.get("context_mask") if kwargs.get("context") is not None \
                            else kwargs.get("mask")
                        if mask is not None and kwargs.get("state") is None:
                            mask = mask.bool().flatten(1)  # spatial padding: token order
                        else:
                            mask = None
                        cap.model_masks[layer] = mask
                    handles.append(site.module.register_forward_pre_hook(padding,
                                                                         with_kwargs=True))
        yield cap
    finally:
        for handle in handles:
            handle.remove()
