"""The ``attnlab`` command, end to end (through click's runner)."""

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import attnlab as al
from attnlab.arena.config import load_sweep
from attnlab.arena.store import RunStore
from attnlab.arena.trainer import train_run
from attnlab.cli import main, registry_markdown
from attnlab.cli.arena import CONFIGS

README = Path(__file__).resolve().parents[1] / "README.md"


def invoke(*args, columns=80):
    import attnlab.cli as cli

    cli.console.width = columns  # the terminal width the table is laid out for
    try:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        cli.console.width = None


@pytest.mark.parametrize("columns", [80, 200])
def test_list_shows_every_registered_mechanism_with_its_metadata(columns):
    out = invoke("list", columns=columns).output
    assert max(len(line) for line in out.splitlines()) <= columns
    for name in al.available():
        assert name in out
        assert al.info(name).paper[:30] in out.replace("\n", " ")
    bidirectional = "bidirectional" if columns >= 140 else "bidir"  # narrow: abbreviated
    for header in ("family", "causal", bidirectional, "decode", "domains", "complexity"):
        assert header in out


def test_list_markdown_is_the_registry_table_and_the_readme_carries_it():
    out = invoke("list", "--markdown").output.strip()
    assert out == registry_markdown()
    assert out.count("\n") == len(al.available()) + 1
    readme = README.read_text()
    block = re.search(r"<!-- mechanisms:start -->\n(.*?)\n<!-- mechanisms:end -->", readme, re.S)
    assert block, "README lacks the generated mechanism table"
    # every row the README shows is the registry's row (a mechanism added since the table
    # was last generated may be missing: adding a mechanism does not touch the README)
    shown = block.group(1).strip().splitlines()
    generated = registry_markdown().splitlines()
    assert shown[:2] == generated[:2]
    stale = [row for row in shown[2:] if row not in generated[2:]]
    assert not stale, f"README rows differ from the registry (`attnlab list --markdown`): {stale}"
    assert len(shown) - 2 >= 28


def test_info_prints_metadata_and_suggests_on_typos():
    out = invoke("info", "softplus").output
    assert "reweight_p=15.0" in out and "Softplus Attention" in out
    bad = CliRunner().invoke(main, ["info", "sofplus"])
    assert bad.exit_code == 2 and "Did you mean 'softplus'" in bad.output
    assert "causal: True, False or None" in " ".join(out.split())  # the declared checks
    assert ("checked arguments of softplus: reweight_p: a finite number that is 0 (LSSA) or "
            ">= 1 or None") in " ".join(out.split())  # its own declarations (issue 41)
    negative = CliRunner().invoke(main, ["info", "softmax", "--dim", "-3"])  # was a traceback
    assert negative.exit_code == 2 and "'--dim': -3 is not in the range" in negative.output


@pytest.mark.slow  # trains the shipped demo: ~5 s (.ci/run runs it with -m slow)
def test_demo_is_an_arena_run_of_the_shipped_demo_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report goes to ./attnlab-reports/demo/
    result = invoke("demo", "--mechanisms", "softmax,sigmoid", "--steps", "3",
                    "--store", str(tmp_path / "runs"))
    assert result.exit_code == 0
    assert "sweep demo: task copy, 2 contestants x 1 seeds = 2 runs" in result.output
    assert "sigmoid" in result.output and (tmp_path / "attnlab-reports/demo/report.md").exists()
    with RunStore(tmp_path / "runs") as store:  # stored by the arena: one trainer, one store
        rows = store.rows("demo")
    assert sorted(r["config"]["label"] for r in rows) == ["sigmoid", "softmax"]
    assert {r["config"]["train"]["steps"] for r in rows} == {3}
    bad = CliRunner().invoke(main, ["demo", "--mechanisms", "softmux"])
    assert bad.exit_code == 2 and "Did you mean 'softmax'" in bad.output


@pytest.mark.slow
def test_demo_config_learns_to_copy():
    sweep = load_sweep(CONFIGS / "demo.toml")
    spec = next(s for s in sweep.runs() if s.label == "softmax")
    trained = train_run(spec)
    untrained = train_run(dataclasses.replace(spec, train={**spec.train, "steps": 1}))
    assert trained["status"] == untrained["status"] == "done"
    assert trained["metrics"]["accuracy"] > untrained["metrics"]["accuracy"] + 0.3


def test_the_command_and_its_help_do_not_import_torch():
    """`attnlab --help` answered in 2.3 s because the CLI imported torch at start."""
    import subprocess
    import sys

    code = ("import sys, attnlab.cli; "
            "from click.testing import CliRunner; "
            "r = CliRunner().invoke(attnlab.cli.main, ['arena', '--help']); "
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "False"]


def test_an_unknown_family_is_an_error_that_lists_the_known_ones():
    from click.testing import CliRunner

    from attnlab.cli import main

    result = CliRunner().invoke(main, ["list", "--family", "foo"])
    assert result.exit_code == 2 and "known: head-mixing, linear" in result.output


def test_info_prints_the_docstring_as_plain_text_at_80_and_120_columns():
    from click.testing import CliRunner

    from attnlab.cli import main

    for width in (80, 120):
        out = CliRunner().invoke(main, ["info", "gated", "--length", "16"],
                                 env={"COLUMNS": str(width)}).output
        assert "``" not in out and '`gate="elementwise"`' in out
        assert max(len(line) for line in out.splitlines()) <= width
