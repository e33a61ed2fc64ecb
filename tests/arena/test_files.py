"""arena/files.py: atomic writes give the file the mode a plain open() would."""

import os
import stat

import pytest

from attnlab.arena.files import write_atomic


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_an_atomic_write_has_the_mode_of_open_under_the_umask(tmp_path, umask):
    """mkstemp's 0600 made every report, export table and weights file unreadable to other
    users under the usual umask 022 (the store's SQLite file beside them was 0644)."""
    old = os.umask(umask)
    try:
        path = write_atomic(tmp_path / "report.md", "# report\n")
        plain = tmp_path / "plain.md"
        plain.write_text("# plain\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) \
        == 0o666 & ~umask
    assert path.read_text() == "# report\n"
