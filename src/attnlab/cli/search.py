"""``attnlab arena search``: architecture search over per-layer mechanisms, width, depth and
heads under a cost (``attnlab.arena.search``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnlab.cli.arena import _pairs, arena, console, stops_cleanly


def _ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}",
                                 param_hint=option) from None


@arena.command("search")
@click.option("--config", type=click.Path(dir_okay=False, exists=True),
              help="A TOML file: a sweep's keys (task, task_params, model, train, seeds, "
                   "store, name) and a [search] table (the options below override both).")
@click.option("--task", help="Task name (see: attnlab arena tasks).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A task parameter (TOML value), repeatable.")
@click.option("--train", "train", multiple=True, metavar="KEY=VALUE",
              help="A train key (TOML value; a list is tuned on validation), repeatable.")
@click.option("--steps", type=click.IntRange(1), help="Training steps [task default].")
@click.option("--seeds", type=click.IntRange(1), help="Seeds per design [1].")
@click.option("--store", help="Result store directory [attnlab-runs].")
@click.option("--name", help="Search name (its study and sweep) [TASK-search].")
@click.option("--layer-mechanisms", "mechanisms",
              help="Comma-separated choices for each layer's mechanism [softmax,linear].")
@click.option("--depths", help="Comma-separated depth choices [1,2,3].")
@click.option("--dims", help="Comma-separated width choices [32,64].")
@click.option("--heads", help="Comma-separated head-count choices [2,4].")
@click.option("--cost", type=click.Choice(["params", "flops", "latency"]),
              help="What a design costs [flops].")
@click.option("--max-cost", type=float, help="Designs that cost more are not trained.")
@click.option("--trials", type=click.IntRange(1), help="Designs to train in all [30].")
@click.option("--sampler-seed", type=int, help="Seed of Optuna's TPE sampler [0].")
@click.option("--out", help="Report folder [attnlab-reports/NAME].")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Where each design's runs train (see arena run).")
@click.option("--address", help="Ray cluster to join (with --engine ray).")
def search_cmd(config: str | None, task: str | None, params: tuple[str, ...],
               train: tuple[str, ...], steps: int | None, seeds: int | None,
               store: str | None, name: str | None, mechanisms: str | None,
               depths: str | None, dims: str | None, heads: str | None, cost: str | None,
               max_cost: float | None, trials: int | None, sampler_seed: int | None,
               out: str | None, engine: str, address: str | None) -> None:
    """Search per-layer mechanisms (e.g. softmax or linear in each layer), depth, width and
    heads for the best task metric at the least cost; report the Pareto front.

    Each design is trained as a one-contestant sweep (stored once in the run store); the
    Optuna study lives in STORE/search.sqlite, and the same command resumes it.

    \b
    Examples:
      attnlab arena search --task mqar --layer-mechanisms softmax,linear --trials 20
      attnlab arena search --config docs/results/search_char_lm.toml
    """
    from attnlab.arena.config import ConfigError, parse_sweep, read_toml
    from attnlab.arena.ray_engine import EngineError
    from attnlab.arena.search import SearchError, run_search, space_of, split_config
    from attnlab.arena.search_report import write_search_report

    try:
        data, found = split_config(read_toml(config) if config else {}, config or "options")
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    options = {"mechanisms": mechanisms and [m.strip() for m in mechanisms.split(",")],
               "depths": _ints(depths, "--depths"), "dims": _ints(dims, "--dims"),
               "heads": _ints(heads, "--heads"), "cost": cost, "trials": trials,
               "max_cost": max_cost, "sampler_seed": sampler_seed}
    got = {**found, **{k: v for k, v in options.items() if v is not None}}
    base = {**data, **{k: v for k, v in {"task": task, "seeds": seeds, "store": store,
                                         "name": name}.items() if v is not None}}
    if "task" not in base:
        raise click.UsageError("give --task or --config (see: attnlab arena tasks)")
    base.setdefault("seeds", 1)
    base.setdefault("name", f"{base['task']}-search")
    base["train"] = {**base.get("train", {}), **_pairs(train, "--train")}
    if steps is not None:
        base["train"]["steps"] = steps
    base["task_params"] = {**base.get("task_params", {}), **_pairs(params, "--param")}
    try:
        space = space_of(got)
        parse_sweep({**base, "mechanisms": [space.mechanisms[0]]}, config or "options")
    except (ConfigError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    cost_kind, total = got.get("cost", "flops"), got.get("trials", 30)
    console.print(f"search [bold]{escape(base['name'])}[/bold]: task {base['task']}, "
                  f"{total} designs from layers {{{', '.join(space.mechanisms)}}}, depths "
                  f"{list(space.depths)}, widths {list(space.dims)}, heads {list(space.heads)}; "
                  f"cost: {cost_kind}")
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bars: dict[str, Any] = {}
        designs = progress.add_task("designs trained", total=total, note="")

        def on_run(event: str, spec: Any, payload: Any) -> None:
            if event == "step":
                step, n, loss = payload
                if spec.key not in bars:
                    bars[spec.key] = progress.add_task(
                        escape(f"{spec.label} seed {spec.seed}")[:34], total=n, note="")
                progress.update(bars[spec.key], completed=step, note=f"loss {loss:.3g}")
            elif event == "end" and spec.key in bars:
                progress.remove_task(bars.pop(spec.key))

        def on_trial(done: int, design: Any, info: dict[str, Any]) -> None:
            value = "failed" if info["metric"] is None else f"{info['metric']:.4g}"
            progress.console.print(f"  {done:>3}. {escape(design.label)}: {value}, "
                                   f"{cost_kind} {info['cost']:.4g}")
            progress.update(designs, completed=done)

        with stops_cleanly(progress, "trained designs are stored", SearchError, ConfigError,
                           EngineError):
            study = run_search(base, space, cost=cost_kind, trials=total,
                               max_cost=got.get("max_cost"),
                               sampler_seed=got.get("sampler_seed", 0), engine=engine,
                               address=address, on_trial=on_trial, listener=on_run)
    from attnlab.machine import describe, machine
    from attnlab.tasks import TASKS

    cls = TASKS[base["task"]]
    setup = [f"task {base['task']}: {base['task_params'] or 'defaults'}; train: "
             f"{base['train'] or 'defaults'}; seeds per design: {base['seeds']}",
             f"space: layers {{{', '.join(space.mechanisms)}}}, depths {list(space.depths)}, "
             f"widths {list(space.dims)}, heads {list(space.heads)}; cost: {cost_kind}"
             + (f" (at most {got['max_cost']:g})" if got.get("max_cost") else ""),
             f"Optuna {__import__('optuna').__version__} TPE sampler, seed "
             f"{got.get('sampler_seed', 0)}; {total} designs",
             "command: " + " ".join(shlex.quote(a) for a in ["attnlab", *sys.argv[1:]]),
             f"machine: {describe(machine())}"]
    out_dir = Path(out or Path("attnlab-reports") / base["name"])
    md = write_search_report(study, out_dir, metric=cls.metric,
                             higher_is_better=cls.higher_is_better, cost=cost_kind, setup=setup)
    from attnlab.arena.search_report import points, verdict

    for line in verdict(points(study), cls.metric):
        console.print(escape(line))
    console.print(f"report: {md}")
