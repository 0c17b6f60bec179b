"""From tidy rows to the comparison tables, via each run's accuracy matrix.

Derived numbers are computed from `results.csv` after the fact, never stored, so a new
metric needs no rerun. The matrices are built by engram.results.accuracy_matrices (one
builder for these tables, the figures and engram.frames): R[i][j] (0-based) is the test accuracy on task j+1 at the end of
training task i+1: the last evaluation row with task_trained = i+1. The baseline b[j] is the
evaluation of the same-seed model before any training (task_trained = 0).

Two tables come out of the rows: :func:`summary_table` (one line per method and scenario,
the runner's end-of-run printout) and :func:`scenario_table` (methods x the three
scenarios, with what each method costs in time and memory).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np

from engram.errors import DataError
# The matrices are built where the rows are read (engram.results; engram.frames uses them too)
from engram.results import RunMatrix, accuracy_matrices, default_split
from engram.metrics import (average_accuracy, average_forgetting, backward_transfer,
                            forward_transfer)
from engram.stats import mean_se, t_quantile


SUMMARY_METRICS = {
    "average_accuracy": lambda m: average_accuracy(m.R),
    "average_forgetting": lambda m: average_forgetting(m.R),
    "backward_transfer": lambda m: backward_transfer(m.R),
    "forward_transfer": lambda m: forward_transfer(m.R, m.baseline),
}


def count_seeds(runs: Iterable[tuple[str, int | str]], what: str) -> int:
    """The number of distinct seeds among one group's runs, given as (run id, seed) pairs.

    A group (one method label, say) is meant to be one config run on several seeds, and the
    spread over seeds is what the tables show. Two run ids with the same seed are two
    configs that share the label: a folder holding runs of two learning rates, which the
    label does not show. Pooling them would count a seed twice and average two configs as
    if they were one, so this raises DataError naming `what`, the seed and the run ids.
    """
    by_seed: dict[str, set[str]] = defaultdict(set)
    for run_id, seed in runs:
        by_seed[str(seed)].add(str(run_id))
    for seed, ids in by_seed.items():
        if len(ids) > 1:
            raise DataError(
                f"{what}: seed {seed} has {len(ids)} runs ({', '.join(sorted(ids))}), runs of "
                "different configs under one label (e.g. two learning rates); a summary pools "
                "one config's seeds, so write each config to its own folder")
    return len(by_seed)


def _group_seeds(runs: list[RunMatrix], name: str, label: str, scenario: str) -> int:
    """:func:`count_seeds` of one group of complete runs (each RunMatrix is one run id)."""
    return count_seeds([(m.run_id, m.seed) for m in runs],
                       f"method {label!r} of experiment {name!r}, {scenario}-incremental")


def summary_table(rows: list[dict[str, str]], split: str | None = None) -> list[dict[str, object]]:
    """Per (experiment name, method label, scenario): mean and standard error over seeds of
    each metric (:func:`engram.stats.mean_se`; a seed lacking the number, like forgetting
    with one task, gives (nan, nan)).

    Only complete runs count, one per seed: the points of a sweep grid have their own names,
    so they are rows of their own, and runs of different configs under one name and label
    (which the rows cannot tell apart) raise DataError (see :func:`count_seeds`). Each
    entry: {name, label, scenario, n_seeds, metric: (mean, se), ...}. `split` defaults to
    `default_split(rows)`.
    """
    split = split or default_split(rows)
    groups: dict[tuple[str, str, str], list[RunMatrix]] = defaultdict(list)
    for matrix in accuracy_matrices(rows, split):
        if matrix.complete:
            groups[(matrix.name, matrix.label, matrix.scenario)].append(matrix)
    table = []
    for (name, label, scenario), runs in groups.items():
        entry: dict[str, object] = {"name": name, "label": label, "scenario": scenario,
                                    "n_seeds": _group_seeds(runs, name, label, scenario)}
        for metric_name, metric in SUMMARY_METRICS.items():
            entry[metric_name] = mean_se([metric(m) for m in runs])
        table.append(entry)
    return table


def spread_note(counts: Iterable[int], ci: bool, hint: str = "") -> str:
    """The line that says what a table's "±" (and brackets) are: "mean ± SE over 3 seeds
    (SE = sample sd / √n); 95% t-interval in brackets (mean ± t_{0.975,n-1}·SE)". Without
    `ci`, `hint` says how to get the interval."""
    counts = sorted(set(counts))
    if counts == [1]:
        return "one seed: means alone (SE and the 95% t-interval need 2 seeds or more)"
    over = (f"{counts[0]} seed{'s' if counts[0] != 1 else ''}" if len(counts) == 1
            else "the seeds counted in each row")
    note = f"mean ± SE over {over} (SE = sample sd / √n)"
    if ci:
        return note + "; 95% t-interval in brackets (mean ± t_{0.975,n-1}·SE)"
    return note + (f"; {hint} adds the 95% t-interval" if hint else "")


def format_table(table: list[dict[str, object]], ci: bool = False) -> str:
    """A plain-text table: one line per method, mean ± standard error over seeds, and with
    `ci` the 95% t-interval in brackets. Rows of other experiments than the main one (a
    sweep's grid points) are named ``name / label`` (see :func:`method_names`)."""
    if not table:
        return "no complete runs yet"
    headers = ["method", "scenario", "seeds", "avg accuracy", "forgetting", "BWT", "FWT"]
    lines = []
    for name, entry in zip(method_names(table), table):
        n = int(entry["n_seeds"])
        cells = [name, str(entry["scenario"]), str(n)]
        for metric in SUMMARY_METRICS:
            cells.append(format_stat(*entry[metric], n=n if ci else None))
        lines.append(cells)
    legend = ("accuracy on all tasks after the last one; forgetting > 0 and BWT < 0 mean old "
              "tasks got worse; FWT vs the untrained model")
    note = spread_note([int(e["n_seeds"]) for e in table], ci, "`engram summary RUN_DIR --ci`")
    return "\n".join(text_table(headers, lines) + [note, legend])


def text_table(headers: list[str], lines: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, a dashed rule under the header."""
    widths = [max(len(headers[i]), *(len(line[i]) for line in lines)) for i in range(len(headers))]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [render(headers), render(["-" * w for w in widths])] + [render(line) for line in lines]


# --------------------------------------------------------------------------- three scenarios

SCENARIO_ORDER = ("task", "domain", "class")  # columns in this order, any other after them
# What the scenario table reports per cell: three accuracy-matrix metrics and the costs.
SCENARIO_METRICS = {
    **{k: SUMMARY_METRICS[k] for k in ("average_accuracy", "average_forgetting",
                                       "backward_transfer")},
    "wall_seconds": lambda m: m.wall_seconds,
    "extra_bytes": lambda m: m.extra_bytes,
}


def scenario_key(scenario: str) -> tuple[int, str]:
    """Sort key of a scenario column: task, domain, class, then the others alphabetically."""
    known = scenario in SCENARIO_ORDER
    return (SCENARIO_ORDER.index(scenario) if known else len(SCENARIO_ORDER), scenario)


def scenario_table(rows: list[dict[str, str]], split: str | None = None) -> list[dict[str, object]]:
    """Methods x scenarios: mean and standard error over seeds of accuracy, forgetting, BWT
    and what the method cost.

    Only complete runs count. One entry per (experiment name, method label) that has a
    complete run, in the order the runs first appear in `rows`::

        {"name": str, "label": str,
         "cells": {scenario: {"n_seeds": n,
                              "average_accuracy": (mean, se), "average_forgetting": (mean, se),
                              "backward_transfer": (mean, se),
                              "wall_seconds": (mean, se), "extra_bytes": (mean, se)}}}

    `cells` holds only the scenarios the method completed, in :func:`scenario_key` order.
    Per run, wall_seconds = sum over tasks i of train_seconds(i) (training only, evaluation
    excluded) and extra_bytes = extra_bytes(T), what the method keeps beyond the live model
    after its last task. (mean, se) is :func:`engram.stats.mean_se` over the cell's seeds:
    (nan, nan) when a seed lacks the number (see :class:`RunMatrix`), se nan with one seed.
    n_seeds counts distinct seeds; runs of different configs under one name and label raise
    DataError (see :func:`count_seeds`). `split` defaults to `default_split(rows)`.
    """
    split = split or default_split(rows)
    # (name, label) -> scenario -> complete runs, both in first-seen order
    groups: dict[tuple[str, str], dict[str, list[RunMatrix]]] = \
        defaultdict(lambda: defaultdict(list))
    for matrix in accuracy_matrices(rows, split):
        if matrix.complete:
            groups[(matrix.name, matrix.label)][matrix.scenario].append(matrix)
    table: list[dict[str, object]] = []
    for (name, label), by_scenario in groups.items():
        cells = {}
        for scenario in sorted(by_scenario, key=scenario_key):
            runs = by_scenario[scenario]
            cells[scenario] = {"n_seeds": _group_seeds(runs, name, label, scenario), **{
                metric: mean_se([value(m) for m in runs])
                for metric, value in SCENARIO_METRICS.items()}}
        table.append({"name": name, "label": label, "cells": cells})
    return table


def scenario_columns(table: list[dict[str, object]]) -> list[str]:
    """The scenarios of a :func:`scenario_table`, in column order."""
    return sorted({s for entry in table for s in entry["cells"]}, key=scenario_key)


def method_names(table: list[dict[str, object]]) -> list[str]:
    """Row names: the label alone for the experiment with the most rows (the first such on a
    tie), ``name / label`` for rows of any other experiment (e.g. a baselines sweep joined to
    the table), with grid names' section prefixes dropped: ``capacity[hidden=[1024]] / naive``."""
    names = [str(entry.get("name", "")) for entry in table]  # no name: one experiment
    counts = Counter(names)
    main = max(counts, key=counts.get) if counts else None  # first-seen wins a tie

    def short(name: str) -> str:
        return re.sub(r"\b(?:data|stream|model|train)\.", "", name)

    return [str(e["label"]) if n == main else f"{short(n)} / {e['label']}"
            for n, e in zip(names, table)]


def byte_unit(n_bytes: float) -> tuple[float, str]:
    """(scale, unit) to show `n_bytes` in decimal units: B, kB, MB, GB, TB (1 kB = 1000 B)."""
    scale = 1.0
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n_bytes) < 1000 * scale:
            return scale, unit
        scale *= 1000
    return scale, "TB"


def format_stat(mean: float, se: float, scale: float = 1.0, unit: str = "",
                decimals: int = 3, n: int | None = None) -> str:
    """'0.812 ± 0.010', '3.1 ± 0.2 s'; no ± with one seed; 'n/a' when not measured. Given
    the seed count `n`, the 95% t-interval follows in brackets, mean ± t_{0.975,n-1}·SE:
    '0.812 ± 0.010 [0.769, 0.855]' (n = 3; none with one seed)."""
    if not np.isfinite(mean):
        return "n/a"
    text = f"{mean / scale:.{decimals}f}"
    if np.isfinite(se):
        text += f" ± {se / scale:.{decimals}f}"
    text = f"{text} {unit}" if unit else text
    if n is not None and np.isfinite(se) and n > 1:
        half = t_quantile(n) * se
        text += f" [{(mean - half) / scale:.{decimals}f}, {(mean + half) / scale:.{decimals}f}]"
    return text


def _format_seconds(mean: float, se: float, n: int | None = None) -> str:
    return format_stat(mean, se, unit="s", decimals=2 if abs(mean) < 1 else 1, n=n)


def format_bytes(mean: float, se: float = math.nan, n: int | None = None) -> str:
    """'0 B', '12.3 kB', '4.5 ± 0.1 MB' (decimal units). A zero SE is left out: every seed
    kept the same bytes, the usual case, since what a method keeps depends on its config.
    Given `n`, the 95% t-interval follows as in :func:`format_stat`."""
    scale, unit = byte_unit(mean if np.isfinite(mean) else 0.0)
    return format_stat(mean, se if se != 0 else math.nan, scale, unit,
                       decimals=0 if unit == "B" else 1, n=n)


# metric -> (block title, cell formatter), in the order the blocks are printed.
_SCENARIO_BLOCKS = {
    "average_accuracy": ("average accuracy", format_stat),
    "average_forgetting": ("average forgetting", format_stat),
    "backward_transfer": ("backward transfer", format_stat),
    "wall_seconds": ("wall time (training, summed over tasks)", _format_seconds),
    "extra_bytes": ("extra memory (kept beyond the model after the last task)", format_bytes),
}


def format_scenario_table(table: list[dict[str, object]], markdown: bool = False,
                          ci: bool = False) -> str:
    """The :func:`scenario_table` as text: one block per metric, methods x scenarios.

    The first block (average accuracy) carries the seed count: in its title when every cell
    has the same number of seeds, else as "(n=k)" in each cell. A cell reads "mean ± SE"
    ("mean" alone with one seed), with `ci` followed by the 95% t-interval "[low, high]",
    "n/a" when the number was not measured (or is undefined, like forgetting with a single
    task), and "–" when the method was not run in that scenario. `markdown` renders each
    block as a GitHub pipe table under a bold title.
    """
    if not table:
        return "no complete runs yet"
    scenarios = scenario_columns(table)
    names = method_names(table)
    counts = {cell["n_seeds"] for entry in table for cell in entry["cells"].values()}
    per_cell_n = len(counts) > 1
    headers = ["method"] + [f"{s}-incremental" for s in scenarios]
    blocks = []
    for k, (metric, (title, fmt)) in enumerate(_SCENARIO_BLOCKS.items()):
        if k == 0:
            n = max(counts)
            shown = "mean ± SE [95% t-interval]" if ci else "mean ± SE"
            title += (f" ({shown} over seeds, n per cell)" if per_cell_n else
                      f" ({shown} over {n} seed{'s' if n != 1 else ''})")
        lines = []
        for name, entry in zip(names, table):
            cells = [name]
            for scenario in scenarios:
                cell = entry["cells"].get(scenario)
                text = "–" if cell is None else \
                    fmt(*cell[metric], n=cell["n_seeds"] if ci else None)
                if cell is not None and k == 0 and per_cell_n:
                    text += f" (n={cell['n_seeds']})"
                cells.append(text)
            lines.append(cells)
        blocks.append(render_block(title, headers, lines, markdown))
    spread = ("± = standard error over seeds (sample sd / √n), [ ] = 95% t-interval "
              "(mean ± t_{0.975,n-1}·SE)" if ci else
              "± = standard error over seeds (sample sd / √n; --ci adds the 95% t-interval)")
    legend = ("accuracy on all tasks after the last one; forgetting > 0 and BWT < 0 mean old "
              f"tasks got worse; {spread}; kB = 1000 B; n/a = not measured; – = not run")
    return "\n\n".join(blocks + [legend])


def render_block(title: str, headers: list[str], lines: list[list[str]], markdown: bool) -> str:
    """One titled table: a GitHub pipe table under a bold title with `markdown`, else the
    title over columns padded to their widest cell."""
    if markdown:
        def row(cells: list[str]) -> str:  # escaped: a '|' in a label would split its cell
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        return "\n".join([f"**{title}**", "", row(headers), row(["---"] * len(headers))]
                         + [row(line) for line in lines])
    return "\n".join([title] + text_table(headers, lines))
