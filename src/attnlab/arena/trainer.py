"""Train one run: AdamW with linear warm-up and cosine decay, then the task's evaluation
on the validation split (to choose hyper-parameters) and on the test split.

Besides the training loss, a run's ``curves`` hold, at the same ``curve_points`` steps, the
learning rate and the gradient norm (before clipping), and at ``val_points`` steps the
validation metrics. A validation pass changes nothing in the run: it runs under ``no_grad`` in
evaluation mode (each module's mode restored after), with the random state of the CPU and the
run's device saved and restored, and it draws its data from the fixed validation stream, never
the training generator; a run trains to the same weights and metrics with or without it.
"""

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

# the validation schedule when ``train.val_points`` is not given: 6 points, but at least
# MIN_VAL_INTERVAL steps apart. A pass costs about as much as 7.5 training steps of the
# default comparison (so about +4% on its 600-step runs); a tiny run gets only the final
# validation, which is computed anyway.
DEFAULT_VAL_POINTS = 6
MIN_VAL_INTERVAL = 150
TRAIN_CURVES = ("train_loss", "lr", "grad_norm")  # indexed by ``curves["step"]``


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

    ``curves``: ``step`` with, at each of those steps, ``train_loss`` and ``grad_norm`` (means
    over the steps since the previous point; the norm before clipping) and ``lr`` (the
    learning rate of that step); ``val_step`` with ``val_<metric>`` for each validation
    metric (the last point is the run's final validation). Runs stored by older versions
    have ``step`` and ``train_loss`` only.
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
    task: Any = make_task(spec.task, **spec.task_params)  # a task's optional hooks too
    cfg = spec.train
    device = torch.device(cfg.get("device", "cpu"))
    dtype = cfg.get("dtype", "float32")
    torch.manual_seed(spec.seed)
    model: Any = task.build_model(spec.mechanism, spec.kwargs, **spec.model).to(device)
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
    val_every = validation_interval(steps, cfg.get("val_points"))
    curves: dict[str, list[Any]] = {"step": [], **{name: [] for name in TRAIN_CURVES}}
    val_curves: dict[str, list[Any]] = {"val_step": []}
    window: list[float] = []
    norms: list[Tensor] = []
    supervisor = attention_supervisor(model, task, cfg.get("supervise"))
    model.train()
    for step in range(steps):
        lr = learning_rate(step, steps, cfg["lr"], cfg["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
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
        norms.append(gradient_norm(model, cfg.get("grad_clip")))
        opt.step()
        window.append(seen.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            curves["step"].append(step + 1)
            curves["train_loss"].append(sum(window) / len(window))
            curves["lr"].append(lr)
            curves["grad_norm"].append(torch.stack(norms).mean().item())
            window, norms = [], []
            if progress is not None:
                progress(step + 1, steps, curves["train_loss"][-1])
        if val_every and (step + 1) % val_every == 0 and step + 1 < steps:
            if supervisor is not None:
                supervisor.captured = {}
            _append(val_curves, step + 1, validation_point(task, spec, model, device, dtype))
    if supervisor is not None:
        supervisor.remove()
    model = evaluation_model(task, spec, model).eval()
    evaluated = OnDevice(model, device, dtype)
    validation = task.evaluate(evaluated, "val")
    evaluation = task.evaluate(evaluated, "test")
    metrics = {**evaluation.metrics, f"val_{task.metric}": validation.metrics[task.metric]}
    if val_every:  # the last point is the final validation, not computed twice
        _append(val_curves, steps, curve_metrics(task, validation))
        curves.update(val_curves)
    return {"metrics": metrics, "slices": evaluation.slices,
            "baselines": evaluation.baselines, "params": params,
            "curves": curves, "model": model_bytes(model)}


def validation_interval(steps: int, points: int | None) -> int:
    """Steps between validation passes for ``points`` passes over ``steps`` steps (the last
    one at the end of training); 0 (no validation curve) when ``points`` is 0. ``None``: the
    default schedule, ``DEFAULT_VAL_POINTS`` points at least ``MIN_VAL_INTERVAL`` steps
    apart."""
    if points is None:
        return max(MIN_VAL_INTERVAL, steps // DEFAULT_VAL_POINTS)
    if isinstance(points, bool) or not isinstance(points, int) or points < 0:
        raise ValueError(f"train.val_points must be a count >= 0, got {points!r}")
    return 0 if points == 0 else max(1, steps // points)


def gradient_norm(model: nn.Module, clip: float | None) -> Tensor:
    """The global L2 norm of the gradients before clipping (a 0-d tensor; no host sync),
    clipping them to ``clip`` when it is set (exactly as ``clip_grad_norm_`` does)."""
    if clip:
        return nn.utils.clip_grad_norm_(model.parameters(), clip).detach()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return nn.utils.get_total_norm(grads).detach()


def curve_metrics(task: Any, evaluation: Any) -> dict[str, float]:
    """The metrics of a validation pass that its curve keeps, named ``val_<metric>``: the
    task's metrics, without the closed-form baselines' (constant over training)."""
    baselines = {f"{name}_{task.metric}" for name in evaluation.baselines}
    return {f"val_{k}": float(v) for k, v in evaluation.metrics.items()
            if k not in baselines and isinstance(v, int | float) and not isinstance(v, bool)}


def _append(curves: dict[str, list[Any]], step: int, values: dict[str, float]) -> None:
    """One validation point; a metric missing at some points is None there (JSON null)."""
    done = len(curves["val_step"])
    curves["val_step"].append(step)
    for name, value in values.items():
        curves.setdefault(name, [None] * done).append(value)
    for column in curves.values():
        if len(column) == done:  # a metric this pass did not give
            column.append(None)


def validation_point(task: Any, spec: RunSpec, model: nn.Module, device: torch.device,
                     dtype: str) -> dict[str, float]:
    """The task's validation metrics of ``model`` in the middle of training, leaving the run
    as it was: evaluation mode and ``no_grad`` (each module's mode restored after), the CPU's
    and the device's random state restored (the evaluation draws from the fixed validation
    stream; a model rebuilt for ``eval_kwargs`` draws its throw-away initialisation), the
    training generator never touched."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with _random_state_kept(device), torch.no_grad():
            evaluated = OnDevice(evaluation_model(task, spec, model).eval(), device, dtype)
            result = task.evaluate(evaluated, "val")
    finally:
        for module, training in modes:
            module.train(training)
    return curve_metrics(task, result)


def _random_state_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """Saves the CPU's random state (and ``device``'s, for an accelerator) and restores it on
    exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index
    if index is None:
        module = getattr(torch, device.type, None)
        index = module.current_device() if hasattr(module, "current_device") else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


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
