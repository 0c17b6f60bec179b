"""From tidy rows to accuracy matrices and the comparison table.

Derived numbers are computed from `results.csv` after the fact, never stored, so a new
metric needs no rerun. R[i][j] (0-based) is the test accuracy on task j+1 at the end of
training task i+1: the last evaluation row with task_trained = i+1. The baseline b[j] is the
evaluation of the same-seed model before any training (task_trained = 0).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from engram.metrics import (average_accuracy, average_forgetting, backward_transfer,
                            forward_transfer, mean_and_standard_error)


@dataclass
class RunMatrix:
    label: str
    seed: int
    scenario: str
    R: np.ndarray          # (T, T)
    baseline: np.ndarray   # (T,)
    complete: bool


def accuracy_matrices(rows: list[dict[str, str]], split: str = "test") -> list[RunMatrix]:
    """One RunMatrix per run id that has at least the untrained evaluation."""
    by_run: dict[str, list[dict[str, str]]] = defaultdict(list)
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
        first = run_rows[0]
        complete = any(r["metric"] == "run_complete" for r in run_rows)
        out.append(RunMatrix(first["label"], int(first["seed"]), first["scenario"], R, baseline,
                             complete))
    return out


SUMMARY_METRICS = {
    "average_accuracy": lambda m: average_accuracy(m.R),
    "average_forgetting": lambda m: average_forgetting(m.R),
    "backward_transfer": lambda m: backward_transfer(m.R),
    "forward_transfer": lambda m: forward_transfer(m.R, m.baseline),
}


def default_split(rows: list[dict[str, str]]) -> str:
    """`test` when the run measured it, else `val` (a run with train.eval_splits: [val])."""
    return "test" if any(r["split"] == "test" for r in rows) else "val"


def summary_table(rows: list[dict[str, str]], split: str | None = None) -> list[dict[str, object]]:
    """Per (method label, scenario): mean and standard error over seeds of each metric.

    Only complete runs count. Each entry: {label, scenario, n_seeds, metric: (mean, se), ...}.
    `split` defaults to `default_split(rows)`.
    """
    split = split or default_split(rows)
    groups: dict[tuple[str, str], list[RunMatrix]] = defaultdict(list)
    for matrix in accuracy_matrices(rows, split):
        if matrix.complete:
            groups[(matrix.label, matrix.scenario)].append(matrix)
    table = []
    for (label, scenario), runs in groups.items():
        entry: dict[str, object] = {"label": label, "scenario": scenario, "n_seeds": len(runs)}
        for name, metric in SUMMARY_METRICS.items():
            entry[name] = mean_and_standard_error([metric(m) for m in runs])
        table.append(entry)
    return table


def format_table(table: list[dict[str, object]]) -> str:
    """A plain-text table: one line per method, mean ± standard error over seeds."""
    if not table:
        return "no complete runs yet"
    headers = ["method", "scenario", "seeds", "avg accuracy", "forgetting", "BWT", "FWT"]
    lines = []
    for entry in table:
        cells = [str(entry["label"]), str(entry["scenario"]), str(entry["n_seeds"])]
        for name in SUMMARY_METRICS:
            mean, se = entry[name]
            cells.append(f"{mean:.3f}" if np.isnan(se) else f"{mean:.3f} ± {se:.3f}")
        lines.append(cells)
    widths = [max(len(headers[i]), *(len(line[i]) for line in lines)) for i in range(len(headers))]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    legend = ("accuracy on all tasks after the last one; forgetting > 0 and BWT < 0 mean old "
              "tasks got worse; FWT vs the untrained model; ± = standard error over seeds")
    return "\n".join([render(headers), render(["-" * w for w in widths])]
                     + [render(line) for line in lines] + [legend])
