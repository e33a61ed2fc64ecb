"""The analyses behind ``attnlab heads``: each takes a ``Subject`` and returns its numbers
and the report sections (tables, lists, figures) that show them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnlab.heads import figures
from attnlab.heads.capture import HeadStats, capture
from attnlab.heads.importance import (
    ablation_scores,
    head_importance,
    pruning_curve,
    rank_correlation,
    real_heads,
)
from attnlab.heads.sinks import massive_activations, sink_heads
from attnlab.heads.sites import sites
from attnlab.heads.spatial import cluster_heads, offset_patterns
from attnlab.heads.subjects import Subject

Tick = Callable[[], None] | None
Result = tuple[dict[str, Any], list[tuple[str, list[tuple[str, Any]]]], dict[str, bytes]]


def grid_rows(scores: Tensor, fmt: str = ".3f", corner: str = "layer"
              ) -> tuple[list[str], list[list[str]]]:
    """A (layers, heads) score grid as a table: header [corner, h0, ...], rows L0, L1, ..."""
    header = [corner, *[f"h{h}" for h in range(scores.shape[1])]]
    return header, [[f"L{i}", *[format(float(v), fmt) for v in row]]
                    for i, row in enumerate(scores)]


def statistics(subject: Subject, tick: Tick = None) -> dict[int, HeadStats]:
    """Every layer's streamed attention statistics over the subject's inputs."""
    with torch.no_grad(), capture(subject.model, aggregate=True,
                                  positions=subject.positions) as cap:
        for run, key_mask, special in subject.inputs:
            cap.set_batch(key_mask=key_mask, special=special)
            run()
            if tick:
                tick()
    return cap.stats


def capture_analysis(subject: Subject, tick: Tick = None,
                     stats: dict[int, HeadStats] | None = None) -> Result:
    """Mean attention maps (first input batch's length), entropy and distance per head
    (``stats``: ``statistics(subject)`` when already computed)."""
    stats = statistics(subject, tick) if stats is None else stats
    entropy = torch.stack([stats[k].mean("entropy") for k in sorted(stats)])
    distance = torch.stack([stats[k].mean("distance") for k in sorted(stats)])
    images = {"attention_maps": figures.attention_grid(
                  {k: s.mean_map() for k, s in stats.items()},
                  f"{subject.name}: mean attention map per head"),
              "entropy": figures.head_heatmap(entropy, "mean attention entropy (nats)",
                                              "nats"),
              "distance": figures.head_heatmap(distance, f"mean attention distance "
                                               f"({subject.unit})", subject.unit, ".1f")}
    sections: list[tuple[str, list[tuple[str, Any]]]]
    sections = [("Mean attention maps (layer x head)", [("image", "attention_maps")]),
                ("Attention entropy per head (mean over real query tokens)",
                 [("table", grid_rows(entropy)), ("image", "entropy")]),
                (f"Mean attention distance per head ({subject.unit}, Euclidean)",
                 [("table", grid_rows(distance, ".2f")), ("image", "distance")])]
    return {"entropy": entropy.tolist(), "distance": distance.tolist()}, sections, images


def importance_analysis(subject: Subject, tick: Tick = None) -> Result:
    """Michel et al. importance next to exhaustive single-head ablation of the metric."""
    importance = head_importance(subject.model, subject.losses, progress=tick)
    base, change = ablation_scores(subject.model, subject.metric, progress=tick)
    keep = real_heads(subject.model)  # layers with fewer heads are padded
    rho = rank_correlation(importance, -change, keep)
    top = sorted((float(change[a, b]), a, b) for a in range(change.shape[0])
                  for b in range(change.shape[1]) if keep[a, b])[:5]
    lines = [f"metric of the full model: {base:.4f} ({subject.metric_name})",
             f"Spearman rank correlation of importance with the metric's drop under "
             f"single-head ablation: {rho:.3f}",
             "heads whose removal alone lowers the metric most: " +
             ", ".join(f"L{a}h{b} ({c:+.4f})" for c, a, b in top),
             f"heads whose removal alone changes the metric by less than 0.001: "
             f"{int((change.abs() < 1e-3).sum())} of {change.numel()}"]
    images = {"importance": figures.head_heatmap(importance, "head importance |dL/dxi| "
                                                 "(layer-normalised)", "importance"),
              "ablation": figures.head_heatmap(change, "metric change with the head "
                                               "zeroed alone", "change", ".3f")}
    sections: list[tuple[str, list[tuple[str, Any]]]]
    sections = [("Summary: importance", [("list", lines)]),
                ("Head importance (Michel et al. 2019, each layer L2-normalised)",
                 [("table", grid_rows(importance)), ("image", "importance")]),
                ("Single-head ablation: metric change (zeroed head)",
                 [("table", grid_rows(change, "+.4f")), ("image", "ablation")])]
    return ({"importance": importance.tolist(), "ablation_change": change.tolist(),
             "metric_full": base, "spearman": rho}, sections, images)


def pruning_analysis(subject: Subject, step: float = 0.1, floor: float | None = None,
                     seeds: int = 3, tick: Tick = None) -> Result:
    """Iterative pruning by importance (re-scored each step) against ``seeds`` random
    orders (seeds 0, 1, ...)."""
    def importance() -> Tensor:
        return head_importance(subject.model, subject.losses)

    guided = pruning_curve(subject.model, subject.metric, step, importance, progress=tick)
    randoms = [pruning_curve(subject.model, subject.metric, step, seed=seed, progress=tick)
               for seed in range(seeds)]
    table = torch.tensor([c.metrics for c in randoms])  # (seeds, points)
    rows = [[f"{f:.3f}", f"{a:.4f}", f"{float(table[:, i].mean()):.4f}",
             f"{float(table[:, i].min()):.4f} – {float(table[:, i].max()):.4f}"]
            for i, (f, a) in enumerate(zip(guided.fractions, guided.metrics, strict=True))]
    lines, before = [], None
    if floor is not None:
        before = {"importance": guided.heads_before(floor),
                  "random": [c.heads_before(floor) for c in randoms]}
        lines = [f"importance order: {before['importance']} of {guided.total} heads pruned "
                 f"before the metric drops below {floor}",
                 f"random orders (seeds 0-{seeds - 1}): {before['random']} heads"]
    images = {"pruning": figures.pruning_plot(guided, randoms, subject.metric_name, floor,
                                              f"{subject.name}: iterative head pruning")}
    sections: list[tuple[str, list[tuple[str, Any]]]]
    sections = [(f"Pruning curves (importance order re-scored after each step; {seeds} "
                 "random orders)",
                 [("list", lines), ("table", (["fraction pruned", "importance order",
                                               "random (mean)", "random (min – max)"],
                                              rows)),
                  ("image", "pruning")]),
                ("Pruning order (importance)", [("list", [", ".join(
                    f"L{a}h{b}" for a, b in guided.pruned)])])]
    return ({"fractions": guided.fractions, "importance_order": guided.metrics,
             "random_orders": table.tolist(), "pruned_importance": guided.pruned,
             "heads_before_floor": before, "floor": floor, "step": step}, sections, images)


def sinks_analysis(subject: Subject, threshold: float = 0.3, tick: Tick = None,
                   stats: dict[int, HeadStats] | None = None) -> Result:
    """Sink score of the first token per head, mass on special tokens, massive
    activations (``stats``: ``statistics(subject)`` when already computed)."""
    stats = statistics(subject, tick) if stats is None else stats
    layers = sorted(stats)
    first = torch.stack([stats[k].sink_scores()[:, 0] for k in layers])
    heads, share = sink_heads({k: stats[k].sink_scores() for k in layers}, 0, threshold)
    lines = [f"sink heads on the first token (alpha_0 > {threshold}): {len(heads)} of "
             f"{first.numel()} ({share:.0%}): " + ", ".join(f"L{a}h{b}" for a, b in heads)]
    sections: list[tuple[str, list[tuple[str, Any]]]] = []
    images = {"sink_first": figures.head_heatmap(first, "sink score of the first token",
                                                 "alpha_0")}
    numbers: dict[str, Any] = {"sink_first": first.tolist(), "sink_heads": heads,
                               "sink_share": share, "threshold": threshold}
    if all("special" in stats[k].sums for k in layers):
        special = torch.stack([stats[k].mean("special") for k in layers])
        numbers["special_mass"] = special.tolist()
        images["special"] = figures.head_heatmap(special, "attention mass on the marked "
                                                 "special tokens", "mass")
        strong = (special > 0.5).nonzero().tolist()
        lines.append(f"heads putting more than half their mass on the special tokens: "
                     f"{len(strong)}: " + ", ".join(f"L{a}h{b}" for a, b in strong))
    sections.append(("Summary: sinks", [("list", lines)]))
    sections.append(("Sink score of the first token per head (alpha_0 = sum_q A[q,0] / "
                     "queries that see it)", [("table", grid_rows(first)),
                                              ("image", "sink_first")]))
    if "special" in images:
        sections.append(("Attention mass on the special tokens",
                         [("table", grid_rows(torch.tensor(numbers["special_mass"]))),
                          ("image", "special")]))
    if subject.hidden_states is not None:
        hidden, key_mask = subject.hidden_states(0)
        rows, found = [], {}
        for layer, h in enumerate(hidden):
            m = massive_activations(h, key_mask=key_mask)
            by_token: dict[str, list[float]] = {}
            for b, t in key_mask.nonzero().tolist():
                by_token.setdefault(subject.tokens[0][b][t], []).append(float(m.phi[b, t]))
            ranked = sorted(((sum(v) / len(v), k, len(v)) for k, v in by_token.items()),
                            reverse=True)[:5]
            found[layer] = {"dims": m.dims, "sink_tokens": int(m.tokens.sum()),
                            "real_tokens": int(key_mask.sum()),
                            "top_tokens_mean_phi": [(k, p, n) for p, k, n in ranked]}
            rows.append([str(layer), ", ".join(map(str, m.dims[:8])) or "–",
                         f"{int(m.tokens.sum())} of {int(key_mask.sum())}",
                         ", ".join(f"{k} {p:.1f} (x{n})" for p, k, n in ranked)])
        numbers["massive_activations"] = found
        sections.append(("Massive activations (hidden states: embeddings = 0, then each "
                         "layer's output)",
                         [("table", (["hidden state", "dims of the sink tokens",
                                      "tokens with phi >= tau",
                                      "highest mean phi (token, mean phi, count)"], rows)),
                          ("list", [f"tau = 20 sqrt(D / 4096) = {m.tau:.2f} for D = "
                                    f"{hidden[0].shape[-1]}: the paper's threshold as a share "
                                    "of the token's energy in one dimension"])]))
    return numbers, sections, images


def spatial_analysis(subject: Subject, stats: dict[int, HeadStats] | None = None,
                     importance: Tensor | None = None, clusters: int | None = None,
                     tick: Tick = None, shown: int = 12,
                     importance_name: str = "importance") -> Result:
    """"How Does Attention Work in Vision Transformers?": attention strength against
    distance per head and its trend over the layers, the heads clustered by their offset
    patterns (``clusters`` of them, or chosen by silhouette), and with ``importance``
    (layers, heads; higher = more important, ``importance_name`` says what it is) how
    important each kind of head is. Tables show the first ``shown``
    distances; results.json has them all."""
    stats = statistics(subject, tick) if stats is None else stats
    layers, unit = sorted(stats), subject.unit
    strength = {k: stats[k].distance_profile("pair") for k in layers}
    share = {k: stats[k].distance_profile("query") for k in layers}
    local = torch.stack([share[k][:, :2].sum(1) for k in layers])  # mass within distance 1
    distance = torch.stack([stats[k].mean("distance") for k in layers])
    extent = int(stats[layers[0]].mean_map().shape[-1] if subject.positions is None
                 else subject.positions.max()) + 1
    reach = max(1, extent // 2)  # offsets up to half the grid: enough pairs behind each
    patterns = {k: offset_patterns(stats[k].mean_map(), subject.positions, reach=reach)
                for k in layers}
    found = cluster_heads(patterns, clusters)
    dims = 1 if subject.positions is None else subject.positions.shape[1]
    side = patterns[layers[0]].shape[-1]
    picture = {k: torch.stack([picture_of(h, dims, side) for h in p])
               for k, p in patterns.items()}

    def name(head: tuple[int, int]) -> str:
        return f"L{head[0]}h{head[1]}"

    first = stats[layers[0]]  # uniform attention on the same inputs: the baseline
    flat_local = float(first.uniform_profile("query")[:2].sum())
    flat_pair = first.uniform_profile("pair")
    kinds: list[dict[str, Any]]
    rows, kinds = [], []
    for c in range(found.k):
        members = found.members(c)
        centroid = found.centroids[c]
        profile = torch.stack([strength[a][b] for a, b in members]).mean(0)
        peak = int(profile.argmax())  # the distance its members attend to most, per pair
        mean_imp = (f"{float(torch.stack([importance[a, b] for a, b in members]).mean()):.3f}"
                    if importance is not None else "–")
        kinds.append({"members": members, "peak_distance": peak,
                      "self_weight": float(centroid.flatten()[centroid.numel() // 2]),
                      "mean_distance": float(torch.stack([distance[a, b]
                                                          for a, b in members]).mean()),
                      "mean_importance": None if importance is None else float(mean_imp)})
        rows.append([str(c), str(len(members)), str(peak),
                     f"{kinds[-1]['self_weight'] / float(flat_pair[0]):.2f}",
                     f"{kinds[-1]['mean_distance']:.2f}", mean_imp,
                     ", ".join(map(name, members))])
    trend = ", ".join(f"L{k} {float(distance[i].mean()):.2f}" for i, k in enumerate(layers))
    lines = [f"mean attention distance by layer (mean over heads, {unit}): {trend}; "
             f"uniform attention: {first.uniform_mean_distance():.2f}",
             "share of attention within distance 1 by layer: " +
             ", ".join(f"L{k} {float(local[i].mean()):.2f}" for i, k in enumerate(layers)) +
             f"; uniform attention: {flat_local:.2f}",
             f"local heads (more than half their mass within distance 1): "
             f"{int((local > 0.5).sum())} of {local.numel()}: " +
             ", ".join(f"L{a}h{b}" for a, b in (local > 0.5).nonzero().tolist()),
             f"{found.k} clusters of attention patterns " +
             ("(k given)" if clusters is not None else
              f"(k by silhouette, {found.silhouette[found.k]:.2f})" if found.silhouette
              else "(too few heads to choose k)")]
    numbers: dict[str, Any] = {
        "unit": unit, "strength_per_pair": {k: strength[k].tolist() for k in layers},
        "share_per_query": {k: share[k].tolist() for k in layers},
        "within_1": local.tolist(), "clusters": found.labels, "heads": found.heads,
        "k": found.k, "silhouette": found.silhouette, "kinds": kinds,
        "uniform": {"distance": first.uniform_mean_distance(), "within_1": flat_local,
                    "strength_per_pair": flat_pair.tolist()}}
    if importance is not None:
        rho = rank_correlation(importance, local)
        numbers["spearman_importance_locality"] = rho
        top = sorted(found.heads, key=lambda h: -float(importance[h[0], h[1]]))
        top = top[:max(1, len(top) // 4)]
        lines += [f"importance here: {importance_name}",
                  f"Spearman rank correlation of importance with the share within distance "
                  f"1: {rho:.3f}",
                  "the most important quarter of the heads and their clusters: " + ", ".join(
                      f"{name(h)} (c{found.labels[found.heads.index(h)]})" for h in top)]
    heads_rows = [[name((k, h)), *[f"{float(v):.3f}" for v in strength[k][h, :shown]]]
                  for k in layers for h in range(strength[k].shape[0])]
    heads_rows.append(["uniform", *[f"{float(v):.3f}" for v in flat_pair[:shown]]])
    width = min(shown, strength[layers[0]].shape[1])
    assert found.linkage is not None  # cluster_heads keeps its merge table
    threshold = None if found.k < 2 else float(found.linkage[-(found.k - 1), 2])
    images = {"strength": figures.distance_plot(
                  {k: v[:, :shown] for k, v in strength.items()},
                  "attention strength against distance (mean weight per pair)",
                  f"distance ({unit})", "mean weight", flat_pair[:shown]),
              "patterns": figures.attention_grid(picture, "offset pattern per head (key - "
                                                 "query, offset 0 at the centre)"),
              "clusters": figures.pattern_panels(
                  torch.stack([picture_of(c, dims, side) for c in found.centroids]),
                  [f"c{c} ({len(found.members(c))})" for c in range(found.k)],
                  "cluster centroids"),
              "dendrogram": figures.dendrogram_plot(found.linkage,
                                                    [name(h) for h in found.heads],
                                                    threshold, "heads by attention pattern")}
    sections: list[tuple[str, list[tuple[str, Any]]]]
    sections = [("Summary: where the heads look", [("list", lines)]),
                (f"Attention strength against distance (mean attention weight of a query-key "
                 f"pair at Chebyshev distance d, {unit})",
                 [("table", (["head", *[f"d={d}" for d in range(width)]], heads_rows)),
                  ("image", "strength")]),
                ("Attention patterns (mean attention weight at each offset key - query)",
                 [("image", "patterns")]),
                ("Heads clustered by attention pattern (average linkage, cosine distance)",
                 [("table", (["cluster", "heads", "strongest distance",
                              "weight on itself (x uniform)",
                              f"mean distance ({unit})", "mean importance", "members"],
                             rows)),
                  ("image", "clusters"), ("image", "dendrogram")])]
    return numbers, sections, images


def picture_of(pattern: Tensor, dims: int, side: int) -> Tensor:
    """A pattern as an image: 2-D as is, 1-D offsets -16..16 as a one-row strip."""
    return pattern if dims == 2 else pattern[None, max(0, side // 2 - 16):side // 2 + 17]


def model_lines(subject: Subject) -> list[str]:
    found = sites(subject.model)
    return [f"model: {subject.name}, {len(found)} attention layers x {found[0].heads} heads",
            *subject.notes]
