"""Attention supervision in arena training, against the same runs without it: does the
loss put the supervised head's attention on its targets, and what does it cost the task?"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from attnlab.arena.stats import fmt, fmt_paired, mean_ci, paired_difference
from attnlab.arena.supervision import target_mass
from attnlab.heads.capture import capture
from attnlab.heads.sites import sites

__all__ = ["supervision_study"]

Tick = Callable[[], None] | None
TOLERANCE = 0.02  # the largest mean drop of test accuracy the loss may cost (stated before)


def _runs(store: str | Path, sweep: str) -> dict[int, dict[str, Any]]:
    from attnlab.heads.runs import saved_runs

    return {r["seed"]: r for r in saved_runs(store, sweep)}


def head_target_mass(model: torch.nn.Module, task: Any, sequences: int = 256,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """{eval pair count: (layers, heads) mean attention mass on the targets at the queries}
    on ``sequences`` fixed sequences per count."""
    out = {}
    names = [f"L{s.layer}.weights" for s in sites(model)]
    for label, params in task.slices():
        batch = task.sample(sequences, torch.Generator().manual_seed(seed), **params)
        targets, queries = task.attention_targets(batch)
        with torch.no_grad(), capture(model, names) as cap:
            model(batch[0])
        out[label] = torch.stack([target_mass(cap[n], targets).permute(0, 2, 1)[queries].mean(0)
                                  for n in names])
    return out


def supervision_study(store: str | Path, sweep: str, control: str,
                      tick: Tick = None) -> tuple[dict[str, Any], list, dict]:
    """Runs of ``sweep`` (supervised) and ``control`` (not), paired by seed."""
    from attnlab.heads.runs import load_run

    supervised, plain = _runs(store, sweep), _runs(store, control)
    seeds = sorted(set(supervised) & set(plain))
    if not seeds:
        raise ValueError(f"no seed has a finished run with a saved model in both {sweep!r} "
                         f"and {control!r} of {store}/")
    spec = supervised[seeds[0]]["config"]["train"].get("supervise")
    if not spec:
        raise ValueError(f"the runs of {sweep!r} were not trained with [train.supervise]")
    heads = [tuple(h) for h in spec["heads"]]
    mass: dict[str, dict[int, dict[str, torch.Tensor]]] = {"supervised": {}, "control": {}}
    metrics: dict[str, dict[int, dict[str, float]]] = {"supervised": {}, "control": {}}
    for name, rows in (("supervised", supervised), ("control", plain)):
        for seed in seeds:
            run = load_run(store, rows[seed]["key"])
            mass[name][seed] = head_target_mass(run.model, run.task)
            metrics[name][seed] = rows[seed]["metrics"]
            if tick:
                tick()
    counts = list(mass["supervised"][seeds[0]])
    layers, per_layer = mass["supervised"][seeds[0]][counts[0]].shape
    rows_ = []
    for layer in range(layers):
        for head in range(per_layer):
            for count in counts:
                s = {seed: float(mass["supervised"][seed][count][layer, head]) for seed in seeds}
                c = {seed: float(mass["control"][seed][count][layer, head]) for seed in seeds}
                rows_.append([f"L{layer}h{head}" + (" (supervised)" if (layer, head) in heads
                                                    else ""), count,
                              fmt(*mean_ci(list(s.values())), 3),
                              fmt(*mean_ci(list(c.values())), 3),
                              fmt_paired(paired_difference(s, c))])
    task_rows, numbers = [], {"heads": heads, "weight": spec.get("weight"), "seeds": seeds,
                              "tolerance": TOLERANCE}
    for metric in ("accuracy", "loss"):
        s = {seed: metrics["supervised"][seed][metric] for seed in seeds}
        c = {seed: metrics["control"][seed][metric] for seed in seeds}
        diff = paired_difference(s, c)
        numbers[metric] = {"supervised": s, "control": c, "difference": diff.mean,
                           "half": diff.half}
        task_rows.append([f"test {metric}", fmt(*mean_ci(list(s.values())), 4),
                          fmt(*mean_ci(list(c.values())), 4), fmt_paired(diff)])
    drop = -numbers["accuracy"]["difference"]
    verdict = (f"tolerance (stated before the runs): mean test-accuracy drop <= {TOLERANCE}; "
               f"measured drop {drop:+.4f}: " + ("within" if drop <= TOLERANCE else "beyond") +
               " the tolerance")
    numbers["within_tolerance"] = drop <= TOLERANCE
    numbers["mass"] = {name: {seed: {k: v.tolist() for k, v in per.items()}
                              for seed, per in by_seed.items()}
                       for name, by_seed in mass.items()}
    sections = [
        ("Attention on the targets (mean ± 95% CI over seeds; paired by seed)", [
            ("list", [f"supervised heads {', '.join(f'L{a}h{b}' for a, b in heads)} with "
                      f"weight {spec.get('weight')}; mass = the attention a query puts on the "
                      "key that answers it (256 fixed test sequences per pair count)"]),
            ("table", (["head", "kv pairs", "supervised", "control", "difference [95% CI]"],
                       rows_))]),
        ("What it costs the task", [
            ("list", [verdict]),
            ("table", (["metric", "supervised", "control", "difference [95% CI]"],
                       task_rows))])]
    return numbers, sections, {}
