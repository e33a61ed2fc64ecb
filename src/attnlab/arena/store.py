"""The result store: one SQLite database, one row per finished run (done or failed).

A row is written in one transaction when its run ends, so a sweep killed at any moment
(SIGKILL included) leaves every finished run in the database and none half-written; the
next ``attnlab arena run`` skips the keys already stored.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any

from attnlab.arena.config import RunSpec
from attnlab.arena.files import write_atomic
from attnlab.machine import describe, machine, provenance

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    sweep TEXT NOT NULL,
    task TEXT NOT NULL,
    label TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,
    slices TEXT NOT NULL,
    baselines TEXT NOT NULL,
    curves TEXT NOT NULL,
    params INTEGER,
    wall_time REAL,
    error TEXT,
    host TEXT,
    finished REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs (sweep);
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    provenance TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL
);
"""
JSON_COLUMNS = ("config", "metrics", "slices", "baselines", "curves")
DB_NAME = "runs.sqlite"
KEPT_DIR = "unsaved"  # results that could not be written to the database, one JSON each
MODELS_DIR = "models"  # the trained weights of each finished run, <key>.safetensors


class StoreError(Exception):
    """The result store cannot be opened, read or written; the message says what to do."""


def _check_intact(conn: sqlite3.Connection) -> None:
    """SQLite's own check of every page (``PRAGMA quick_check``): a file whose first page is
    intact and later pages are not opens fine and fails only when a resume reads or writes
    them. Raises ``sqlite3.DatabaseError`` (the caller says "damaged")."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"integrity check: {'; '.join(problems[:3])}")


class RunStore:
    """``RunStore(directory)``: the database ``directory/runs.sqlite`` (created if needed).

    ``readonly=True`` opens an existing store without writing anything (listing and
    reporting work on a read-only folder or a copy).
    """

    def __init__(self, directory: str | Path, *, readonly: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.readonly = readonly
        if self.path.exists() and self.path.stat().st_size == 0:
            raise StoreError(f"{self.path} is empty (0 bytes), which attnlab never writes: a "
                             "truncated copy or a full disk? Move it aside (or delete it) to "
                             "start a new store there.")
        try:
            self.conn = self._connect()
        except sqlite3.OperationalError as err:
            raise StoreError(f"cannot open the result store {self.path}: {err}") from err
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} is damaged ({err}); its runs cannot be read. Move "
                             "it aside (keep it for recovery) and run again to start a new "
                             "store.") from err
        self.machine = describe(machine())
        self.provenance = provenance()

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            if not self.path.exists():
                raise StoreError(f"no result store at {self.directory}/ "
                                 "(run: attnlab arena run ...)")
            # in a folder we cannot write, SQLite cannot make a WAL database's index file:
            # read it as immutable (nobody can write it there either)
            mode = "mode=ro" if os.access(self.directory, os.W_OK) else "immutable=1"
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?{mode}", uri=True)
            _check_intact(conn)
            conn.row_factory = sqlite3.Row
            return conn
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file in the way, no permission, a read-only disk
            raise StoreError(f"cannot create the result store folder {self.directory}: "
                             f"{err.strerror}; choose another with --store DIR") from None
        existed = self.path.exists()
        conn = sqlite3.connect(self.path, timeout=60)
        if existed:  # before anything is written to it
            _check_intact(conn)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        return conn

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statuses(self, keys: list[str]) -> dict[str, str]:
        """key -> status of the stored ones among ``keys``."""
        out: dict[str, str] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(f"SELECT key, status FROM runs WHERE key IN ({marks})",
                                     chunk)
            out.update({r["key"]: r["status"] for r in rows})
        return out

    def record(self, spec: RunSpec, result: dict[str, Any]) -> None:
        """Store a finished run (replacing a failed attempt of the same key); its trained
        weights, when the result has them, go to ``models/<key>.safetensors`` first."""
        if result.get("model"):
            folder = self.directory / MODELS_DIR
            folder.mkdir(exist_ok=True)
            write_atomic(folder / f"{spec.key}.safetensors", result["model"])
        config = {**spec.as_dict(), "machine": self.machine, "provenance": self.provenance}
        row = (spec.key, spec.sweep, spec.task, spec.label, spec.mechanism, spec.seed,
               result["status"], json.dumps(config), json.dumps(result["metrics"]),
               json.dumps(result["slices"]), json.dumps(result["baselines"]),
               json.dumps(result["curves"]), result.get("params"), result.get("wall_time"),
               result.get("error"), platform.node(), time.time())
        with self.conn:  # one transaction
            self.conn.execute(f"INSERT OR REPLACE INTO runs VALUES ({','.join('?' * 17)})", row)

    # ------------------------------------------------------------ results kept aside
    def keep_aside(self, spec: RunSpec, result: dict[str, Any]) -> Path:
        """Write a finished run that the database refused to ``unsaved/<key>.json``."""
        folder = self.directory / KEPT_DIR
        folder.mkdir(exist_ok=True)
        kept = {k: v for k, v in result.items() if k != "model"}  # bytes: not JSON
        return write_atomic(folder / f"{spec.key}.json",
                            json.dumps({"spec": spec.as_dict(), "key": spec.key,
                                        "result": kept}))

    def import_kept(self, specs: list[RunSpec]) -> int:
        """Store the kept-aside results of ``specs`` (then delete their files); returns how
        many were imported."""
        folder, count = self.directory / KEPT_DIR, 0
        for spec in specs:
            kept = folder / f"{spec.key}.json"
            if kept.exists():
                self.record(spec, json.loads(kept.read_text())["result"])
                kept.unlink()
                count += 1
        return count

    # ---------------------------------------------------------------------- claims
    def claim(self, specs: list[RunSpec], retry_failed: bool = False
              ) -> tuple[list[RunSpec], dict[str, str]]:
        """Claim the runs of ``specs`` that no other live process is training and that are
        not (or no longer) stored, in one transaction: two processes running one sweep
        never train the same run. Returns the claimed runs and, for the others held
        elsewhere, key -> who holds them. A claim of a process that died on this host is
        taken over; call ``release`` when done."""
        host, pid, mine, elsewhere = platform.node(), os.getpid(), [], {}
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for spec in specs:
                row = self.conn.execute("SELECT status FROM runs WHERE key = ?",
                                        (spec.key,)).fetchone()
                if row is not None and (row["status"] == "done" or not retry_failed):
                    continue  # stored meanwhile by another process
                held = self.conn.execute("SELECT host, pid FROM claims WHERE key = ?",
                                         (spec.key,)).fetchone()
                if held is not None and (held["host"], held["pid"]) != (host, pid) and \
                        _alive(held["host"], held["pid"]):
                    elsewhere[spec.key] = f"pid {held['pid']} on {held['host']}"
                    continue
                self.conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)",
                                  (spec.key, host, pid, time.time()))
                mine.append(spec)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return mine, elsewhere

    def release(self, specs: list[RunSpec]) -> None:
        """Drop this process's claims on ``specs``."""
        with self.conn:
            self.conn.executemany("DELETE FROM claims WHERE key = ? AND host = ? AND pid = ?",
                                  [(s.key, platform.node(), os.getpid()) for s in specs])

    def save_definition(self, name: str, definition: dict[str, Any]) -> None:
        """Remember the configuration a sweep was last run with: its report is made of
        exactly that configuration's runs (older configurations' runs stay stored, apart)."""
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO sweeps VALUES (?, ?, ?, ?)",
                              (name, json.dumps(definition), json.dumps(self.provenance),
                               time.time()))

    def definition(self, name: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT definition FROM sweeps WHERE name = ?",
                                (name,)).fetchone()
        return None if row is None else json.loads(row["definition"])

    def rows(self, sweep: str | None = None, keys: list[str] | None = None
             ) -> list[dict[str, Any]]:
        """Stored runs (of one sweep, or with the given keys), oldest first, JSON decoded."""
        args: tuple[str, ...]
        query, args = "SELECT * FROM runs", ()
        if sweep:
            query, args = query + " WHERE sweep = ?", (sweep,)
        out = []
        wanted = None if keys is None else set(keys)
        for r in self.conn.execute(query + " ORDER BY finished", args):
            if wanted is not None and r["key"] not in wanted:
                continue
            out.append(_decoded(r))
        return out

    def find(self, key: str) -> dict[str, Any]:
        """The stored run whose key is ``key`` or starts with it (as a short git hash);
        KeyError naming the problem when none or several match."""
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise KeyError(f"{key!r} is not a run key (keys are hexadecimal digests)")
        matches = list(self.conn.execute(
            "SELECT * FROM runs WHERE key LIKE ? ORDER BY finished", (f"{key}%",)))
        if not matches:
            raise KeyError(f"no run with key {key!r} in {self.directory}/")
        if len(matches) > 1:
            raise KeyError(f"{len(matches)} runs have keys starting with {key!r}; give more "
                           "characters")
        return _decoded(matches[0])

    def model_path(self, key: str) -> Path:
        """Where the run ``key``'s trained weights are (or would be)."""
        return self.directory / MODELS_DIR / f"{key}.safetensors"

    def sweeps(self) -> list[dict[str, Any]]:
        """One line per sweep: name, task, stored runs done and failed (of every
        configuration it was run with), last finish time."""
        query = ("SELECT sweep, task, SUM(status = 'done') AS done, "
                 "SUM(status = 'failed') AS failed, MAX(finished) AS last FROM runs "
                 "GROUP BY sweep, task ORDER BY last")
        return [dict(r) for r in self.conn.execute(query)]


def _decoded(row: sqlite3.Row) -> dict[str, Any]:
    """A stored run as a dict, its JSON columns decoded."""
    out = dict(row)
    for col in JSON_COLUMNS:
        out[col] = json.loads(out[col])
    return out


def _alive(host: str, pid: int) -> bool:
    """Whether the claiming process may still run: on another host we cannot tell (yes)."""
    if host != platform.node():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
