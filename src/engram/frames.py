"""Results you can query: any table engram writes as a typed pandas DataFrame.

    import engram
    frame = engram.load_results("runs/demo")       # a folder, a results.csv or a .parquet
    frame[frame.metric == "accuracy"].groupby("label").value.mean()
    matrices = engram.accuracy_matrices(frame)     # run id -> (T, T) accuracy matrix

Column types, the same for a table read from CSV or from the Parquet file `engram export
--parquet` writes (a frame from either compares equal):

* integer columns (engram.results.NUMERIC_COLUMNS: seed, task_trained, epoch, step, task_eval,
  task, n_classes): ``int64``; nullable ``Int64`` (pandas.NA in empty cells) for those some
  rows leave empty by design (engram.results.TABLES: task_eval of the continual table's
  training rows, task and step of a plasticity or window run's `run_complete` row), or
  that have an empty cell in the file;
* float columns (value, threshold, fraction_replaced, the profile's losses and accuracy):
  ``float64``;
* every other column (run_id, name, method, label, params, split, metric, ...): pandas'
  ``string`` dtype, holding the file's text unchanged ('' stays ''). Call
  ``.astype("category")`` on the columns you group by when a table is large.

pandas (and pyarrow for Parquet) are imported inside the functions: the `results` extra,
``pip install -e ".[results]"``; without it each function raises a one-line EngramError
naming it. The CSV is read by engram.results.read_rows, so a damaged file gives the same
one-line DataError as everywhere else.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engram.errors import DataError, EngramError
from engram.results import (NUMERIC_COLUMNS, Table, accuracy_matrices as run_matrices,
                            default_split, read_table, table_of)

if TYPE_CHECKING:  # annotations only: pandas is optional
    import pandas as pd

EXTRA = 'pip install -e ".[results]"'
CSV_NAME, PARQUET_NAME = "results.csv", "results.parquet"


def require(module: str, needed_for: str) -> Any:
    """Import an optional dependency of the `results` extra, or raise a one-line EngramError
    naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EngramError(f"{needed_for} needs {module}, which is not installed: "
                          f"{EXTRA} (or pip install pandas pyarrow)") from None


def results_file(source: str | Path) -> Path:
    """The results file `source` names: a results.csv or .parquet file as given, or a
    folder's results.csv (its results.parquet when it has no CSV). DataError when none."""
    path = Path(source)
    if path.is_dir():
        for name in (CSV_NAME, PARQUET_NAME):  # the CSV is the record; a Parquet may be older
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path / CSV_NAME} does not exist; point at a folder written by an "
                        "engram experiment command (run, demo, sweep, profile, plasticity, "
                        "window)")
    if not path.is_file():
        raise DataError(f"{path} does not exist; point at a results folder, a results.csv or "
                        "a results.parquet")
    return path


def load_results(source: str | Path) -> "pd.DataFrame":
    """The results table of `source` (a folder, a results.csv or a results.parquet) as a
    DataFrame with typed columns (see the module docstring), rows in file order. Works for
    every table engram writes; which one is told by the CSV's header (engram.results.TABLES).
    DataError, one line, for a missing or damaged file."""
    pd = require("pandas", "engram.load_results")
    path = results_file(source)
    if path.suffix == ".parquet":
        require("pyarrow", "reading Parquet")
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path} is not a readable Parquet file: "
                            f"{str(err).splitlines()[0]}") from None
    with open(path, "rb") as f:  # the header says which table; read_rows judges it
        header = next(csv.reader([f.readline().decode("utf-8", "replace").rstrip("\r\n")]), None)
    table = table_of(header)
    cells = cells_read_fast(path, table)
    if cells is None:  # something unusual: read the careful way, which names any damage
        table, rows = read_table(path)
        cells = {column: np.array([row[column] for row in rows], dtype=object)
                 for column in (list(rows[0]) if rows else table.columns)}
    return frame_of_cells(cells, table)


