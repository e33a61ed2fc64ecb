"""Writes docs/mechanisms/parity.md: one row per mechanism, from each parity test module's
``OFFICIAL`` declaration and the largest error its tests reach on this machine.

    python -m tests.parity.table            # runs tests/parity, rewrites the page
    python -m tests.parity.table --check    # exit 1 if the page's rows are not the declared ones
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from tests.parity import common

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "mechanisms" / "parity.md"
MARK = "<!-- rows below are written by python -m tests.parity.table -->"


def declarations() -> dict[str, tuple[str, common.Official]]:
    """test module file (relative to the root) -> its ``OFFICIAL``, for every parity module."""
    found = {}
    package = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"tests.parity.{info.name}")
        official = getattr(module, "OFFICIAL", None)
        if not isinstance(official, common.Official):
            raise SystemExit(f"tests/parity/{info.name}.py declares no OFFICIAL")
        found[f"tests/parity/{info.name}.py"] = official
    return dict(sorted(found.items(), key=lambda kv: kv[1].mechanism))


def row(path: str, official: common.Official, reached: float | None) -> str:
    error = "—" if reached is None else f"{reached:.1e}"
    verdict = ("equal within 1e-10" if not official.differences
               else "differs: " + "; ".join(official.differences))
    cell = official.code.replace("|", "\\|")
    against = official.checked_against.replace("|", "\\|")
    return (f"| {official.mechanism} | {cell} | {against} | {error} | "
            f"{verdict.replace('|', chr(92) + '|')} | `{path}` |")


def render(reached: dict[str, float]) -> str:
    head = PAGE.read_text().split(MARK)[0] if PAGE.exists() else "# Parity\n\n"
    from attnlab.machine import describe, machine

    where = describe(machine())
    lines = [MARK, "",
             f"Errors: largest relative error (of the official tensor's scale) over every "
             f"compared tensor of the module's tests, float64, measured on {where}.", "",
             "| mechanism | official code | checked against | error | verdict | test |",
             "|---|---|---|---|---|---|"]
    for path, official in declarations().items():
        lines.append(row(path, official, reached.get(path)))
    return head + "\n".join(lines) + "\n"


def table_rows(text: str) -> list[str]:
    """Each row's mechanism, code and verdict cells (the error is machine-dependent)."""
    out = []
    for line in text.split(MARK)[-1].splitlines():
        if line.startswith("| ") and not line.startswith(("| mechanism", "|---")):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out.append(" | ".join(cells[:3] + cells[4:]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the page with the declarations; run no test")
    args = parser.parse_args(argv)
    if args.check:
        want = table_rows(render({}))
        got = table_rows(PAGE.read_text()) if PAGE.exists() else []
        if got != want:
            print(f"{PAGE} is stale: run python -m tests.parity.table", file=sys.stderr)
            return 1
        return 0
    import pytest

    code = pytest.main(["-q", "-p", "no:cacheprovider", str(Path(__file__).parent)])
    if code != 0:
        print("parity tests failed; page not written", file=sys.stderr)
        return int(code)
    PAGE.write_text(render(common.REACHED))
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(declarations())} mechanisms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
