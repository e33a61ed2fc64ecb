"""Perturbation guidance with HeadHunter on trained ViT classifiers ("Fine-Grained
Perturbation Guidance via Attention Head Selection"), against the same guidance through
random heads: the closest small-image setting of the paper's diffusion models.

Guided logits f + s (f - f_perturbed), f_perturbed with the chosen heads' maps moved toward
the identity (SoftPAG, strength u). The objective is the mean log-probability of the true
class; HeadHunter picks ``count`` heads on the validation images, the effect is measured on
the test images (per image: the change of the true class's log-probability, and accuracy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab.arena.stats import fmt, fmt_paired, mean_ci, paired_difference
from attnlab.heads.guidance import guided, head_hunter
from attnlab.heads.selection import random_heads

__all__ = ["guidance_study"]

Tick = Callable[[], None] | None


def _true_logp(logits: Tensor, labels: Tensor) -> Tensor:
    return logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)


def guidance_study(store: str | Path, sweep: str, count: int = 4, strength: float = 1.0,
                   scale: float = 1.0, draws: int = 10, seed: int = 0,
                   tick: Tick = None) -> tuple[dict[str, Any], list, dict]:
    """HeadHunter against random heads on every digits run of ``sweep`` with a saved model;
    95% intervals over seeds (runs) and, within each run, over test images."""
    from attnlab.heads.runs import load_run, saved_runs
    from attnlab.tasks.digits import digits_split

    rows = [r for r in saved_runs(store, sweep) if r["config"]["task"] == "digits"]
    if not rows:
        raise ValueError(f"no finished digits run with a saved model in sweep {sweep!r} of "
                         f"{store}/")
    split = digits_split()
    val_x, val_y = split["val"]
    test_x, test_y = split["test"]
    generator = torch.Generator().manual_seed(seed)
    per_run, table = {}, []
    for row in rows:
        model = load_run(store, row["key"]).model

        def objective(logits: Tensor) -> float:
            return float(_true_logp(logits, val_y).mean())

        hunt = head_hunter(model, functools.partial(model, val_x), objective, count,
                           strength=strength, scale=scale)
        with torch.no_grad():
            plain = model(test_x)
        base = _true_logp(plain, test_y)
        chosen = guided(model, functools.partial(model, test_x), hunt.chosen, strength, scale,
                        plain=plain)
        effect = _true_logp(chosen, test_y) - base
        controls, control_acc = [], []
        for _ in range(draws):
            g = guided(model, functools.partial(model, test_x),
                       random_heads(model, count, generator), strength, scale, plain=plain)
            controls.append(_true_logp(g, test_y) - base)
            control_acc.append(float((g.argmax(-1) == test_y).float().mean()))
        control = torch.stack(controls).mean(0)
        acc = {"plain": float((plain.argmax(-1) == test_y).float().mean()),
               "headhunter": float((chosen.argmax(-1) == test_y).float().mean()),
               "random": sum(control_acc) / draws}
        within = paired_difference(dict(enumerate(effect.tolist())),
                                   dict(enumerate(control.tolist())))
        per_run[row["seed"]] = {"key": row["key"], "heads": hunt.chosen,
                                "val_objective": [hunt.start, *hunt.scores],
                                "effect": float(effect.mean()),
                                "control": float(control.mean()), "accuracy": acc}
        if tick:
            tick()
        table.append([f"seed {row['seed']} ({row['key'][:10]})",
                      ", ".join(f"L{a}h{b}" for a, b in hunt.chosen),
                      " -> ".join(f"{v:.3f}" for v in [hunt.start, *hunt.scores]),
                      fmt(*mean_ci(effect.tolist()), 3), fmt(*mean_ci(control.tolist()), 3),
                      fmt_paired(within), f"{acc['plain']:.3f} / {acc['headhunter']:.3f} / "
                      f"{acc['random']:.3f}"])
    seeds = sorted(per_run)
    across = paired_difference({s: per_run[s]["effect"] for s in seeds},
                               {s: per_run[s]["control"] for s in seeds})
    header = ["run", "heads chosen (in order)", "validation objective (start -> each head)",
              "test effect [95% CI over images]", f"random heads ({draws} sets)",
              "HeadHunter - random [95% CI]", "test accuracy plain / HeadHunter / random"]
    summary = [f"objective: mean log p(true class) of the guided logits f + {scale} (f - "
               f"f_perturbed), f_perturbed = the chosen heads' maps moved toward the identity "
               f"with u = {strength}; {count} heads of "
               f"{_heads(model)} chosen greedily on the "
               f"{len(val_y)} validation images, measured on the {len(test_y)} test images",
               f"over the {len(seeds)} seeds (runs): HeadHunter - random = "
               f"{fmt_paired(across)} (mean per-run change of log p(true))"]
    numbers = {"runs": per_run, "across_seeds": {"mean": across.mean, "half": across.half,
                                                 "pairs": across.pairs},
               "count": count, "strength": strength, "scale": scale, "draws": draws}
    sections = [("Guidance through HeadHunter's heads against random heads",
                 [("list", summary), ("table", (header, table))])]
    return numbers, sections, {}


def _heads(model: torch.nn.Module) -> int:
    from attnlab.heads.sites import sites

    return sum(s.heads for s in sites(model))
