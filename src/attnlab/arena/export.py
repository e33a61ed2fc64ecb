"""Stored runs as two flat tables for pandas, R or a spreadsheet: one row per run, one row
per curve point.

``runs``: ``key``, ``sweep``, ``task``, ``label``, ``mechanism``, ``seed``, ``status``,
``params``, ``wall_time`` (seconds), ``finished`` (UTC, ISO 8601), ``host``, ``error`` (its
first line), then the configuration flattened with dots (``task_params.seq_len``,
``kwargs.learn_bias``, ``model.dim``, ``train.lr``, ``provenance.commit``, ``machine``; a list
is written as JSON text) and the final metrics as ``metrics.<name>`` (test metrics, and the
validation metric as ``metrics.val_<metric>``).

``curves``: ``key``, ``sweep``, ``label``, ``seed``, ``step``, ``metric`` (``train_loss``,
``lr``, ``grad_norm``, ``val_<metric>``) and ``value``: the long form, one point a row
(``df.pivot_table(index=["key", "step"], columns="metric", values="value")`` gives the wide
one). Runs stored before the validation curves existed give their training loss only.

CSV is written with the standard library; Parquet needs pyarrow (``pip install
'attnlab[parquet]'``), imported only when asked for.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from attnlab.arena.files import write_atomic
from attnlab.arena.store import curve_points

FORMATS = ("csv", "parquet")
RUN_COLUMNS = ("key", "sweep", "task", "label", "mechanism", "seed", "status", "params",
               "wall_time", "finished", "host", "error")
CURVE_COLUMNS = ("key", "sweep", "label", "seed", "step", "metric", "value")
# configuration keys that are already columns of their own
_TOP_LEVEL = {"sweep", "task", "label", "mechanism", "seed"}
PARQUET_HINT = "pip install 'attnlab[parquet]'"
# always text in Parquet, whatever a store holds (an all-null column would otherwise get a
# numeric type, and tables from two stores would not concatenate)
TEXT_COLUMNS = frozenset({"key", "sweep", "task", "label", "mechanism", "status", "finished",
                          "host", "error", "metric"})


class ExportError(Exception):
    """An export that cannot be written; the message says what to do."""


class Exported(NamedTuple):
    """What ``export_rows`` wrote."""

    runs: Path
    curves: Path
    run_count: int
    point_count: int


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """``value`` under ``prefix``, nested dicts flattened with dots."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = _cell(value)


def _cell(value: Any) -> Any:
    """A table cell: None, bool, int, float or str (lists and tuples as JSON text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _utc(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def run_records(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat dict per stored run (``RunStore.rows()``), in the order given."""
    records = []
    for r in rows:
        record: dict[str, Any] = {
            "key": r["key"], "sweep": r["sweep"], "task": r["task"], "label": r["label"],
            "mechanism": r["mechanism"], "seed": r["seed"], "status": r["status"],
            "params": r.get("params"), "wall_time": r.get("wall_time"),
            "finished": _utc(r.get("finished")), "host": r.get("host"),
            "error": (r.get("error") or "").splitlines()[0] if r.get("error") else None}
        config = {k: v for k, v in (r.get("config") or {}).items() if k not in _TOP_LEVEL}
        _flat("", config, record)
        for name, value in (r.get("metrics") or {}).items():
            record[f"metrics.{name}"] = _cell(value)
        records.append(record)
    return records


def curve_records(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per recorded curve point of the stored runs (long form)."""
    return [{"key": r["key"], "sweep": r["sweep"], "label": r["label"], "seed": r["seed"],
             "step": step, "metric": name, "value": float(value)}
            for r in rows for name, step, value in curve_points(r.get("curves") or {})]


def columns_of(records: list[dict[str, Any]], first: tuple[str, ...]) -> list[str]:
    """``first``, then the other keys of ``records``: the configuration's, then the
    metrics', each in the order first met."""
    seen = list(dict.fromkeys(k for rec in records for k in rec if k not in first))
    config = [k for k in seen if not k.startswith("metrics.")]
    metrics = [k for k in seen if k.startswith("metrics.")]
    return [*first, *config, *metrics]


def write_csv(records: list[dict[str, Any]], columns: list[str], path: Path) -> Path:
    """A CSV file with a header row; missing values are empty cells, floats are written
    exactly (``repr``), non-finite ones as nan / inf / -inf."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: "" if rec.get(k) is None else rec[k] for k in columns})
    return write_atomic(path, buf.getvalue())


def require_pyarrow() -> Any:
    """The ``pyarrow`` module, or ExportError saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ExportError(f"Parquet export needs pyarrow, which is not installed: "
                          f"{PARQUET_HINT} (or use --format csv)") from None
    return pyarrow


def _arrow_type(pa: Any, values: list[Any]) -> Any:
    """The column's type: bool, int64 or float64 when every value is one, else string."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if any(isinstance(v, bool) for v in present) or \
            not all(isinstance(v, int | float) for v in present):
        return pa.string()
    if all(isinstance(v, int) for v in present):
        return pa.int64()
    return pa.float64()


def write_parquet(records: list[dict[str, Any]], columns: list[str], path: Path) -> Path:
    """A Parquet file: a column whose values mix types (e.g. ``train.lr`` given as 1 and
    0.001) is float when all are numbers, else text."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    arrays, fields = [], []
    for name in columns:
        values = [rec.get(name) for rec in records]
        kind = pa.string() if name in TEXT_COLUMNS or all(v is None for v in values) \
            else _arrow_type(pa, values)
        if kind == pa.string():
            values = [None if v is None else str(v) for v in values]
        elif kind == pa.float64():
            values = [None if v is None else float(v) for v in values]
        arrays.append(pa.array(values, type=kind))
        fields.append(pa.field(name, kind))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return write_atomic(path, buf.getvalue().to_pybytes())


def export_rows(rows: list[dict[str, Any]], out_dir: str | Path, fmt: str = "csv"
                ) -> Exported:
    """Write ``runs.<fmt>`` and ``curves.<fmt>`` of ``rows`` (``RunStore.rows()``) in
    ``out_dir`` (created if needed)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        require_pyarrow()  # before anything is written
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; --out names a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create {out}: {err.strerror}") from None
    runs, curves = run_records(rows), curve_records(rows)
    write = write_csv if fmt == "csv" else write_parquet
    runs_path = write(runs, columns_of(runs, RUN_COLUMNS), out / f"runs.{fmt}")
    curves_path = write(curves, list(CURVE_COLUMNS), out / f"curves.{fmt}")
    return Exported(runs_path, curves_path, len(runs), len(curves))

