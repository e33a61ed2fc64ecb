"""Train one run: AdamW with linear warm-up and cosine decay, then the task's evaluation."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnlab.arena.config import RunSpec
from attnlab.tasks import make_task, split_generator
from attnlab.tasks.base import count_parameters

Progress = Callable[[int, int, float], None]  # (step, steps, recent train loss)


def learning_rate(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to 0 at ``steps``."""
    warm = max(1, int(warmup * steps)) if warmup > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases and 1-D gates)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr)


def train_run(spec: RunSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Train and evaluate ``spec``; returns the result row (never raises for a run error:
    a failed run comes back with ``status="failed"`` and its traceback)."""
    start = time.perf_counter()
    result: dict[str, Any] = {"status": "failed", "metrics": {}, "slices": {},
                              "baselines": {}, "curves": {}, "params": None, "error": None}
    try:
        result.update(_train(spec, progress))
        result["status"] = "done"
    except Exception as err:  # a failing run is recorded, and the sweep goes on
        result["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
    result["wall_time"] = time.perf_counter() - start
    return result


def _train(spec: RunSpec, progress: Progress | None) -> dict[str, Any]:
    task = make_task(spec.task, **spec.task_params)
    cfg = spec.train
    torch.manual_seed(spec.seed)
    model = task.build_model(spec.mechanism, spec.kwargs, **spec.model)
    params = count_parameters(model)
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"])
    generator = split_generator(spec.seed, "train")
    steps = cfg["steps"]
    every = max(1, steps // cfg["curve_points"])
    curve_steps, curve_loss, window = [], [], []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, cfg["lr"], cfg["warmup"])
        loss = task.loss(model, task.train_batch(cfg["batch_size"], generator))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        (loss + model.extra_loss()).backward()
        if cfg.get("grad_clip"):
            nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        window.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            curve_steps.append(step + 1)
            curve_loss.append(sum(window) / len(window))
            window = []
            if progress is not None:
                progress(step + 1, steps, curve_loss[-1])
    model.eval()
    evaluation = task.evaluate(model, spec.seed)
    return {"metrics": evaluation.metrics, "slices": evaluation.slices,
            "baselines": evaluation.baselines, "params": params,
            "curves": {"step": curve_steps, "train_loss": curve_loss}}
