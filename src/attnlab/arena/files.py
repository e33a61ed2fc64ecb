"""Writing result files so that nothing half-written or outside its folder is left behind."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

DEFAULT_STORE = "attnlab-runs"  # where `attnlab arena run` stores its runs
DEFAULT_REPORTS = "attnlab-reports"  # where reports go (one folder per sweep)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, flushed to
    disk, then renamed over ``path``: a reader sees the old file or the whole new one, never
    a truncated one (a kill or a full disk leaves at most a stray temporary file, which is
    removed when the error is seen). A symlink at ``path`` is replaced, never followed."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask),
        # so that reports, tables and weights are as readable as the store beside them
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is one plain file or folder name (letters, digits, ``.``, ``_``,
    ``-``; not starting with ``.``), else ValueError: it becomes a path under a chosen
    folder, which ``../x`` or ``/x`` would leave."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} must be a plain name (letters, digits, '.', '_', "
                         "'-', not starting with '.' and without '/'): it names a folder "
                         "inside the output directory")
    return name
