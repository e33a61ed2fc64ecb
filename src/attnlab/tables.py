"""Markdown tables: the one renderer of the CLI, the arena reports and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table: a header row, a separator, one line per row (no newline at
    the end). Cells are written as given; a ``|`` inside a cell is escaped."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"markdown_table: row {i} has {len(row)} cells, the header "
                             f"{len(header)}")
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])
