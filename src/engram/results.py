"""The append-only result table: one tidy CSV row per measured number.

Rows are appended and flushed as they are measured, so a run killed at any moment keeps
every complete row it wrote. A row is identified by its key (run, when, what); on resume
the writer skips rows whose key is already in the file, so re-running the unfinished part
of a run adds no duplicates. A half-written last line (the process died mid-write) is cut
off before appending.

Columns (`COLUMNS`):
    run_id        hash of the config that determines the run's numbers (engram.config.run_id)
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
import io
import os
from pathlib import Path
from typing import Any, Iterable

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


class ResultWriter:
    """Append rows to `results.csv`, flushing each batch, skipping keys already present.

    `columns` and `key` default to the continual-learning table above; other tables (the
    importance profiler's) pass their own."""

    def __init__(self, path: str | Path, columns: list[str] = COLUMNS,
                 key: tuple[str, ...] = KEY) -> None:
        self.path = Path(path)
        self.columns, self.key = columns, key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys: set[tuple[str, ...]] = set()
        self.completed_runs: set[str] = set()
        if self.path.exists():
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

    def write(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append the rows not already present; flush; return how many were written."""
        written = 0
        for row in rows:
            key = row_key(row, self.key)
            if key in self.keys:
                continue
            self.keys.add(key)
            self._writer.writerow(row)
            written += 1
        self._file.flush()
        return written

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_rows(path: str | Path, columns: list[str] = COLUMNS,
              key: tuple[str, ...] = KEY) -> list[dict[str, str]]:
    """All complete rows of a results CSV as dicts of strings (a torn last line is ignored).
    DataError when the file's header is not a table of `columns` (identified by `key`)."""
    text = Path(path).read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is not None and reader.fieldnames[: len(key)] != columns[: len(key)] \
            and not set(key) <= set(reader.fieldnames):
        from engram.errors import DataError
        raise DataError(f"{path} is not an engram results file (columns: {reader.fieldnames})")
    return list(reader)
