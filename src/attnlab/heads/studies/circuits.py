"""The in-context regression circuit across the trained runs of a sweep: how close each
trained softmax ``ICLRegressor`` is to the paper's form (``heads.circuits``), against the
same model at initialisation (the control), with 95% intervals over seeds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from attnlab.arena.stats import fmt, fmt_paired, mean_ci, paired_difference
from attnlab.heads import figures
from attnlab.heads.circuits import (
    RegressionCircuit,
    circuit_predictions,
    head_contributions,
    regression_circuit,
)

__all__ = ["circuit_measures", "circuit_study"]

Tick = Callable[[], None] | None
MEASURES = {  # name -> (what it is, higher is closer to the paper's form)
    "kq_off_identity": ("||KQ_xx - omega I|| / ||KQ_xx||", False),
    "kq_outside": ("share of KQ's usable rows outside the covariate block", False),
    "ov_off_label": ("share of OV's label row outside the label entry", False),
    "ov_outside": ("share of all of OV outside the label entry", False),
    "mu_balance": ("|sum mu_h| / sum |mu_h|", False),
    "shift_response": ("|change of y_hat when every context label is shifted by +1| "
                       "(0 for balanced heads: the mean of y cancels)", False),
    "r2_circuit": ("R^2 of the idealised-heads formula against the model", True),
    "r2_debiased_gd": ("R^2 of the debiased-GD formula against the model", True),
    "r2_averaging": ("R^2 of plain GD (mean of y kept) against the model", True),
}


def _r2(formula: torch.Tensor, model: torch.Tensor) -> float:
    return float(1 - (formula - model).pow(2).mean() / model.var().clamp_min(1e-30))


def circuit_measures(model: torch.nn.Module, episode: tuple) -> tuple[dict[str, float],
                                                                        RegressionCircuit]:
    """Every measure of ``MEASURES`` (and the task MSEs) for one model on one episode batch;
    the per-head residuals are averaged with weights |mu_h| / sum |mu_h| (a head counts as
    much as it reaches the prediction)."""
    circuit = regression_circuit(model)
    pred = circuit_predictions(model, circuit, *episode)
    weight = circuit.mu.abs() / circuit.mu.abs().sum().clamp_min(1e-30)
    out = {name: float((getattr(circuit, name) * weight).sum()) for name in
           ("kq_off_identity", "kq_outside", "ov_off_label", "ov_outside")}
    x, y, xq, _ = episode
    with torch.no_grad():
        shifted = model(x, y + 1.0, xq) - pred.model
    out.update(mu_balance=circuit.mu_balance, step=circuit.step,
               shift_response=float(shifted.mean().abs()),
               r2_circuit=_r2(pred.circuit, pred.model),
               r2_debiased_gd=_r2(pred.debiased_gd, pred.model),
               r2_averaging=_r2(pred.averaging, pred.model),
               mse_model=float((pred.model - pred.target).pow(2).mean()),
               mse_debiased_gd=float((pred.debiased_gd - pred.target).pow(2).mean()))
    return out, circuit


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _initial(task: Any, row: dict[str, Any]) -> torch.nn.Module:
    spec = row["config"]
    torch.manual_seed(row["seed"])  # the trainer's initialisation of this run
    return task.build_model(spec["mechanism"], spec["kwargs"], **spec["model"]).eval()


def circuit_study(store: str | Path, sweep: str, tick: Tick = None,
                  example: str | None = None) -> tuple[dict[str, Any], list, dict[str, bytes]]:
    """Measures of every stored one-layer softmax run of ``sweep`` (trained, and the control
    at initialisation), per contestant: mean ± 95% CI over seeds and the paired difference
    trained - initial. ``example``: the label whose seed-0 run gets the per-head table."""
    from attnlab.heads.runs import load_run, saved_runs
    from attnlab.tasks.base import split_generator

    rows = [r for r in saved_runs(store, sweep) if r["config"]["mechanism"] == "softmax"]
    if not rows:
        raise ValueError(f"no finished softmax run with a saved model in sweep {sweep!r} of "
                         f"{store}/ (run it with this attnlab to keep the models)")
    per_label: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    heads_of: dict[str, int] = {}
    example_run = None
    for row in rows:
        run = load_run(store, row["key"])
        task = run.task
        episode = task.draw(task.eval_size, task.context,
                            split_generator(0, "test", task.context))
        trained, circuit = circuit_measures(run.model, episode)
        initial, _ = circuit_measures(_initial(task, row), episode)
        entry = per_label.setdefault(row["label"], {"trained": {}, "initial": {}})
        entry["trained"][row["seed"]], entry["initial"][row["seed"]] = trained, initial
        heads_of[row["label"]] = cast(Any, run.model).layers[0].heads  # an ICLRegressor
        if row["label"] == (example or row["label"]) and row["seed"] == 0 and \
                (example_run is None or heads_of[row["label"]] > heads_of[example_run[0]]):
            example_run = (row["label"], row["key"], run, circuit, episode)
        if tick:
            tick()
    labels = sorted(per_label, key=lambda k: heads_of[k])
    numbers: dict[str, Any] = {"runs": {k: per_label[k] for k in labels}}
    header = ["contestant", "state", *MEASURES, "MSE"]
    table = []
    for label in labels:
        for state in ("trained", "initial"):
            seeds = per_label[label][state]
            cells = [fmt(*mean_ci([m[name] for m in seeds.values()]), 3)
                     for name in (*MEASURES, "mse_model")]
            table.append([label, f"{state} ({len(seeds)} seeds)", *cells])
    diffs = [["contestant", *MEASURES]]
    for label in labels:
        t, i = per_label[label]["trained"], per_label[label]["initial"]
        diffs.append([label, *[fmt_paired(paired_difference(
            {s: m[name] for s, m in t.items()}, {s: m[name] for s, m in i.items()}))
            for name in MEASURES]])
    sections = [
        ("Measures (mean ± 95% CI over seeds; the control is the same model at its "
         "initialisation)",
         [("list", [f"{name}: {what} ({'higher' if up else 'lower'} = closer to the paper's "
                    "form)" for name, (what, up) in MEASURES.items()]),
          ("table", (header, table))]),
        ("Trained - initial, paired by seed [95% CI]",
         [("table", (diffs[0], diffs[1:]))])]
    images: dict[str, bytes] = {}
    if example_run is not None:
        label, key, run, circuit, episode = example_run
        parts = head_contributions(run.model, *episode[:3])
        rows_ = [[f"h{h}", f"{float(circuit.omega[h]):+.3f}", f"{float(circuit.mu[h]):+.3f}",
                  f"{float(circuit.kq_off_identity[h]):.3f}",
                  f"{float(circuit.ov_off_label[h]):.3f}",
                  f"{float(parts[:, h].std()):.3f}",
                  f"{_corr(parts[:, h], episode[1].mean(-1)):+.2f}"]
                 for h in range(len(circuit.mu))]
        numbers["example"] = {"label": label, "key": key, "omega": circuit.omega.tolist(),
                              "mu": circuit.mu.tolist(), "step": circuit.step}
        sections.append((f"Per head: {label}, seed 0 (run {key[:10]})", [
            ("list", [f"sum mu_h = {float(circuit.mu.sum()):+.3f} of sum |mu_h| = "
                      f"{float(circuit.mu.abs().sum()):.3f}; step eta = sum mu_h omega_h = "
                      f"{circuit.step:+.3f}",
                      "contribution: the head's term of y_hat on the test episodes (std); "
                      "corr with mean y: its correlation with the context's mean label"]),
            ("table", (["head", "omega_h", "mu_h", "KQ off identity", "OV off label",
                        "contribution std", "corr with mean y"], rows_)),
            ("image", "kq_ov")]))
        blocks = torch.cat([circuit.kq, circuit.ov])
        titles = [f"KQ h{h}" for h in range(len(circuit.mu))] + \
            [f"OV h{h}" for h in range(len(circuit.mu))]
        images["kq_ov"] = figures.pattern_panels(
            blocks, titles, f"{label} seed 0: KQ_h and OV_h (last row/column = y)",
            cmap="RdBu_r", symmetric=True)
    return numbers, sections, images
