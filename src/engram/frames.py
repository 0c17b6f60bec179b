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

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from engram.errors import DataError, EngramError
from engram.results import Table, accuracy_matrices as run_matrices, default_split, read_table

if TYPE_CHECKING:  # annotations only: pandas is optional
    import numpy as np
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
    table, rows = read_table(path)
    return frame_of_rows(rows, table)


def frame_of_rows(rows: Sequence[dict[str, str]], table: Table) -> "pd.DataFrame":
    """read_rows' rows of `table` (dicts of strings, already checked) as a typed DataFrame."""
    import numpy as np
    import pandas as pd

    from engram.results import NUMERIC_COLUMNS

    columns = list(rows[0]) if rows else table.columns
    data: dict[str, Any] = {}
    for column in columns:
        cells = [row[column] for row in rows]
        kind = NUMERIC_COLUMNS.get(column)
        if kind is float:
            data[column] = np.array([float(c) if c != "" else np.nan for c in cells],
                                    dtype=np.float64)
        elif kind is int and (column in table.nullable or "" in cells):
            data[column] = pd.array([int(c) if c != "" else None for c in cells], dtype="Int64")
        elif kind is int:
            data[column] = np.array([int(c) for c in cells], dtype=np.int64)
        else:
            data[column] = pd.array(cells, dtype="string")
    return pd.DataFrame(data, columns=columns)


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
