"""Soft injection of task embeddings on TransformerLMs trained on ``icl_maps``, against
zero-shot and few-shot prompting ("Soft Injection of Task Embeddings Outperforms
Prompt-Based In-Context Learning", at toy scale).

Per run, for each k of ``few_shots`` and each map t of the family: the task embedding is
the head outputs at the last position averaged over ``prompts`` k-shot prompts of t (the fit
stream); the mixing weights are learned on the zero-shot prompts of the even inputs;
everything is measured on the prompts of the odd inputs (held out from the fit). The
paper's comparison is injection of k-shot embeddings into zero-shot prompts against k-shot
prompting itself (the same demonstrations per prompt). Also measured, per (map, query):
zero-shot alone; hard injection (alpha = 1 in every head, nothing learned); and the
control, another map's embedding (the effect must be the task's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.arena.stats import fmt, fmt_paired, mean_ci, paired_difference
from attnlab.heads.injection import fit_injection, inject, task_embedding
from attnlab.tasks.base import split_generator

__all__ = ["injection_scores", "injection_study"]

Tick = Callable[[], None] | None
METRICS = ("accuracy", "log_p")
OTHER = "other map's embedding"


def _scores(model: nn.Module, tokens: Tensor, answers: Tensor) -> tuple[Tensor, Tensor]:
    """(correct (B,), log p(answer) (B,)) at the last position."""
    with torch.no_grad():
        logp = model(tokens)[:, -1].float().log_softmax(-1)
    return (logp.argmax(-1) == answers).float(), logp.gather(-1, answers[:, None]).squeeze(-1)


def soft(k: int) -> str:
    return f"soft injection ({k}-shot embedding)"


def hard(k: int) -> str:
    return f"hard injection ({k}-shot embedding)"


def injection_scores(model: nn.Module, task: Any, *, few_shots: tuple[int, ...] = (1, 2, 4),
                     prompts: int = 64, draws: int = 4, steps: int = 100) -> dict[str, Any]:
    """Per condition, (correct, log p(answer)) of every (map, held-out query) item, in map
    order, and the learned weights {k: {map: {layer: (H,)}}}. For each k of ``few_shots``:
    k-shot prompting, and soft and hard injection of embeddings averaged over ``prompts``
    k-shot prompts; the control injects the next map's embedding (largest k) with the
    weights learned for the true map."""
    fit_stream, test_stream = split_generator(0, "fit"), split_generator(0, "test")
    n = task.symbols
    fit_queries, test_queries = torch.arange(0, n, 2), torch.arange(1, n, 2)
    embeddings: dict[int, list[dict[int, Tensor]]] = {}
    for k in few_shots:
        embeddings[k] = []
        for t in range(task.maps):
            few, _ = task.prompts(torch.full((prompts,), t), k, fit_stream)
            embeddings[k].append(task_embedding(model, functools.partial(model, few)))
    top = max(few_shots)
    names = ["zero-shot", *[name for k in few_shots for name in (f"{k}-shot", soft(k),
                                                               hard(k))], OTHER]
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in names}
    weights: dict[int, dict[int, dict[int, Tensor]]] = {k: {} for k in few_shots}
    for t in range(task.maps):
        fit_tokens, fit_answers = task.prompts(torch.full((len(fit_queries),), t), 0,
                                               fit_stream, queries=fit_queries)
        tokens, answers = task.prompts(torch.full((len(test_queries),), t), 0, fit_stream,
                                       queries=test_queries)
        parts["zero-shot"].append(_scores(model, tokens, answers))
        for k in few_shots:
            fit = fit_injection(model, embeddings[k][t], functools.partial(model, fit_tokens),
                                fit_answers, steps=steps)
            weights[k][t] = fit.weights
            ones = {layer: torch.ones_like(w) for layer, w in fit.weights.items()}
            runs = [(soft(k), embeddings[k][t], fit.weights), (hard(k), embeddings[k][t], ones)]
            if k == top:
                runs.append((OTHER, embeddings[k][(t + 1) % task.maps], fit.weights))
            for name, emb, alpha in runs:
                with inject(model, emb, alpha):
                    parts[name].append(_scores(model, tokens, answers))
            queries = test_queries.repeat(draws)
            k_tokens, k_answers = task.prompts(torch.full((len(queries),), t), k, test_stream,
                                               queries=queries)
            correct, logp = _scores(model, k_tokens, k_answers)
            parts[f"{k}-shot"].append((correct.view(draws, -1).mean(0),
                                       logp.view(draws, -1).mean(0)))
    items = {name: (torch.cat([c for c, _ in p]), torch.cat([lp for _, lp in p]))
             for name, p in parts.items()}
    return {"items": items, "weights": weights}


def comparisons(few_shots: tuple[int, ...]) -> list[tuple[str, str]]:
    """(condition, reference) pairs the study reports differences of."""
    top = max(few_shots)
    return [*[(soft(k), f"{k}-shot") for k in few_shots], (soft(top), "zero-shot"),
            (soft(top), OTHER), (soft(top), hard(top))]


def injection_study(store: str | Path, sweep: str, few_shots: tuple[int, ...] = (1, 2, 4),
                    prompts: int = 64, draws: int = 4, steps: int = 100,
                    tick: Tick = None) -> tuple[dict[str, Any], list, dict]:
    """Every finished icl_maps run of ``sweep`` with a saved model, per contestant; 95%
    intervals over seeds (runs) and, within each run, over (map, query) items."""
    from attnlab.heads.runs import load_run, saved_runs

    rows = [r for r in saved_runs(store, sweep) if r["config"]["task"] == "icl_maps"]
    if not rows:
        raise ValueError(f"no finished icl_maps run with a saved model in sweep {sweep!r} of "
                         f"{store}/")
    labels = list(dict.fromkeys(r["label"] for r in rows))  # the sweep's order
    rows.sort(key=lambda r: (labels.index(r["label"]), r["seed"]))
    few_shots = tuple(sorted(set(few_shots)))
    pairs = comparisons(few_shots)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    run_table, sections = [], []
    for row in rows:
        loaded = load_run(store, row["key"])
        scores = injection_scores(loaded.model, loaded.task, few_shots=few_shots,
                                  prompts=prompts, draws=draws, steps=steps)
        items = scores["items"]
        means = {name: {"accuracy": float(c.mean()), "log_p": float(lp.mean())}
                 for name, (c, lp) in items.items()}
        alpha = {str(k): {str(layer): torch.stack([w[layer] for w in by_map.values()])
                          .mean(0).tolist() for layer in sorted(by_map[0])}
                 for k, by_map in scores["weights"].items()}
        within = {f"{a} - {b}": paired_difference(dict(enumerate(items[a][0].tolist())),
                                                  dict(enumerate(items[b][0].tolist())))
                  for a, b in pairs[:len(few_shots)]}
        runs.setdefault(row["label"], {})[row["seed"]] = {
            "key": row["key"], "conditions": means, "mean_alpha": alpha,
            "items": len(items["zero-shot"][0]),
            "within_accuracy": {name: vars(p) for name, p in within.items()}}
        run_table.append([f"{row['label']} seed {row['seed']} ({row['key'][:10]})",
                          *[f"{means[f'{k}-shot']['accuracy']:.3f} / "
                            f"{means[soft(k)]['accuracy']:.3f}" for k in few_shots],
                          *[fmt_paired(p) for p in within.values()]])
        if tick:
            tick()
    names = list(means)
    across = {}
    for label, by_seed in runs.items():
        seeds = sorted(by_seed)

        def values(name: str, metric: str, by_seed=by_seed, seeds=seeds) -> dict[int, float]:
            return {s: by_seed[s]["conditions"][name][metric] for s in seeds}

        conditions = {name: {m: mean_ci(list(values(name, m).values())) for m in METRICS}
                      for name in names}
        differences = {f"{a} - {b}": {m: paired_difference(values(a, m), values(b, m))
                                      for m in METRICS} for a, b in pairs}
        across[label] = {"seeds": seeds, "conditions": conditions,
                         "differences": {name: {m: vars(p) for m, p in d.items()}
                                         for name, d in differences.items()}}
        table = [[name, *[fmt(*conditions[name][m], 3) for m in METRICS]] for name in names]
        diff_table = [[name, *[fmt_paired(d[m]) for m in METRICS]]
                      for name, d in differences.items()]
        alpha_lines = [f"{k}-shot embeddings, layer {layer}: " + ", ".join(
            f"h{h} {mean_ci([by_seed[s]['mean_alpha'][k][layer][h] for s in seeds])[0]:.2f}"
            for h in range(len(heads)))
            for k, layers in by_seed[seeds[0]]["mean_alpha"].items()
            for layer, heads in layers.items()]
        sections.append((f"{label}: soft injection against prompting ({len(seeds)} seeds)",
                         [("table", (["condition", "accuracy [95% CI over seeds]",
                                      "mean log p(answer)"], table)),
                          ("table", (["difference", "accuracy [95% CI over seeds]",
                                      "mean log p(answer)"], diff_table)),
                          ("list", ["mean learned alpha per head (over maps and seeds): "
                                    + "; ".join(alpha_lines)])]))
    summary = [f"task embedding of a map: head outputs at the last position averaged over "
               f"{prompts} k-shot prompts of it (fit stream), for k = "
               f"{', '.join(map(str, few_shots))}; alpha = sigmoid(theta) per head, theta "
               f"from 0 (alpha 0.5), {steps} Adam steps (lr 0.1) on the zero-shot prompts of "
               "the even inputs; everything measured on the zero-shot (or k-shot) prompts of "
               f"the odd inputs, held out from the fit; k-shot prompting: {draws} "
               "demonstration sets per item (test stream)",
               "cells of the per-run table: k-shot prompting / soft injection of k-shot "
               "embeddings, accuracy over the run's (map, held-out query) items; then soft "
               "- prompting with its 95% CI over items"]
    run_header = ["run", *[f"{k}-shot: prompting / injection" for k in few_shots],
                  *[f"{a} - {b}" for a, b in pairs[:len(few_shots)]]]
    sections.insert(0, ("Per run", [("list", summary), ("table", (run_header, run_table))]))
    numbers = {"runs": runs, "across_seeds": across, "prompts": prompts,
               "few_shots": list(few_shots), "draws": draws, "steps": steps}
    return numbers, sections, {}
