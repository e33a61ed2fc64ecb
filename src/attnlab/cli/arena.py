"""``attnlab arena``: run sweeps, resume them, and report them."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attnlab.arena.files import DEFAULT_REPORTS, DEFAULT_STORE, check_name

if TYPE_CHECKING:  # the arena modules import torch: only when a command runs
    from attnlab.arena.config import Sweep

console = Console()
CONFIGS = Path(__file__).parents[1] / "arena" / "configs"
DEFAULT_CONFIG = CONFIGS / "default.toml"


def _parse_value(text: str) -> Any:
    """A TOML value ('3', '0.5', '[2, 4]', 'true'), else the string itself."""
    from attnlab.arena.config import toml_module

    tomllib = toml_module()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _pairs(items: tuple[str, ...], option: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _sweep_from_options(config: str | None, task: str | None, mechanisms: str | None,
                        seeds: int | None, steps: int | None, workers: int | None,
                        store: str | None, name: str | None, params: dict[str, Any],
                        train: dict[str, Any] | None = None,
                        reference: str | None = None) -> Sweep:
    overrides: dict[str, Any] = {"task": task, "seeds": seeds, "workers": workers, "store": store,
                 "name": name, "reference": reference}
    if mechanisms:
        overrides["mechanisms"] = [m.strip() for m in mechanisms.split(",") if m.strip()]
    if not config and (not task or not mechanisms):
        raise click.UsageError("give --config FILE, or --task and --mechanisms "
                               "(see: attnlab arena tasks)")
    from attnlab.arena.config import parse_sweep, read_toml

    data = read_toml(config) if config else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if train:
        data["train"] = {**data.get("train", {}), **train}
    if steps is not None:
        data.setdefault("train", {})["steps"] = steps
    if params:
        data["task_params"] = {**data.get("task_params", {}), **params}
    return parse_sweep(data, config or "options")


@contextlib.contextmanager
def stops_cleanly(progress: Progress, stored: str, *errors: type[Exception]
                  ) -> Iterator[None]:
    """Ctrl-C stops the bars and says what is kept and how to resume (exit status 130);
    ``errors`` become a one-line CLI error."""
    try:
        yield
    except KeyboardInterrupt:
        progress.stop()
        console.print(f"[yellow]interrupted[/yellow]: {stored}; run the same command again "
                      "to resume")
        sys.exit(130)
    except errors as err:
        raise click.ClickException(str(err)) from None


def run_with_progress(sweep: Sweep, retry_failed: bool = False, engine: str = "local",
                      address: str | None = None, loggers: list | None = None) -> Any:
    """Run a sweep with progress bars: one for the sweep, one per run in flight. Ctrl-C
    stops it (finished runs are stored) with exit status 130. ``loggers``
    (``arena.loggers``) get each run as it ends, after the store has it."""
    from attnlab.arena.ray_engine import EngineError
    from attnlab.arena.store import StoreError
    from attnlab.arena.sweep import GroupError, run_sweep

    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    bars: dict[str, Any] = {}
    grid_keys = list(sweep.train.grid())
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("runs", total=None, note="")

        def plan(todo: list, skipped: int, failed_kept: int, stage: str | None) -> None:
            points = len(sweep.grid_points())
            grid = f" x {points} grid points" if points > 1 else ""
            runs = f"{len(todo) + skipped} runs; {skipped} already in {sweep.store}/, " \
                   f"{len(todo)} to run"
            seeds = len(sweep.seed_list)
            if stage == "confirm":
                progress.console.print(
                    f"stage 2 of 2: each contestant's chosen point on the other "
                    f"{seeds - len(sweep.tuning_seeds)} seeds = {runs}")
                progress.update(overall, total=progress.tasks[overall].completed + len(todo))
                failed_note(failed_kept)
                return
            if stage == "tune":
                tuned = len(sweep.tuning_seeds)
                progress.console.print(
                    f"sweep [bold]{sweep.sweep_name}[/bold]: task {sweep.task}, "
                    f"{len(sweep.variants())} contestants, {seeds} seeds, in two stages "
                    f"(tune_seeds = {tuned})\n"
                    f"stage 1 of 2: {len(sweep.variants())} contestants{grid} x {tuned} "
                    f"seed{'s' if tuned > 1 else ''} = {runs}")
            else:
                progress.console.print(
                    f"sweep [bold]{sweep.sweep_name}[/bold]: task {sweep.task}, "
                    f"{len(sweep.variants())} contestants{grid} x {seeds} seeds = {runs}")
            from attnlab.distributed.launch import data_parallel

            ranks = data_parallel()
            if ranks:
                where = f"each run data-parallel on {ranks[1]} processes (torchrun)"
            elif engine == "ray":
                where = f"one Ray task per run ({address or 'local Ray instance'})"
            else:
                where = f"on {min(sweep.worker_count, max(1, len(todo)))} worker(s)"
            progress.console.print(
                f"  {where}, "
                f"{sweep.train.threads} thread(s) each, device {sweep.train.device}, "
                f"{sweep.train.dtype}")
            failed_note(failed_kept)
            progress.update(overall, total=len(todo))

        def failed_note(failed_kept: int) -> None:
            if failed_kept:
                progress.console.print(
                    f"  [yellow]{failed_kept} stored run(s) failed before and are not run "
                    "again[/yellow]: add --retry-failed to run them (e.g. after installing "
                    "a missing extra)")

        def listener(event: str, spec: Any, payload: Any) -> None:
            if event == "plan":
                plan(*payload)
                return
            desc = escape(f"{spec.label} seed {spec.seed}") + "".join(
                f" {k}={spec.train[k]}" for k in grid_keys)
            if event == "start":
                bars[spec.key] = progress.add_task(desc, total=spec.train["steps"], note="")
            elif event == "step":
                step, steps, loss = payload
                if spec.key not in bars:
                    bars[spec.key] = progress.add_task(desc, total=steps, note="")
                progress.update(bars[spec.key], completed=step, note=f"loss {loss:.4g}")
            elif event == "end":
                if spec.key in bars:
                    progress.remove_task(bars.pop(spec.key))
                mark = "[green]done[/green]" if payload["status"] == "done" else \
                    "[red]failed[/red]"
                progress.console.print(f"  {desc}: {mark} in {payload['wall_time'] or 0:.1f}s")
                progress.advance(overall)
                send_to_loggers(loggers or [], spec, payload, progress.console)

        with stops_cleanly(progress, "finished runs are stored", StoreError, GroupError,
                           EngineError):
            summary = run_sweep(sweep, retry_failed=retry_failed, listener=listener,
                                engine=engine, address=address)
    if summary.imported:
        console.print(f"stored {summary.imported} result(s) that an earlier run had kept "
                      "aside")
    if summary.elsewhere:
        owners = sorted(set(summary.elsewhere.values()))
        console.print(f"[yellow]{len(summary.elsewhere)} run(s) are being trained by another "
                      f"process[/yellow] ({escape(', '.join(owners))}): not run here")
    for run, err in summary.failures:
        console.print(f"[red]failed[/red] {escape(run)}: {escape(err)}")
    return summary


def open_store(store: str | Path) -> Any:
    """The result store at ``store``, read-only (a RunStore), or a usage error saying there
    is none and how to make one."""
    from attnlab.arena.store import DB_NAME, RunStore, StoreError

    if not (Path(store) / DB_NAME).exists():
        raise click.UsageError(f"no result store at {store}/ (run: attnlab arena run ...)")
    try:
        return RunStore(store, readonly=True)
    except StoreError as err:
        raise click.ClickException(str(err)) from None


def send_to_loggers(loggers: list, spec: Any, result: dict[str, Any], out: Console) -> None:
    """A finished run to each logger; a logger's error is printed and the sweep goes on (the
    store already has the run)."""
    if not loggers:
        return
    from attnlab.arena.loggers import run_row

    row = run_row(spec, result)
    for logger in loggers:
        tally = LOGGED.setdefault(logger.kind, [0, 0])
        try:
            logger.log(row)
        except Exception as err:  # a logger never stops a sweep
            tally[1] += 1
            out.print(f"  [yellow]{logger.kind} logger failed[/yellow] on "
                      f"{escape(spec.label)} seed {spec.seed}: {escape(str(err))}")
        else:
            tally[0] += 1


# runs sent to each logger kind in this command: [logged, failed] (what the final line says)
LOGGED: dict[str, list[int]] = {}


class Layout(NamedTuple):
    """A form of the terminal's results table: which columns it keeps, and whether each
    interval goes on the line under its estimate."""

    mechanism: bool
    grid: bool  # the chosen grid point's columns
    stacked: bool
    seeds: bool


# widest first; the forms without the seeds column only when every contestant finished every
# seed (the budget line gives the count); when none fits, the narrowest allowed one is used
LAYOUTS = (Layout(True, True, False, True), Layout(False, True, False, True),
           Layout(True, True, True, True), Layout(False, True, True, True),
           Layout(False, True, True, False), Layout(False, False, True, True),
           Layout(False, False, True, False))


def _results_table(summary: Any, name: str, out: Console | None = None) -> Table:
    """The terminal's results table, in the widest form of ``LAYOUTS`` that fits the console
    (``out``, default the CLI's): as it narrows, the mechanism column goes (the verdict lines
    name it), intervals go under their estimates, then the seeds column (when it only repeats
    the budget line) and the chosen grid point's columns (the verdict lines name it). The
    label column never wraps, so each label stays whole on one line."""
    from attnlab.arena.report import same_seeds, table_rows

    out = out or console
    title = escape(f"{name}{'' if name == summary.task else f' ({summary.task})'}: test "
                   "metrics, mean ± 95% CI over seeds" +
                   (f"; {', '.join(summary.grid_keys)} chosen on validation"
                    if summary.grid_keys else ""))
    width = max(len(c.label) for c in summary.contestants)
    unbounded = out.options.update(max_width=10_000)
    redundant = same_seeds(summary)
    for layout in [x for x in LAYOUTS if x.seeds or redundant]:
        header, body = table_rows(summary, compact=True, **layout._asdict())
        table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                      collapse_padding=True, leading=1 if layout.stacked else 0)
        for i, col in enumerate(header):
            if i == 0:
                table.add_column(col, no_wrap=True, min_width=width)
            else:
                table.add_column(col, justify="left" if col == "mechanism" else "right",
                                 overflow="fold")
        for row in body:
            table.add_row(*map(escape, row))
        if out.measure(table, options=unbounded).maximum <= out.width:
            break
    return table


def report_sweep(store: str, sweep_name: str | None, out: str | None) -> None:
    """Write the report of one sweep (the configuration it was last run with) and print
    its table and verdict."""
    from attnlab.arena.config import ConfigError, stored_sweep
    from attnlab.arena.report import verdict_lines, write_report
    from attnlab.arena.summary import summarize_sweep
    from attnlab.arena.sweep import sweep_rows

    db = open_store(store)
    with db:
        sweeps = db.sweeps()
        if not sweeps:
            raise click.UsageError(f"no runs in {store}/ (run: attnlab arena run ...)")
        names = [s["sweep"] for s in sweeps]
        name = sweep_name or names[-1]
        if name not in names:
            raise click.UsageError(f"no sweep {name!r} in {store}/; sweeps: "
                                   f"{', '.join(names)}")
        stored = db.definition(name)
        if stored is None:
            raise click.UsageError(f"sweep {name!r} in {store}/ was stored by an older attnlab "
                                   "without its definition; run it again to report it")
        try:
            sweep = stored_sweep(stored, f"stored sweep {name!r}")
        except ConfigError as err:
            raise click.ClickException(str(err)) from None
        rows = sweep_rows(db, sweep)
        entry = next(s for s in sweeps if s["sweep"] == name)
        other = entry["done"] + entry["failed"] - len(rows)
    if not rows:
        raise click.UsageError(f"sweep {name!r} has no finished run yet")
    summary = summarize_sweep(rows, sweep)
    if out is None:
        try:
            check_name(name, "the sweep name")
        except ValueError as err:
            raise click.UsageError(f"{err}; pass --out to choose the folder") from None
    out_dir = Path(out or Path(DEFAULT_REPORTS) / name)
    md, page = write_report(summary, out_dir)
    console.print(_results_table(summary, name))
    console.print()
    for verdict in verdict_lines(summary):
        console.print(escape(verdict.replace("**", "")))
    if other:
        console.print(f"[dim]{other} stored run(s) of earlier configurations of {name!r} are "
                      "not in this report[/dim]")
    console.print(f"report: {md} and {page}")


@click.group("arena", invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", default=DEFAULT_STORE, show_default=True,
              help="Result store directory (for the default comparison).")
@click.pass_context
def arena(ctx: click.Context, store: str) -> None:
    """Fair comparisons of attention mechanisms: same task, budget and seeds.

    With no subcommand, runs the default comparison (multi-query associative recall with
    softmax, sigmoid, linear and MALA attention, four seeds, each contestant's learning rate
    chosen on seed 0's validation split from {1e-3, 3e-3}; 20 runs, about 5 minutes on a
    2-core CPU) and writes its report, with each contestant's paired difference to softmax.

    \b
    Examples:
      attnlab arena
      attnlab arena run --task mqar --mechanisms softmax,linear,mala --seeds 3
      attnlab arena run --config sweep.toml
      attnlab arena report
    """
    if ctx.invoked_subcommand is not None:
        return
    from attnlab.arena.config import ConfigError, load_sweep

    try:
        sweep = load_sweep(DEFAULT_CONFIG, store=store)
    except ConfigError as err:  # pragma: no cover - the shipped config is tested
        raise click.ClickException(str(err)) from None
    run_with_progress(sweep)
    report_sweep(sweep.store, sweep.sweep_name, None)


@arena.command("run")
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="A TOML sweep file (options below override its keys).")
@click.option("--task", help="Task name (see: attnlab arena tasks).")
@click.option("--mechanisms", help="Comma-separated mechanism names.")
@click.option("--seeds", type=click.IntRange(1),
              help="Seeds per contestant [default: the task's, 5 for synthetic tasks].")
@click.option("--steps", type=click.IntRange(1), help="Training steps [task default].")
@click.option("--workers", type=click.IntRange(1), help="Parallel worker processes.")
@click.option("--store", help=f"Result store directory [default {DEFAULT_STORE}].")
@click.option("--name", help="Sweep name [default: the task].")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A task parameter (TOML value), repeatable: --param num_kv=8.")
@click.option("--train", "train", multiple=True, metavar="KEY=VALUE",
              help="A train key (TOML value; a list tunes it on validation), repeatable: "
                   "--train 'lr=[1e-3, 3e-3]' --train device=cuda.")
@click.option("--reference", help="Contestant the paired differences are taken to "
              "[default: the first].")
@click.option("--retry-failed", is_flag=True, help="Run failed runs again.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write the report when the sweep ends.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: worker processes here; ray: one Ray task per "
              "run (pip install 'attnlab[ray]').")
@click.option("--address", help="Ray cluster to join (HOST:PORT, ray://HOST:10001 or auto) "
              "[default: RAY_ADDRESS, else a local Ray instance].")
@click.option("--log", "log", multiple=True, type=click.Choice(["tensorboard", "wandb"]),
              help="Also send each finished run (curves, metrics, config) to TensorBoard or "
              "W&B, repeatable; the store stays the record (pip install "
              "'attnlab[tensorboard]' / 'attnlab[wandb]'; WANDB_MODE=offline for no network).")
@click.option("--log-dir", type=click.Path(file_okay=False),
              help="Where the loggers write: DIR/tensorboard/SWEEP/RUN and DIR/wandb "
              "[default: STORE/logs].")
@click.option("--project", default="attnlab-arena", show_default=True,
              help="W&B project of --log wandb.")
def run_cmd(config: str | None, task: str | None, mechanisms: str | None, seeds: int | None,
            steps: int | None, workers: int | None, store: str | None, name: str | None,
            params: tuple[str, ...], train: tuple[str, ...], reference: str | None,
            retry_failed: bool, report: bool, engine: str, address: str | None,
            log: tuple[str, ...], log_dir: str | None, project: str) -> None:
    """Run (or resume) a sweep; finished runs are stored and never run again.

    \b
    Examples:
      attnlab arena run --task icl_regression --mechanisms softmax,linear --seeds 3
      attnlab arena run --task mqar --mechanisms softmax,dma --param seq_len=128
      attnlab arena run --task mqar --mechanisms softmax,linear --train 'lr=[1e-3, 3e-3]'
      attnlab arena run --config docs/results/mqar.toml --workers 2
      attnlab arena run --config docs/results/mqar.toml --engine ray --address HEAD:6379
      attnlab arena run --task mqar --mechanisms softmax,linear --log tensorboard
      WANDB_MODE=offline attnlab arena run --task mqar --mechanisms softmax --log wandb
    """
    from attnlab.arena.config import ConfigError

    if address is not None and engine != "ray":
        raise click.UsageError("--address names a Ray cluster: use it with --engine ray")
    if (log_dir is not None or project != "attnlab-arena") and not log:
        raise click.UsageError("--log-dir and --project are for the loggers: add --log "
                               "tensorboard or --log wandb")

    try:
        sweep = _sweep_from_options(config, task, mechanisms, seeds, steps, workers, store,
                                    name, _pairs(params, "--param"), _pairs(train, "--train"),
                                    reference)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    from attnlab.distributed.launch import init_from_env

    ranks = init_from_env(sweep.train.device)  # launched by torchrun: one run, all ranks
    if ranks is not None and engine != "local":
        raise click.UsageError("under torchrun every run is trained by the whole process "
                               "group: --engine ray cannot be combined with it")
    if ranks is not None:
        import signal

        # torchrun stops the group with SIGTERM when one process dies: unwind, so this
        # process's claims on the store are released
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if ranks is not None and ranks[0] != 0:
        _follow_quietly(sweep, retry_failed)
        return
    loggers = []
    if log:
        from attnlab.arena.loggers import LoggerError, make_loggers

        try:  # a missing extra is said before anything trains
            loggers = make_loggers(log, log_dir or Path(sweep.store) / "logs", project)
        except LoggerError as err:
            raise click.ClickException(str(err)) from None
    LOGGED.clear()
    summary = run_with_progress(sweep, retry_failed, engine, address, loggers)
    if loggers:
        where = log_dir or Path(sweep.store) / "logs"
        for kind in log:
            logged, failed = LOGGED.get(kind, [0, 0])
            text = f"{kind}: {logged} run(s) logged under {where}/"
            if failed:  # the store has these runs; a rerun skips them, so say it plainly
                text += (f"; [red]{failed} failed[/red] (they are stored, but not in "
                         f"{kind}: see the errors above)")
            console.print(text)
    if report and summary.done + summary.skipped:
        report_sweep(sweep.store, sweep.sweep_name, None)


def _follow_quietly(sweep: Sweep, retry_failed: bool) -> None:
    """A rank other than 0 of a torchrun launch: train alongside rank 0, print nothing but
    errors (rank 0 stores and reports)."""
    from attnlab.arena.sweep import GroupError, run_sweep

    try:
        run_sweep(sweep, retry_failed=retry_failed)
    except GroupError as err:
        raise click.ClickException(str(err)) from None


@arena.command("report")
@click.option("--store", default=DEFAULT_STORE, show_default=True)
@click.option("--sweep", "sweep_name", help="Sweep name [default: the latest].")
@click.option("--out", help=f"Output directory [default {DEFAULT_REPORTS}/SWEEP].")
def report_cmd(store: str, sweep_name: str | None, out: str | None) -> None:
    """Write report.md (+ PNG plots) and a self-contained report.html; print the table.

    \b
    Examples:
      attnlab arena report
      attnlab arena report --sweep mqar --out docs/results/mqar
    """
    report_sweep(store, sweep_name, out)


@arena.command("list")
@click.option("--store", default=DEFAULT_STORE, show_default=True)
@click.option("--sweep", default=None, help="List this sweep's runs with their keys (what "
              "`attnlab heads --model` takes), metric and whether the weights are saved.")
def list_cmd(store: str, sweep: str | None) -> None:
    """The sweeps in a store, with their finished and failed runs; or one sweep's runs.

    \b
    Examples:
      attnlab arena list
      attnlab arena list --sweep mqar
    """
    from attnlab.arena.store import DB_NAME, RunStore, StoreError

    if not (Path(store) / DB_NAME).exists():
        raise click.UsageError(f"no store at {store}/")
    try:
        db = RunStore(store, readonly=True)
    except StoreError as err:
        raise click.ClickException(str(err)) from None
    table = Table(box=box.SIMPLE_HEAD)
    with db:
        if sweep is None:
            for col in ("sweep", "task", "done", "failed"):
                table.add_column(col)
            for s in db.sweeps():
                table.add_row(escape(s["sweep"]), s["task"], str(s["done"]), str(s["failed"]))
        else:
            rows = db.rows(sweep)
            if not rows:
                known = ", ".join(s["sweep"] for s in db.sweeps()) or "none"
                raise click.UsageError(f"no runs of sweep {sweep!r} in {store}/ "
                                       f"(sweeps: {known})")
            for col in ("key", "label", "seed", "status", "metrics", "weights"):
                table.add_column(col, overflow="fold")
            for r in rows:
                metrics = ", ".join(f"{k} {v:.4g}" for k, v in (r["metrics"] or {}).items()
                                    if isinstance(v, float))
                table.add_row(r["key"][:12], escape(r["label"]), str(r["seed"]), r["status"],
                              metrics, "saved" if db.model_path(r["key"]).exists() else "–")
    console.print(table)


@arena.command("export")
@click.option("--store", default=DEFAULT_STORE, show_default=True)
@click.option("--sweep", "sweep_name", help="Only this sweep's runs [default: every run].")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv",
              show_default=True, help="parquet needs pyarrow: pip install 'attnlab[parquet]'.")
@click.option("--out", default="attnlab-export", show_default=True,
              type=click.Path(file_okay=False), help="Folder for runs.FORMAT and curves.FORMAT.")
def export_cmd(store: str, sweep_name: str | None, fmt: str, out: str) -> None:
    """Write the stored runs as two tables: runs (one row per run: key, label, seed,
    status, time, the configuration flattened, the final metrics) and curves (one row per
    curve point: key, step, metric, value).

    \b
    Examples:
      attnlab arena export
      attnlab arena export --sweep mqar --format parquet --out mqar-tables
    Then, in Python (pandas is yours to install; attnlab does not need it):
      runs = pandas.read_csv("attnlab-export/runs.csv")
      curves = pandas.read_csv("attnlab-export/curves.csv")
    """
    from attnlab.arena.export import ExportError, export_rows

    db = open_store(store)
    with db:
        rows = db.rows(sweep_name)
        if sweep_name is not None and not rows:
            known = ", ".join(s["sweep"] for s in db.sweeps()) or "none"
            raise click.UsageError(f"no runs of sweep {sweep_name!r} in {store}/ "
                                   f"(sweeps: {known})")
    try:
        done = export_rows(rows, out, fmt)
    except ExportError as err:
        raise click.ClickException(str(err)) from None
    console.print(f"{done.run_count} run(s) -> {done.runs}\n"
                  f"{done.point_count} curve point(s) -> {done.curves}")


@arena.command("tasks")
def tasks_cmd() -> None:
    """The tasks, their metric, slices and parameters."""
    import dataclasses

    from attnlab.tasks import TASKS
    from attnlab.tasks.base import parameter_text

    table = Table(box=box.SIMPLE_HEAD)
    for col in ("task", "metric", "slices", "parameters (defaults)"):
        table.add_column(col, overflow="fold")
    for name in sorted(TASKS):
        cls = TASKS[name]
        params = ", ".join(f"{f.name}={parameter_text(f.default)}"
                           for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        arrow = "↑" if cls.higher_is_better else "↓"
        table.add_row(f"{name}\n[dim]{cls.description}[/dim]", f"{cls.metric} {arrow}",
                      cls.slice_axis, params)
    console.print(table)
