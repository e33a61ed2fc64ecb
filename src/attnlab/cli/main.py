"""The ``attnlab`` command."""

from __future__ import annotations

import inspect
import re

import click
from rich import box
from rich.console import Console
from rich.table import Table

import attnlab as al  # lazy: torch is imported by the first command that needs it
from attnlab.tables import markdown_table

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
    return markdown_table(LIST_COLUMNS, registry_rows())


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
    try:
        rows = registry_rows(family, domain)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
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
    import torch

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
@click.option("--dim", default=256, show_default=True, type=click.IntRange(1),
              help="Model width of the backend probe.")
@click.option("--heads", default=4, show_default=True, type=click.IntRange(1),
              help="Heads of the backend probe.")
@click.option("--length", default=128, show_default=True, type=click.IntRange(1),
              help="Tokens of the backend probe.")
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
    from attnlab.core.registry import _accepted_arguments
    from attnlab.mechanisms.base import COMMON_ARGUMENTS

    own = getattr(i.cls, "arguments", {})
    takes = _accepted_arguments(i.cls)
    console.print(f"checked arguments of {i.name}: " + ("; ".join(
        f"{k}: {a.accepted()}" for k, a in own.items()) or "none of its own"),
        highlight=False, markup=False)
    console.print("common arguments it takes (checked for every mechanism): " + "; ".join(
        f"{k}: {a.accepted()}" for k, a in COMMON_ARGUMENTS.items()
        if k not in own and k in takes), highlight=False)
    _print_backends(name, dim, heads, length, device)
    console.print()
    console.print(_plain_doc(i.cls.__doc__ or ""), markup=False, highlight=False)


def _plain_doc(doc: str) -> str:
    """A docstring for the terminal: dedented, prose paragraphs unwrapped, reST's
    ``literal`` and :role:`x` as plain `literal` and x."""
    text = re.sub(r":[a-z]+:`([^`]*)`", r"\1", inspect.cleandoc(doc).replace("``", "`"))
    paragraphs = text.split("\n\n")  # prose re-flowed by the terminal; indented blocks kept
    return "\n\n".join(p if any(line.startswith(" ") for line in p.splitlines())
                       else " ".join(p.split()) for p in paragraphs)


@main.command()
@click.option("--mechanisms", help="Comma-separated mechanism names "
              "[default: softmax,sigmoid,softplus].")
@click.option("--steps", type=click.IntRange(1), help="Training steps per model [400].")
@click.option("--store", help="Result store directory [default attnlab-runs].")
@click.pass_context
def demo(ctx: click.Context, mechanisms: str | None, steps: int | None,
         store: str | None) -> None:
    """A seconds-long arena run: tiny LMs that differ only in attention learn to copy.

    The sweep of ``arena/configs/demo.toml`` (one seed each: runs to look at, not verdicts),
    run and reported by ``attnlab arena run``; ``attnlab arena`` gives verdicts.

    \b
    Examples:
      attnlab demo
      attnlab demo --mechanisms softmax,gated,selective --steps 600
    """
    from attnlab.cli.arena import CONFIGS, run_cmd

    ctx.invoke(run_cmd, config=str(CONFIGS / "demo.toml"), mechanisms=mechanisms, steps=steps,
               store=store)


def _add_arena() -> None:
    import attnlab.cli.search  # noqa: F401 - registers `attnlab arena search`
    from attnlab.cli.arena import arena
    from attnlab.cli.bench import bench
    from attnlab.cli.convert import convert
    from attnlab.cli.heads import heads

    main.add_command(arena)
    main.add_command(bench)
    main.add_command(heads)
    main.add_command(convert)


_add_arena()

if __name__ == "__main__":
    main()
