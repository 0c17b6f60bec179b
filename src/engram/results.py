"""The append-only result table: one tidy CSV row per measured number.

Rows are appended and flushed as they are measured, so a run killed at any moment keeps
every complete row it wrote. A row is identified by its key (run, when, what); on resume
the writer skips rows whose key is already in the file, so re-running the unfinished part
of a run adds no duplicates. A half-written last line (the process died mid-write) is cut
off before appending.

Columns (`COLUMNS`):
    run_id        hash of the config that determines the run's numbers (engram.experiments.harness.run_id)
    name          the experiment name from the config
    seed          random seed of the run
    method        method registry name; label: name plus non-default params, e.g. ewc(strength=10)
    params        the method's parameters as canonical JSON
    dataset, stream, scenario
    task_trained  tasks trained so far: 0 = before any training, i = during/after task i (1-based)
    epoch         epochs completed within task `task_trained`
    step          optimizer steps since the run started
    task_eval     1-based task evaluated ('' for rows about training)
    split         train, val or test
    metric        accuracy, loss, train_loss (the epoch's mean over mini-batches of the loss of
                  the task's own examples, before each update: replayed examples and
                  penalties not counted), train_seconds (wall time of one task's training),
                  extra_bytes (bytes the method keeps beyond the live model after the task:
                  anchors, importances, buffers, stored gradients), run_complete
    value         the number
"""

from __future__ import annotations

import csv
import functools
import io
import os
from pathlib import Path
from typing import Any, Callable, Iterable

COLUMNS = ["run_id", "name", "seed", "method", "label", "params", "dataset", "stream", "scenario",
           "task_trained", "epoch", "step", "task_eval", "split", "metric", "value"]
KEY = ("run_id", "task_trained", "epoch", "task_eval", "split", "metric")


def row_key(row: dict[str, Any], key: tuple[str, ...] = KEY) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in key)


def _repair_tail(path: Path) -> None:
    """Cut a half-written last line (no trailing newline) left by a killed process."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.seek(data.rfind(b"\n") + 1)
        f.truncate()


def _naming_the_file(method: Callable) -> Callable:
    """A failed write (a full disk: ENOSPC) names no file; add the writer's path, so that the
    message (engram.cli.main) says which file could not be written."""
    @functools.wraps(method)
    def wrapper(self: "ResultWriter", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OSError as err:
            if err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror, str(self.path)) from err
    return wrapper


class ResultWriter:
    """Append rows to `results.csv`, flushing each batch, skipping keys already present.

    `columns` and `key` default to the continual-learning table above; other tables (the
    importance profiler's) pass their own."""

    @_naming_the_file  # the header is the first write
    def __init__(self, path: str | Path, columns: list[str] = COLUMNS,
                 key: tuple[str, ...] = KEY) -> None:
        self.path = Path(path)
        self.columns, self.key = columns, key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys: set[tuple[str, ...]] = set()
        self.completed_runs: set[str] = set()
        if self.path.exists() and self.path.stat().st_size > 0:  # an empty file has no rows
            _repair_tail(self.path)
            for row in read_rows(self.path, columns, key):
                self.keys.add(row_key(row, key))
                if row.get("metric") == "run_complete":
                    self.completed_runs.add(row["run_id"])
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, lineterminator="\n")
        if new_file:
            self._writer.writeheader()
            self._file.flush()

    @_naming_the_file
    def write(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append the rows not already present; flush; return the rows written."""
        written = []
        for row in rows:
            key = row_key(row, self.key)
            if key in self.keys:
                continue
            self.keys.add(key)
            self._writer.writerow(row)
            written.append(row)
        self._file.flush()
        return written

    @_naming_the_file
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The numeric columns of engram's tables (a name means the same in every table), checked when
# a table is read so that summaries, plots and resume can convert them without a traceback.
NUMERIC_COLUMNS = {"seed": int, "task_trained": int, "epoch": int, "step": int, "task_eval": int,
                   "task": int, "n_classes": int, "value": float, "threshold": float,
                   "fraction_replaced": float, "train_loss": float, "val_loss": float,
                   "val_accuracy": float}
# Empty cells: task_eval in rows that evaluate no task (split train or ''), and the position
# columns (task, step) of a `run_complete` marker row, which is about no point in training.


def read_rows(path: str | Path, columns: list[str] = COLUMNS,
              key: tuple[str, ...] = KEY) -> list[dict[str, str]]:
    """All complete rows of a results CSV as dicts of strings (a torn last line is ignored).
    DataError, naming the file, line and column, when the header is not a table of `columns`
    (identified by `key`), the bytes are not UTF-8, a row has the wrong number of fields or
    a NUMERIC_COLUMNS entry is not a number of its kind."""
    from engram.errors import DataError

    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    text = _decode(path, data)
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is not None and reader.fieldnames[: len(key)] != columns[: len(key)] \
            and not set(key) <= set(reader.fieldnames):
        raise DataError(f"{path} is not an engram results file (columns: {reader.fieldnames})")
    numeric = [(c, NUMERIC_COLUMNS[c]) for c in reader.fieldnames or () if c in NUMERIC_COLUMNS]
    rows = []
    for row in reader:
        if None in row or None in row.values():  # more fields than the header, or fewer
            raise DataError(f"{path}, line {reader.line_num}: the row has "
                            f"{'more' if None in row else 'fewer'} fields than the header's "
                            f"{len(reader.fieldnames)}")
        for column, kind in numeric:
            value = row[column]
            if value == "" and (column == "task_eval" and row.get("split") not in ("val", "test")
                                or column != "value" and row.get("metric") == "run_complete"):
                continue
            try:
                kind(value)
            except ValueError:
                from engram.schema import short_repr
                raise DataError(f"{path}, line {reader.line_num}, column {column}: "
                                f"{short_repr(value)} is not "
                                f"{'an integer' if kind is int else 'a number'}") from None
        rows.append(row)
    return rows


def _decode(path: str | Path, data: bytes) -> str:
    """`data` as UTF-8 text; DataError naming the line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        from engram.errors import DataError

        line_start = data.rfind(b"\n", 0, err.start) + 1
        before = data[line_start:err.start].decode("utf-8", "replace")
        index = max(0, len(next(csv.reader([before]))) - 1)  # fields before it, quotes honoured
        header = next(csv.reader([data[:data.find(b"\n")].decode("utf-8", "replace")]))
        where = header[index] if line_start and index < len(header) else f"field {index + 1}"
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}, line {line}, column {where}: byte {data[err.start]:#04x} "
                        "is not UTF-8 text") from None
