"""Architecture search over attention designs, after "Neural Architecture Search on Efficient
Transformers and Beyond" (Liu et al., 2022): the attention mechanism of each layer (e.g.
softmax or a linear-family one: the paper's mixed search space) together with width, depth
and heads, searched for the best task metric at the least cost (parameters, forward FLOPs
or measured forward latency), with Optuna's multi-objective TPE sampler.

Every trial is a one-contestant sweep of the arena (same task, budget, seeds and learning-rate
grid as a sweep file would give it), trained through ``run_sweep``: its runs are stored once
in the run store and never trained again, so a design proposed twice, or a search resumed
after a kill, reuses them. The study itself (trials, their values and designs) lives in
``<store>/search.sqlite`` (Optuna's RDB storage); the same command resumes it. The stored
sweep definition under the search's name holds every design tried, so ``attnlab arena
report --sweep NAME`` gives the arena table of all of them.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from attnlab.arena.config import RunSpec, Sweep, parse_sweep
from attnlab.arena.store import RunStore
from attnlab.arena.summary import summarize_sweep
from attnlab.arena.sweep import definition, run_sweep, sweep_rows
from attnlab.arena.trainer import count_parameters, torch_threads
from attnlab.models.blocks import HYBRID_SEPARATOR
from attnlab.tasks import TASKS, make_task
from attnlab.tasks.base import split_generator

COSTS = ("params", "flops", "latency")
STUDY_FILE = "search.sqlite"
SEARCH_KEYS = ("mechanisms", "depths", "dims", "heads", "cost", "trials", "max_cost",
               "sampler_seed")
SPACE_DEFAULTS = {"mechanisms": ("softmax", "linear"), "depths": (1, 2, 3), "dims": (32, 64),
                  "heads": (2, 4)}


class SearchError(RuntimeError):
    """The search cannot run (Optuna missing, a stored study of another definition)."""


@dataclass(frozen=True)
class SearchSpace:
    """The choices: a mechanism per layer, depth, width and heads."""

    mechanisms: tuple[str, ...]
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    heads: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, values in asdict(self).items():
            if not values:
                raise ValueError(f"search space: {name} needs at least one choice")
        for dim in self.dims:
            bad = [h for h in self.heads if dim % h]
            if bad:
                raise ValueError(f"search space: width {dim} is not divisible by {bad[0]} "
                                 "heads")


def split_config(data: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A search file's sweep keys (task, task_params, model, train, seeds, store, name) and
    its ``[search]`` table, checked for unknown keys."""
    base = dict(data)
    found = base.pop("search", {})
    unknown = sorted(set(found) - set(SEARCH_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown [search] key {unknown[0]!r} (known: "
                         f"{', '.join(SEARCH_KEYS)})")
    return base, found


def space_of(found: dict[str, Any]) -> SearchSpace:
    """The search space of a ``[search]`` table (defaults for the keys it leaves out)."""
    return SearchSpace(*(tuple(found.get(k, v)) for k, v in SPACE_DEFAULTS.items()))


@dataclass(frozen=True)
class Design:
    layers: tuple[str, ...]
    dim: int
    heads: int

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def mechanism(self) -> str:
        return HYBRID_SEPARATOR.join(self.layers)

    @property
    def mixed(self) -> bool:
        return len(set(self.layers)) > 1

    @property
    def label(self) -> str:
        return f"{self.mechanism} d{self.dim} h{self.heads}"

    def variant(self) -> dict[str, Any]:
        return {"label": self.label, "mechanism": self.mechanism,
                "model": {"dim": self.dim, "depth": self.depth, "heads": self.heads}}


def suggest(trial: Any, space: SearchSpace) -> Design:
    """The trial's design (Optuna's define-by-run: layer i's choice exists for i < depth)."""
    depth = trial.suggest_categorical("depth", list(space.depths))
    dim = trial.suggest_categorical("dim", list(space.dims))
    heads = trial.suggest_categorical("heads", list(space.heads))
    layers = tuple(trial.suggest_categorical(f"layer{i}", list(space.mechanisms))
                   for i in range(depth))
    return Design(layers, dim, heads)


def uniform_designs(space: SearchSpace) -> list[dict[str, Any]]:
    """One mechanism in every layer, at each depth, at the middle width and head count: the
    search's first trials, so that the front can be compared with the plain designs."""
    dim, heads = space.dims[len(space.dims) // 2], space.heads[len(space.heads) // 2]
    return [{"depth": d, "dim": dim, "heads": heads, **{f"layer{i}": m for i in range(d)}}
            for d in space.depths for m in space.mechanisms]


def design_sweep(base: dict[str, Any], designs: list[Design]) -> Sweep:
    """The sweep of ``designs`` as contestants, on the base configuration."""
    return parse_sweep({**base, "mechanisms": [d.variant() for d in designs],
                        "reference": designs[0].label}, "search")


def measure_cost(spec: RunSpec, cost: str, repeats: int = 7) -> float:
    """The design's cost: its parameter count, the FLOPs of one forward pass of one training
    sequence (torch's FlopCounterMode: matrix products and attention kernels), or the median
    wall time (ms) of that forward pass with the run's thread count."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    task = make_task(spec.task, **spec.task_params)
    torch.manual_seed(spec.seed)
    model = task.build_model(spec.mechanism, spec.kwargs, **spec.model).eval()
    if cost == "params":
        return float(count_parameters(model))
    batch = task.train_batch(1, split_generator(spec.seed, "train"))
    with torch.no_grad(), torch_threads(spec.train.get("threads", 1)):
        if cost == "flops":
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False, custom_mapping=_UNCOUNTED_KERNELS)
            with counter:
                task.loss(model, batch)
            return float(counter.get_total_flops())
        task.loss(model, batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            task.loss(model, batch)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """FLOPs of one SDPA kernel call from the shapes (B, H, Lq, D), (B, Hkv, Lk, D),
    (B, Hkv, Lk, Dv): QK^T and PV, 2 per multiply-add, every score counted (as torch counts
    its CUDA kernels, causal or not)."""
    b, h, lq, d = q
    lk, dv = k[-2], v[-1]
    return 2 * b * h * lq * lk * (d + dv)


# torch's FlopCounterMode knows SDPA's CUDA kernels but not the CPU one (it counts 0)
_UNCOUNTED_KERNELS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise SearchError("attnlab arena search needs Optuna, which is not installed: "
                          "pip install 'attnlab[search]'") from None
    return optuna


TrialListener = Callable[[int, Design, dict[str, Any]], None]


def run_search(base: dict[str, Any], space: SearchSpace, *, cost: str = "flops",
               trials: int = 30, max_cost: float | None = None, sampler_seed: int = 0,
               engine: str = "local", address: str | None = None,
               on_trial: TrialListener | None = None, listener: Any = None) -> Any:
    """Run (or resume) the search until ``trials`` designs are trained; returns the Optuna
    study. ``base``: a sweep configuration without mechanisms (task, task_params, model
    defaults, train, seeds, store, name). Designs that cost more than ``max_cost`` are not
    trained (recorded as pruned, not counted)."""
    optuna = require_optuna()
    from optuna.trial import TrialState

    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    probe = design_sweep(base, [Design((space.mechanisms[0],), space.dims[0], space.heads[0])])
    task_cls = TASKS[probe.task]
    store_dir = Path(probe.store)
    store_dir.mkdir(parents=True, exist_ok=True)
    # what changes the numbers (the store's path does not: a moved store still resumes)
    identity = {"sweep": definition(probe) | {"mechanisms": None, "reference": None,
                                              "store": None},
                "space": asdict(space),
                "cost": cost, "max_cost": max_cost, "sampler_seed": sampler_seed}
    identity = json.loads(json.dumps(identity))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=probe.sweep_name, storage=f"sqlite:///{store_dir / STUDY_FILE}",
        directions=["maximize" if task_cls.higher_is_better else "minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=sampler_seed), load_if_exists=True)
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
        for params in uniform_designs(space):
            study.enqueue_trial(params)
    elif stored != identity:
        raise SearchError(f"search {probe.sweep_name!r} in {store_dir / STUDY_FILE} was run "
                          "with another definition (task, budget, space, cost or seed); "
                          "give this one another --name")
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)  # its process was killed
        # ask its design again (its runs may be stored already); one killed before it drew
        # its design had it from the queue (Optuna keeps that in "fixed_params")
        params = stale.params or stale.system_attrs.get("fixed_params")
        if params:
            study.enqueue_trial(params)
    designs = _designs(study)
    asked = 0
    while _trained(study) < trials:
        asked += 1
        if asked > 20 * trials:
            raise SearchError(f"{asked} designs proposed and too few fit max_cost={max_cost}")
        trial = study.ask()
        design = suggest(trial, space)
        sweep = design_sweep(base, [design])
        value = measure_cost(sweep.runs()[0], cost)
        trial.set_user_attr("design", design.label)
        trial.set_user_attr("cost", value)
        if max_cost is not None and value > max_cost:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        if design not in designs:
            designs.append(design)
        run_sweep(sweep, engine=engine, address=address, listener=listener,
                  part_of=design_sweep(base, designs))  # stored: every design so far
        with RunStore(probe.store) as store:
            rows = sweep_rows(store, sweep)
        (contestant,) = summarize_sweep(rows, sweep).contestants
        metric = contestant.metrics.get(task_cls.metric)
        info = {"cost": value, "metric": None if metric is None else metric[0],
                "trial": trial.number}
        trial.set_user_attr("trained", True)  # counts toward the budget, done or failed
        if metric is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, [metric[0], value])
        if on_trial is not None:
            on_trial(_trained(study), design, info)
    return study


def _trained_trials(study: Any) -> list[Any]:
    """Trials whose design was trained (done or failed); not those pruned for their cost
    nor those a killed search left behind."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("trained")
            and t.state.is_finished()]


def _trained(study: Any) -> int:
    return len(_trained_trials(study))


def _designs(study: Any) -> list[Design]:
    """The designs of the study's trained trials, in trial order, each once."""
    seen: list[Design] = []
    for t in _trained_trials(study):
        design = design_of(t.params)
        if design not in seen:
            seen.append(design)
    return seen


def design_of(params: dict[str, Any]) -> Design:
    return Design(tuple(params[f"layer{i}"] for i in range(params["depth"])), params["dim"],
                  params["heads"])

