"""attnlab is typed for its users: a user's mypy sees its annotations (``py.typed``), so
``al.build(...)`` is an ``Attention`` and calling it gives a ``Tensor``, not ``Any``; and the
wheel carries ``py.typed`` and the LICENSE.

Both tests start a process that takes a minute on a 2-core machine (mypy analyses torch's
stubs from a cold cache; pip builds the wheel), so they are ``slow``."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import attnlab

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(attnlab.__file__).resolve().parent  # the attnlab under test

USER_CODE = '''\
import torch

import attnlab as al

attn = al.build("sigmoid", dim=32, heads=4, causal=True)
reveal_type(attn)
reveal_type(attn(torch.randn(2, 5, 32)))
reveal_type(attn.new_state(2))
reveal_type(al.info("sigmoid").decode)
attn(torch.randn(2, 5, 32), mask="every token")
'''


@pytest.mark.slow
def test_user_mypy_sees_attnlab_types(tmp_path):
    """mypy on a user's file: attnlab is found as an installed package (through the path,
    not as source given to mypy), so without ``py.typed`` it would be ``Any``."""
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(USER_CODE)
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "c"),
         "--show-error-codes", "user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    revealed = [(line, kind.removeprefix("builtins."))  # mypy < 2 prints builtins.bool
                for line, kind in re.findall(r'user\.py:(\d+): note: Revealed type is "([^"]+)"',
                                             out)]
    assert revealed == [
        ("6", "attnlab.mechanisms.base.Attention"),
        ("7", "torch._tensor.Tensor"),
        ("8", "attnlab.core.state.State"),
        ("9", "bool"),
    ], out
    # the one error is the user's: a mask must be a tensor (and attnlab is not untyped)
    errors = re.findall(r"user\.py:(\d+): error: .*\[([a-z-]+)\]", out)
    assert errors == [("10", "arg-type")], out
    assert proc.returncode == 1, out


@pytest.mark.slow
def test_wheel_ships_license_and_py_typed(tmp_path):
    """The wheel holds ``attnlab/py.typed`` and the Apache-2.0 LICENSE in its metadata.
    Built from a copy of the project (an in-tree build would leave ``build/`` in the checkout,
    and files a stale ``build/lib`` still holds would hide a missing one)."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, project / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(project)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("attnlab-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "attnlab/py.typed" in names
        licenses = [n for n in names if re.fullmatch(r"attnlab-[^/]+\.dist-info/licenses/LICENSE",
                                                      n)]
        assert len(licenses) == 1, names
        text = zf.read(licenses[0]).decode()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert (ROOT / "LICENSE").read_text() == text
    assert "License-Expression: Apache-2.0" in metadata
