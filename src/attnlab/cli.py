"""The ``attnlab`` command."""

from __future__ import annotations

import click
import torch
from rich import box
from rich.console import Console
from rich.table import Table

import attnlab as al

console = Console()

WIDE_TABLE = 140  # terminal columns from which `attnlab list` shows the paper as a column
LIST_COLUMNS = ("name", "family", "paper", "causal", "bidirectional", "decode", "domains",
                "complexity")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def registry_rows(family: str | None = None, domain: str | None = None) -> list[list[str]]:
    """The registry as rows of LIST_COLUMNS (shared by the table and the Markdown output)."""
    rows = []
    for name in al.available(family=family, domain=domain):
        i = al.info(name)
        rows.append([i.name, i.family, i.paper, _yes(i.causal), _yes(i.bidirectional),
                     _yes(i.decode), ", ".join(i.domains), i.complexity])
    return rows


def registry_markdown() -> str:
    """The README's mechanism table, generated from the registry."""
    lines = ["| " + " | ".join(LIST_COLUMNS) + " |", "|" + "---|" * len(LIST_COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in registry_rows()]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(al.__version__, prog_name="attnlab")
def main() -> None:
    """attnlab: attention mechanisms behind one interface."""


@main.command("list")
@click.option("--family", help="Only this family (e.g. scored).")
@click.option("--domain", help="Only mechanisms for this domain (seq, image).")
@click.option("--markdown", is_flag=True, help="Print a Markdown table (as in the README).")
def list_cmd(family: str | None, domain: str | None, markdown: bool) -> None:
    """The registered mechanisms as a table.

    \b
    Examples:
      attnlab list
      attnlab list --family scored
      attnlab list --markdown > table.md
    """
    if markdown:
        click.echo(registry_markdown())
        return
    rows = registry_rows(family, domain)
    title = f"attnlab {al.__version__}: registered attention mechanisms"
    wide = console.width >= WIDE_TABLE
    # Narrow terminals: no borders, and the papers listed under the table instead of a column.
    table = Table(title=title, box=box.HEAVY_HEAD if wide else None, pad_edge=wide)
    for col in LIST_COLUMNS:
        if col == "paper":
            if wide:
                table.add_column(col, overflow="fold", ratio=1)
        elif col == "bidirectional" and not wide:
            table.add_column("bidir", no_wrap=True)
        else:
            table.add_column(col, no_wrap=True)
    short = {"image": "img", "video": "vid"}
    for row in rows:
        if not wide:  # the paper goes below the table; domains abbreviated
            domains = ",".join(short.get(d, d) for d in row[6].split(", "))
            row = row[:2] + row[3:6] + [domains, row[7]]
        table.add_row(*row)
    console.print(table)
    if not wide:
        console.print()
        for row in rows:
            console.print(f"[bold]{row[0]}[/bold]: {row[2]}", overflow="fold")


def _print_backends(name: str, dim: int, heads: int, length: int, device: str) -> None:
    from attnlab.ops.dispatch import recorded

    attn = al.build(name, dim=dim, heads=heads).to(device)
    x = torch.randn(1, length, dim, device=device, requires_grad=True)
    with recorded() as choices:
        attn(x).sum().backward()
    where = f"{device}, dim={dim}, heads={heads}, length={length}, training"
    if not choices:
        console.print(f"op backends ({where}): none to choose (no dispatched op)")
        return
    console.print(f"op backends ({where}):")
    seen = set()
    for op, verdicts in choices:
        line = f"  {op}: " + "; ".join(f"{b} {v}" for b, v in verdicts)
        if line not in seen:
            seen.add(line)
            console.print(line, overflow="fold", highlight=False)


@main.command()
@click.argument("name")
@click.option("--dim", default=256, show_default=True, help="Model width of the backend probe.")
@click.option("--heads", default=4, show_default=True, help="Heads of the backend probe.")
@click.option("--length", default=128, show_default=True, help="Tokens of the backend probe.")
@click.option("--device", default="cpu", show_default=True, help="Device of the backend probe.")
def info(name: str, dim: int, heads: int, length: int, device: str) -> None:
    """Metadata, defaults, op backends and docstring of one mechanism.

    The backends are those one training step (forward and backward) of the mechanism with
    its defaults takes on --device at --dim/--heads/--length, with the reason each other
    backend was skipped.

    \b
    Example:
      attnlab info softplus
      attnlab info sigmoid --device cuda --dim 128 --heads 16
    """
    try:
        i = al.info(name)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    console.print(f"[bold]{i.name}[/bold] ({i.family}) — {i.paper}")
    console.print(f"modes: {i.modes}; decode: {_yes(i.decode)}; domains: "
                  f"{', '.join(i.domains)}; complexity: {i.complexity}; "
                  f"weights(): {_yes(i.weights)}; cross-attention: {_yes(i.cross)}")
    if i.notes:
        console.print(f"notes: {i.notes}")
    console.print("defaults: " + ", ".join(f"{k}={v!r}" for k, v in i.defaults.items()))
    _print_backends(name, dim, heads, length, device)
    console.print()
    console.print(i.cls.__doc__ or "")


@main.command()
@click.option("--mechanisms", default="softmax,sigmoid,softplus", show_default=True,
              help="Comma-separated mechanism names.")
@click.option("--steps", default=150, show_default=True, help="Training steps per model.")
@click.option("--seconds", default=8.0, show_default=True,
              help="Wall-time cap per model (seconds).")
@click.option("--seed", default=0, show_default=True)
def demo(mechanisms: str, steps: int, seconds: float, seed: int) -> None:
    """Train tiny LMs that differ only in attention on induction copying; print losses.

    \b
    Examples:
      attnlab demo
      attnlab demo --mechanisms softmax,gated,selective --steps 300 --seconds 20
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from attnlab.demo import train_one

    names = [m.strip() for m in mechanisms.split(",") if m.strip()]
    for n in names:
        try:
            al.info(n)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--mechanisms") from None
    results = []
    columns = (TextColumn("{task.description:<10}"), BarColumn(),
               TextColumn("step {task.completed:>4.0f}/{task.total:.0f}"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for n in names:
            task = progress.add_task(n, total=steps, loss="–")
            results.append(train_one(
                n, steps=steps, seconds=seconds, seed=seed,
                on_step=lambda s, loss, task=task: progress.update(task, completed=s,
                                                                   loss=f"{loss:.3f}")))
    table = Table(title="induction copy (vocab 16, 16 tokens shown twice): predict the copy",
                  box=box.SIMPLE_HEAD)
    for col in ("mechanism", "params", "steps", "train loss", "test loss", "test acc",
                "seconds"):
        table.add_column(col, justify="left" if col == "mechanism" else "right", no_wrap=True)
    for r in results:
        table.add_row(r.mechanism, f"{r.params:,}", str(r.steps), f"{r.train_loss:.3f}",
                      f"{r.test_loss:.3f}", f"{r.test_accuracy:.1%}", f"{r.seconds:.1f}")
    console.print(table)
    console.print("chance: loss 2.773 (ln 16), accuracy 6.2%")


def _add_arena() -> None:
    from attnlab.cli_arena import arena

    main.add_command(arena)


_add_arena()

if __name__ == "__main__":
    main()
