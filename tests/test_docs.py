"""The code in the docs runs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import attnlab as al

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _walkthrough_files() -> dict[str, str]:
    """The files of contract.md's "Adding a mechanism": code blocks whose first line names
    the path (``# path`` in Python, ``<!-- path -->`` in Markdown)."""
    section = (DOCS / "contract.md").read_text().split("## Adding a mechanism", 1)[1]
    section = section.split("\n## ", 1)[0]
    files = {}
    for body in re.findall(r"```(?:python|markdown)\n(.*?)```", section, re.S):
        first, rest = body.split("\n", 1)
        path = re.fullmatch(r"(?:# (\S+)|<!-- (\S+) -->)", first.strip())
        assert path, f"a walk-through block does not start with its path: {first!r}"
        files[path.group(1) or path.group(2)] = rest
    return files


@pytest.mark.slow  # several seconds; .ci/run runs the slow tests too
def test_adding_a_mechanism_as_contract_md_shows_touches_three_files_and_passes(tmp_path):
    """Executes the walk-through: a copy of the package and tests plus exactly the files the
    doc shows; the new mechanism must then be registered and pass the conformance suite, its
    own test, the docs-page check and the CLI, with no other file edited."""
    root = DOCS.parent
    files = _walkthrough_files()
    assert sorted(files) == ["docs/mechanisms/my_cosine.md",
                             "src/attnlab/mechanisms/my_cosine.py",
                             "tests/mechanisms/test_my_cosine.py"]
    for part in ("src/attnlab", "tests", "docs/mechanisms"):
        shutil.copytree(root / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    for path, text in files.items():
        assert not (tmp_path / path).exists(), f"{path} would overwrite an existing file"
        (tmp_path / path).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    tests = ["tests/mechanisms/test_my_cosine.py", "tests/conformance", "-k",
             "my_cosine or every_registered_mechanism_has_a_page",
             "tests/test_docs.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *tests], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    assert passed >= 60, run.stdout[-500:]  # the conformance cases ran, not only the 3 tests
    info = subprocess.run([sys.executable, "-m", "attnlab.cli", "info", "my_cosine"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert info.returncode == 0 and "Swin Transformer V2" in info.stdout, info.stderr


def readme_blocks(compiling: bool) -> list[str]:
    """The README's Python examples: those that compile or export (seconds of tracing) or the
    others."""
    readme = (DOCS.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    return [b for b in blocks if ("torch.compile" in b or "torch.export" in b) == compiling]


def run_blocks(blocks: list[str]) -> None:
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_the_readme_python_examples_run_and_print_what_they_say(capsys):
    blocks = readme_blocks(compiling=False)
    assert len(blocks) >= 4
    run_blocks(blocks)
    printed = capsys.readouterr().out.split()
    assert printed == ["True", "True", "True", "torch.Size([1,", "8,", "4096,", "64])", "8", "2"]


@pytest.mark.slow  # ~5 s of tracing: .ci/run runs it (pytest -m slow)
def test_the_readme_compile_and_export_example_prints_what_it_says(capsys):
    (block,) = readme_blocks(compiling=True)
    run_blocks([block])
    assert capsys.readouterr().out.split() == ["True", "torch.Size([2,", "37,", "64])"]


def test_every_registered_mechanism_has_a_page_naming_its_paper():
    pages = Path(__file__).resolve().parents[1] / "docs" / "mechanisms"
    for name in al.available():
        page = pages / f"{name}.md"
        assert page.exists(), f"docs/mechanisms/{name}.md is missing"
        text = " ".join(page.read_text().split())
        title = al.info(name).paper.split(":")[0]
        assert title in text, f"{page.name} does not name its paper ({title!r})"


def test_every_mechanism_has_an_official_code_section_and_a_parity_row():
    """The parity table lists exactly the tests' OFFICIAL declarations, one per registered
    mechanism, and each mechanism's page has its "Official code" section."""
    from tests.parity import table

    declared = {o.mechanism for o in table.declarations().values()}
    assert declared == set(al.available()), f"no parity module: {set(al.available()) - declared}"
    for name in al.available():
        text = (DOCS / "mechanisms" / f"{name}.md").read_text()
        assert "## Official code" in text, f"docs/mechanisms/{name}.md: no Official code section"
    assert table.main(["--check"]) == 0, "python -m tests.parity.table to regenerate"


def test_readme_performance_tables_are_generated_from_the_recorded_bench_results(tmp_path):
    """Every `<!-- bench: ... -->` block of the README equals what `attnlab bench readme`
    generates from the JSON it names."""
    from attnlab.bench.report import update_readme

    root = DOCS.parent
    copy = tmp_path / "README.md"
    shutil.copy(root / "README.md", copy)
    assert update_readme(copy, root) >= 3
    assert copy.read_text() == (root / "README.md").read_text()
