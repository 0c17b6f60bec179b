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

The profile, plasticity and window experiments write tables of their own (`TABLES`, each
with its columns and key); `read_table` reads any of them, telling which by the header.
`accuracy_matrices` builds each continual run's accuracy matrix from the rows: the one
builder behind the summary tables, the plots and engram.frames.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:  # numpy is imported where the matrices are built
    import numpy as np

COLUMNS = ["run_id", "name", "seed", "method", "label", "params", "dataset", "stream", "scenario",
           "task_trained", "epoch", "step", "task_eval", "split", "metric", "value"]
"""The continual results table's columns, in file order (see the module docstring)."""
KEY = ("run_id", "task_trained", "epoch", "task_eval", "split", "metric")
"""The columns that identify a row: a resumed run skips rows whose key is already written."""
# The tables of the other experiments (engram.experiments.profile, plasticity, window), here so
# that a reader (engram.frames) knows every table engram writes without importing them.
PROFILE_COLUMNS = ["profile_id", "name", "seed", "epoch", "measure", "aggregation", "reducer",
                   "scope", "direction", "threshold", "fraction_replaced", "train_loss",
                   "val_loss", "val_accuracy", "n_classes"]
PROFILE_KEY = ("profile_id", "seed", "epoch", "measure", "aggregation", "reducer", "scope",
               "direction", "threshold")
PLASTICITY_COLUMNS = ["run_id", "name", "seed", "method", "label", "problem", "task", "step",
                      "metric", "value"]
PLASTICITY_KEY = ("run_id", "task", "metric")
WINDOW_COLUMNS = ["run_id", "variant", "seed", "step", "metric", "value"]
WINDOW_KEY = ("run_id", "step", "metric")


@dataclass(frozen=True)
class Table:
    """One kind of results table: its columns in file order, the key that identifies a row,
    and its integer columns that some rows leave empty (see NUMERIC_COLUMNS below)."""
    kind: str
    columns: list[str]
    key: tuple[str, ...]
    nullable: frozenset[str] = frozenset()


# Every table engram writes; `engram run`, `demo` and `sweep` write the continual one.
TABLES = {table.kind: table for table in (
    Table("continual", COLUMNS, KEY, frozenset({"task_eval"})),
    Table("profile", PROFILE_COLUMNS, PROFILE_KEY),
    Table("plasticity", PLASTICITY_COLUMNS, PLASTICITY_KEY, frozenset({"task"})),
    Table("window", WINDOW_COLUMNS, WINDOW_KEY, frozenset({"step"})),
)}


def table_of(header: list[str] | None) -> Table:
    """The table whose columns are `header` (a results file's first line); the continual one
    when none is, so that read_rows judges the header (and names it when it is no table)."""
    for table in TABLES.values():
        if header == table.columns:
            return table
    return TABLES["continual"]


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


def read_table(path: str | Path) -> tuple[Table, list[dict[str, str]]]:
    """The kind of table `path` holds (by its header, :func:`table_of`) and its rows
    (:func:`read_rows` against that table: the same DataError for a damaged file)."""
    with open(path, "rb") as f:
        first_line = f.readline().decode("utf-8", "replace").rstrip("\r\n")
    table = table_of(next(csv.reader([first_line]), None) if first_line else None)
    return table, read_rows(path, table.columns, table.key)


def read_folders(folders: Sequence[str | Path]) -> list[dict[str, str]]:
    """The rows of each folder's results.csv, in order, as one list: how `engram table`,
    `summary` and `plot` join several folders (their tables then name the rows of any
    experiment but the main one 'experiment / method', engram.reports.tables.method_names).
    DataError naming a folder that holds no results.csv."""
    from engram.errors import DataError

    rows: list[dict[str, str]] = []
    for folder in folders:
        path = Path(folder) / "results.csv"
        if not path.is_file():
            raise DataError(f"{path} does not exist; point at a folder written by `engram run` "
                            "or `engram sweep`")
        rows += read_rows(path)
    return rows


# --------------------------------------------------------------------------- accuracy matrices


@dataclass
class RunMatrix:
    """One run's accuracy matrix, plus what its training cost.

    R[i][j] (0-based) is the accuracy on task j+1 at the end of training task i+1: the last
    evaluation row with task_trained = i+1 (nan until measured). The baseline b[j] is the
    evaluation of the same-seed model before any training (task_trained = 0).
    ``wall_seconds`` is the sum of the run's ``train_seconds`` rows over tasks 1..T (nan
    unless every task has one: a file written before they existed, or an unfinished run);
    ``extra_bytes`` is the ``extra_bytes`` row of the last task that has one (nan if none).
    """
    label: str
    seed: int
    scenario: str
    R: "np.ndarray"          # (T, T)
    baseline: "np.ndarray"   # (T,)
    complete: bool
    name: str = ""
    wall_seconds: float = math.nan
    extra_bytes: float = math.nan
    run_id: str = ""


def accuracy_matrices(rows: Sequence[dict[str, Any]], split: str = "test") -> list[RunMatrix]:
    """One RunMatrix per run id that has at least the untrained evaluation, in the order the
    runs first appear in `rows` (continual rows: read_rows' strings, or typed values such as
    a DataFrame's records, engram.frames.accuracy_matrices)."""
    import numpy as np

    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_run[row["run_id"]].append(row)
    out = []
    for run_rows in by_run.values():
        accuracy = [r for r in run_rows if r["metric"] == "accuracy" and r["split"] == split]
        if not accuracy:
            continue
        n_tasks = max(int(r["task_eval"]) for r in accuracy)
        R = np.full((n_tasks, n_tasks), np.nan)
        baseline = np.full(n_tasks, np.nan)
        last_step: dict[tuple[int, int], int] = {}
        for r in accuracy:
            trained, evaluated, step = int(r["task_trained"]), int(r["task_eval"]) - 1, int(r["step"])
            if trained == 0:
                baseline[evaluated] = float(r["value"])
            elif step >= last_step.get((trained, evaluated), -1):
                last_step[(trained, evaluated)] = step
                R[trained - 1, evaluated] = float(r["value"])
        # task_trained -> value; a task's row is written once, when its training ends.
        seconds = {int(r["task_trained"]): float(r["value"])
                   for r in run_rows if r["metric"] == "train_seconds"}
        memory = {int(r["task_trained"]): float(r["value"])
                  for r in run_rows if r["metric"] == "extra_bytes"}
        tasks = range(1, n_tasks + 1)
        first = run_rows[0]
        complete = any(r["metric"] == "run_complete" for r in run_rows)
        out.append(RunMatrix(
            first["label"], int(first["seed"]), first["scenario"], R, baseline, complete,
            name=first["name"],
            wall_seconds=sum(seconds[t] for t in tasks) if all(t in seconds for t in tasks)
            else math.nan,
            extra_bytes=memory[max(memory)] if memory else math.nan, run_id=first["run_id"]))
    return out


def default_split(rows: Iterable[dict[str, Any]]) -> str:
    """`test` when the run measured it, else `val` (a run with train.eval_splits: [val])."""
    return "test" if any(r["split"] == "test" for r in rows) else "val"


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
