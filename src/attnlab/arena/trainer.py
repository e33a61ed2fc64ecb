"""Train one run: AdamW with linear warm-up and cosine decay, then the task's evaluation
on the validation split (to choose hyper-parameters) and on the test split."""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnlab.arena.config import RunSpec
from attnlab.distributed.launch import data_parallel, mean_over_ranks, shard
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
    try:
        result = {**failed_result(None), **_train(spec, progress), "status": "done"}
    except Exception as err:  # a failing run is recorded, and the sweep goes on
        result = failed_result(f"{type(err).__name__}: {err}\n"
                               f"{traceback.format_exc(limit=8)}")
    result["wall_time"] = time.perf_counter() - start
    return result


def failed_result(error: str | None) -> dict[str, Any]:
    """The result row of a run that did not finish: every field of a result, none filled.

    Fields: ``status`` ("done" / "failed"), ``metrics``, ``slices``, ``baselines``,
    ``curves``, ``params``, ``error``, ``wall_time`` and ``model`` (the trained weights as
    safetensors bytes, which the store writes to ``models/<key>.safetensors``).
    """
    return {"status": "failed", "metrics": {}, "slices": {}, "baselines": {}, "curves": {},
            "params": None, "error": error, "wall_time": None, "model": None}


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested tuple / list / dict) batch moved to ``device``.

    Copies to an accelerator are asynchronous; copies to the CPU are not: a non-blocking
    device-to-host copy returns before its data has arrived, and reading it at once gives
    whatever the buffer held (this made CUDA evaluations wrong and different each time)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type != "cpu")
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class OnDevice(nn.Module):
    """Evaluation wrapper: inputs go to the model's device, under the run's autocast, and
    outputs come back to the CPU as float32, so a task's evaluation code (which builds its
    data on the CPU) runs unchanged. Attributes fall through to the wrapped model."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: str) -> None:
        super().__init__()
        self.inner = model
        self.device, self.dtype = device, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.device, self.dtype):
            out = self.inner(*to_device(args, self.device), **to_device(kwargs, self.device))
        return to_device(out.float() if out.is_floating_point() else out, torch.device("cpu"))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device``, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(spec: RunSpec, progress: Progress | None) -> dict[str, Any]:
    with torch_threads(spec.train.get("threads", 1)):
        return _train_on_device(spec, progress)


def _train_on_device(spec: RunSpec, progress: Progress | None) -> dict[str, Any]:
    task = make_task(spec.task, **spec.task_params)
    cfg = spec.train
    device = torch.device(cfg.get("device", "cpu"))
    dtype = cfg.get("dtype", "float32")
    torch.manual_seed(spec.seed)
    model = task.build_model(spec.mechanism, spec.kwargs, **spec.model).to(device)
    params = count_parameters(model)
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"])
    ranks = data_parallel()  # launched by torchrun: data-parallel over the group
    wrapped = model
    if ranks is not None:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, find_unused_parameters=True)
    forward = cast(nn.Module, torch.compile(wrapped)) if cfg.get("compile") else wrapped
    generator = split_generator(spec.seed, "train")
    steps = cfg["steps"]
    every = max(1, steps // cfg["curve_points"])
    curve_steps, curve_loss, window = [], [], []
    supervisor = attention_supervisor(model, task, cfg.get("supervise"))
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, cfg["lr"], cfg["warmup"])
        batch = task.train_batch(cfg["batch_size"], generator)  # the global batch
        if ranks is not None:
            batch = shard(batch, *ranks)
        batch = to_device(batch, device)
        with autocast(device, dtype):
            loss = task.loss(forward, batch)
            extra = cast(Any, model).extra_loss()  # the task's models define it
            if supervisor is not None:
                # a task that supervises attention defines attention_targets
                extra = extra + supervisor.loss(*cast(Any, task).attention_targets(batch))
        seen = loss.detach() if ranks is None else mean_over_ranks(loss)  # the global batch's
        if not torch.isfinite(seen):
            raise FloatingPointError(f"training loss is {seen.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        (loss + extra).backward()
        if cfg.get("grad_clip"):
            nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        window.append(seen.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            curve_steps.append(step + 1)
            curve_loss.append(sum(window) / len(window))
            window = []
            if progress is not None:
                progress(step + 1, steps, curve_loss[-1])
    if supervisor is not None:
        supervisor.remove()
    model = evaluation_model(task, spec, model).eval()
    evaluated = OnDevice(model, device, dtype)
    validation = task.evaluate(evaluated, "val")
    evaluation = task.evaluate(evaluated, "test")
    metrics = {**evaluation.metrics, f"val_{task.metric}": validation.metrics[task.metric]}
    return {"metrics": metrics, "slices": evaluation.slices,
            "baselines": evaluation.baselines, "params": params,
            "curves": {"step": curve_steps, "train_loss": curve_loss},
            "model": model_bytes(model)}


def attention_supervisor(model: nn.Module, task: Any, supervise: dict[str, Any] | None
                         ) -> Any:
    """The ``[train.supervise]`` loss on ``model`` (None when not asked for)."""
    if not supervise:
        return None
    if not hasattr(task, "attention_targets"):
        raise ValueError(f"attention supervision needs target keys, which task {task.name!r} "
                         "does not define (attention_targets); mqar does")
    from attnlab.arena.supervision import AttentionSupervisor

    return AttentionSupervisor(model, supervise["heads"], supervise["weight"])


def model_bytes(model: nn.Module) -> bytes:
    """The model's weights (parameters and buffers) as a safetensors file's bytes."""
    from safetensors.torch import save

    state = {k: t.detach().cpu().contiguous() for k, t in model.state_dict().items()}
    return save(state)


def evaluation_model(task: Any, spec: RunSpec, model: nn.Module) -> nn.Module:
    """The trained model, or with ``spec.eval_kwargs`` the model rebuilt with those
    mechanism arguments and the trained weights loaded (strictly: every weight must fit)."""
    if not spec.eval_kwargs:
        return model
    rebuilt = task.build_model(spec.mechanism, {**spec.kwargs, **spec.eval_kwargs},
                               **spec.model)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    return rebuilt.to(next(model.parameters()).device)
