"""``attnlab bench``: speed, memory and scaling of attnlab's fast paths next to the peers."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
DEFAULT_OUT = Path("benchmarks/results")


@click.group()
def bench() -> None:
    """Benchmark suites: attnlab against SDPA, compiled FlexAttention, NATTEN, fla and
    x-transformers (each used where installed: pip install 'attnlab[bench]').

    \b
      attnlab bench list
      attnlab bench run ops                     # the op suite on the CPU, fp32
      attnlab bench run decode --dtype fp32 bf16
      attnlab bench run scaling --device cuda
      attnlab bench readme README.md            # regenerate the README's tables
    """


@bench.command("list")
def list_suites() -> None:
    """Suites, their groups and contestants, and which peers are usable here."""
    from attnlab.bench.peers import PEERS, peer_missing
    from attnlab.bench.suites import GROUPS, SUITES

    for suite, plans in SUITES.items():
        console.print(f"[bold]{suite}[/bold]")
        for plan in plans:
            console.print(f"  {plan.group}: L = {', '.join(map(str, plan.lengths))}; "
                          f"{', '.join(plan.modes)}")
    console.print("\n[bold]groups[/bold]")
    for group in GROUPS.values():
        console.print(f"  {group.name} (baseline {group.baseline}): "
                      + ", ".join(group.contestants))
    console.print("\n[bold]peers[/bold]")
    for peer in PEERS:
        missing = peer_missing(peer)
        console.print(f"  {peer}: " + ("[green]usable[/green]" if missing is None
                                       else f"[yellow]{escape(missing)}[/yellow]"))


@bench.command("run")
@click.argument("suite")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["fp32", "bf16"]),
              help="Repeat for several (default fp32).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["train", "inference"]),
              help="Only these modes (default: the suite's).")
@click.option("--lengths", help="Comma-separated lengths replacing the suite's, e.g. 1024,4096.")
@click.option("--group", "groups", multiple=True, help="Only these groups of the suite.")
@click.option("--contestant", "contestants", multiple=True,
              help="Only these contestants (the group's baseline always runs).")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1),
              help="Interleaved rounds per workload (median and spread over them).")
@click.option("--memory-limit", default=12.0, show_default=True, type=click.FloatRange(0.1),
              help="GiB: dense contestants predicted over it are not run; on the CPU a "
                   "worker's allocations past ~1.5x it fail (recorded as out of memory).")
@click.option("--max-step-seconds", default=60.0, show_default=True,
              help="A contestant whose first step takes longer is recorded as too slow.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--fresh", is_flag=True, help="Measure the selected workloads again, keeping "
              "the report's other rows (default: resume, measuring only workloads not in "
              "the existing report).")
@click.option("--malloc", default="mmap-off", show_default=True,
              type=click.Choice(["mmap-off", "default"]),
              help="glibc's allocator while timing: mmap-off keeps freed blocks of 32 MiB and "
                   "more for reuse (default glibc maps them fresh from the OS every time, "
                   "page faults that grow the time of every step past that size). Recorded "
                   "with each row.")
@click.option("--no-plots", is_flag=True, help="Skip the log-log plots.")
def run(suite: str, device: str, dtypes: tuple[str, ...], modes: tuple[str, ...],
        lengths: str | None, groups: tuple[str, ...], contestants: tuple[str, ...],
        rounds: int, memory_limit: float, max_step_seconds: float, out: Path, fresh: bool,
        malloc: str, no_plots: bool) -> None:
    """Run SUITE (ops, modules, decode, scaling, gpu); writes
    OUT/bench-SUITE-DEVICE-HOST.{json,md} and .png plots, saving after every workload."""
    import torch

    from attnlab.bench.report import write_outputs
    from attnlab.bench.runner import run_suite
    from attnlab.bench.suites import GROUPS, workloads

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise click.BadParameter(f"{device!r} is not usable here: {err}",
                                 param_hint="--device") from None
    try:
        parsed = tuple(int(x) for x in lengths.split(",")) if lengths else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {lengths!r}",
                                 param_hint="--lengths") from None
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise click.BadParameter(f"unknown group(s) {unknown}; choose from {sorted(GROUPS)}",
                                 param_hint="--group")
    known = {n for g in GROUPS.values() for n in g.contestants}
    unknown = [c for c in contestants if c not in known]
    if unknown:
        raise click.BadParameter(f"unknown contestant(s) {unknown}; see `attnlab bench list`",
                                 param_hint="--contestant")
    try:
        todo = workloads(suite, device, dtypes or ("fp32",), rounds, lengths=parsed,
                         modes=modes or None, groups=groups or None)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="SUITE") from None
    if not todo:
        raise click.UsageError("these options select no workload of the suite")
    command = shlex.join(["attnlab", *sys.argv[1:]])
    columns = (TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    console.print(f"suite [bold]{suite}[/bold] on {device}: {len(todo)} workload(s), "
                  f"{rounds} interleaved rounds each")
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting", total=None)

        def show(label: str, done: int, total: int) -> None:
            progress.update(task, description=label, completed=done, total=total)

        def saved(report: dict, path: Path) -> None:
            write_outputs(report, path, plots=False)

        try:
            report, path = run_suite(todo, suite=suite, device=device, out=out,
                                     contestants=contestants or None,
                                     memory_limit_gb=memory_limit,
                                     max_step_seconds=max_step_seconds, fresh=fresh,
                                     malloc=malloc, command=command, progress=show, on_saved=saved)
        except KeyboardInterrupt:
            progress.stop()
            console.print("[yellow]interrupted[/yellow]: the workloads finished so far are "
                          f"saved in {out}/; run the same command again to measure the rest")
            sys.exit(130)
    md = write_outputs(report, path, plots=not no_plots)
    console.print(f"wrote {path} and {md}")


@bench.command("readme")
@click.argument("readme", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                default="README.md")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=".",
              show_default=True, help="What the blocks' result paths are relative to.")
def readme(readme: Path, root: Path) -> None:
    """Regenerate README's `<!-- bench: RESULTS.json GROUP MODE DTYPE -->` tables from the
    recorded results."""
    from attnlab.bench.report import update_readme

    try:
        count = update_readme(readme, root)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    console.print(f"regenerated {count} table(s) in {readme}")
