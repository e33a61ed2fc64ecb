"""Writing result files so that nothing half-written or outside its folder is left behind."""

from __future__ import annotations

import re

from attnlab.files import write_atomic

__all__ = ["DEFAULT_REPORTS", "DEFAULT_STORE", "check_name", "write_atomic"]

DEFAULT_STORE = "attnlab-runs"  # where `attnlab arena run` stores its runs
DEFAULT_REPORTS = "attnlab-reports"  # where reports go (one folder per sweep)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is one plain file or folder name (letters, digits, ``.``, ``_``,
    ``-``; not starting with ``.``), else ValueError: it becomes a path under a chosen
    folder, which ``../x`` or ``/x`` would leave."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} must be a plain name (letters, digits, '.', '_', "
                         "'-', not starting with '.' and without '/'): it names a folder "
                         "inside the output directory")
    return name
