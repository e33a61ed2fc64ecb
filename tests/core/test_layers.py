"""The package's layers import only downwards: core <- modules (parts) <- ops <- mechanisms
<- distributed <- integrations <- models <- tasks <- arena <- heads <- bench <- cli
(docs/architecture.md). Imports
inside ``if TYPE_CHECKING:`` are annotations only and allowed."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "attnlab"
LAYERS = ["core", "modules", "ops", "mechanisms", "distributed", "integrations", "models",
          "tasks", "arena", "heads", "bench", "cli"]
LEAVES = {"tables", "machine"}  # helpers usable by every layer: they import no layer
# (machine reads attnlab.__version__ inside a function)


def layer_of(module: str) -> str | None:
    """``attnlab.ops.softmax`` -> ``ops``; ``attnlab.cli.arena`` -> ``cli``."""
    parts = module.split(".")
    if parts[0] != "attnlab" or len(parts) == 1:
        return None
    top = parts[1]
    if top.startswith("cli"):
        return "cli"
    return top if top in LAYERS else None


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_no_layer_imports_a_higher_one():
    wrong = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    for path in files:
        module = "attnlab." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        mine = layer_of(module)
        for line, target in runtime_imports(path):
            theirs = layer_of(target)
            if path.stem in LEAVES and theirs is not None:
                wrong.append(f"{module}:{line} imports {target} (a leaf helper)")
            if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from attnlab.arena.trainer import train_run\n")
    assert layer_of(runtime_imports(bad)[0][1]) == "arena"
    assert LAYERS.index("arena") > LAYERS.index("ops")


def test_no_empty_packages():
    for init in PACKAGE.rglob("__init__.py"):
        content = [p for p in init.parent.iterdir()
                   if (p.suffix == ".py" and p != init) or (p / "__init__.py").exists()]
        assert content, f"{init.parent} is an empty package"