def cells_read_fast(path: Path, table: Table) -> dict[str, "np.ndarray"] | None:
    """Each column of the results CSV `path` as an array of its cells' text, read by
    pyarrow's CSV parser (some 10x faster than engram.results.read_rows on a large table),
    or None when pyarrow is missing or the file is anything but a clean `table`: a torn last
    line is cut as read_rows cuts it, and every cell read_rows would refuse (a wrong number of
    fields, bytes that are not UTF-8, an empty or non-numeric cell in a numeric column)
    makes this None, so that read_rows reads the file and names the damage."""
    try:
        import pyarrow as pa
        from pyarrow import csv as arrow_csv
    except ImportError:
        return None
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    try:
        arrow = arrow_csv.read_csv(
            io.BytesIO(data), read_options=arrow_csv.ReadOptions(use_threads=False),
            parse_options=arrow_csv.ParseOptions(newlines_in_values=True),
            convert_options=arrow_csv.ConvertOptions(
                column_types={column: pa.string() for column in table.columns},
                strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, ValueError):
        return None
    if arrow.column_names != table.columns:
        return None
    cells = {c: arrow.column(c).to_numpy(zero_copy_only=False) for c in table.columns}
    metric, split = cells.get("metric"), cells.get("split")
    for column in table.columns:
        kind = NUMERIC_COLUMNS.get(column)
        if kind is None:
            continue
        empty = cells[column] == ""
        # the empty cells read_rows allows (engram.results.read_rows): task_eval of a row
        # evaluating no task, any position column of a run_complete marker row
        allowed = np.zeros(len(empty), dtype=bool)
        if column == "task_eval" and split is not None:
            allowed |= ~np.isin(split, ["val", "test"])
        if column != "value" and metric is not None:
            allowed |= metric == "run_complete"
        if (empty & ~allowed).any():
            return None
        try:  # int()/float() per cell, exactly read_rows' test
            cells[column][~empty].astype(np.int64 if kind is int else np.float64)
        except (ValueError, OverflowError):
            return None
    return cells


def frame_of_cells(cells: dict[str, "np.ndarray"], table: Table) -> "pd.DataFrame":
    """Columns of cell texts (already checked: by read_rows or cells_read_fast) as a typed
    DataFrame, in the types of the module docstring."""
    import pandas as pd

    data: dict[str, Any] = {}
    for column, text in cells.items():
        kind = NUMERIC_COLUMNS.get(column)
        empty = text == ""
        if kind is float:
            values = np.full(len(text), np.nan)
            values[~empty] = text[~empty].astype(np.float64)
            data[column] = values
        elif kind is int and (column in table.nullable or empty.any()):
            values = np.zeros(len(text), dtype=np.int64)
            values[~empty] = text[~empty].astype(np.int64)
            data[column] = pd.arrays.IntegerArray(values, empty)
        elif kind is int:
            data[column] = text.astype(np.int64)
        else:
            data[column] = pd.array(text, dtype="string")
    return pd.DataFrame(data, columns=list(cells))


def accuracy_matrices(frame: "pd.DataFrame", split: str | None = None) -> dict[str, "np.ndarray"]:
    """Run id -> the run's accuracy matrix R, a (T, T) float array: R[i, j] is the accuracy
    on task j+1 after training task i+1 (nan where not measured: an unfinished run), from
    the last evaluation at the end of each task. Built by engram.results.accuracy_matrices,
    the builder behind `engram summary`, `table` and `plot`, from the frame's rows of a
    continual table (engram run, demo, sweep); `split` defaults to test when the frame
    holds test evaluations, else val. Runs in the order they first appear."""
    needed = {"run_id", "label", "seed", "scenario", "name", "task_trained", "task_eval",
              "step", "split", "metric", "value"}
    if missing := sorted(needed - set(frame.columns)):
        raise DataError(f"accuracy matrices need a continual results table (engram run, demo "
                        f"or sweep); this frame has no column {', '.join(missing)}")
    accuracy = frame[frame["metric"] == "accuracy"]  # all the builder needs for R
    rows = accuracy.to_dict("records")
    split = split or default_split(rows)
    return {m.run_id: m.R for m in run_matrices(rows, split)}


def export_parquet(sources: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write each source's table (see :func:`load_results`) to its folder's results.parquet;
    with `out`, all the rows to that one file (a folder: its results.parquet), which needs
    tables of one kind. Each file is written whole or not at all. Returns the paths."""
    pd = require("pandas", "engram export --parquet")
    require("pyarrow", "engram export --parquet")
    frames = [(results_file(source), load_results(source)) for source in sources]
    if out is None:
        return [write_parquet(frame, path.with_name(PARQUET_NAME)) for path, frame in frames]
    (first_path, first), *others = frames
    for path, frame in others:
        if list(frame.columns) != list(first.columns):
            raise DataError(f"{path} and {first_path} hold different tables (columns "
                            f"{list(frame.columns)} and {list(first.columns)}); export them "
                            "to files of their own")
    joined = pd.concat([frame for _, frame in frames], ignore_index=True) if others else first
    out = Path(out)
    return [write_parquet(joined, out / PARQUET_NAME if out.is_dir() else out)]


def write_parquet(frame: "pd.DataFrame", path: Path) -> Path:
    """`frame` to `path` via a temporary file, so a reader never sees half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
