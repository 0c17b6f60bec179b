"""Figures of a run folder, drawn from its `results.csv` alone.

Two layers:

* pure drawing functions, ``(data, ax) -> ax``, that touch no files and no global state:
  :func:`plot_accuracy_matrix`, :func:`plot_task_curves` (fed by :func:`task_curves`) and
  :func:`plot_method_comparison` (fed by :func:`engram.reports.tables.summary_table`) and
  :func:`plot_scenario_table` (fed by :func:`engram.reports.tables.scenario_table`);
  :func:`accuracy_matrix_figure` puts one matrix on a figure of its own size (the plots here,
  and the trackers' images: engram.reports.tracking);
* :func:`write_plots` and :func:`write_table_png`, which read ``RUN_DIR/results.csv`` and
  write ``RUN_DIR/plots/*.png``.

matplotlib is imported inside the functions, so ``import engram.reports.figures`` (and the CLI's
``--help``) stays cheap. Figures are built as ``matplotlib.figure.Figure`` with the Agg
canvas, never through pyplot: no display is needed, and no figure lingers in pyplot's
global registry of open figures.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engram.errors import DataError
from engram.stats import mean_se, t_quantile

if TYPE_CHECKING:  # for annotations only: importing matplotlib here would make the module heavy
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
METRIC_NAMES = {
    "average_accuracy": "average accuracy",
    "average_forgetting": "average forgetting",
    "backward_transfer": "backward transfer",
    "forward_transfer": "forward transfer",
    "wall_seconds": "wall time",
    "extra_bytes": "extra memory",
}
# A few words per metric saying which way is better, shown under the panel's title.
METRIC_HINTS = {
    "average_accuracy": "after the last task; higher is better",
    "average_forgetting": "> 0: old tasks got worse; lower is better",
    "backward_transfer": "< 0: old tasks got worse",
    "forward_transfer": "> 0: earlier tasks helped",
    "wall_seconds": "training, summed over tasks; lower is better",
    "extra_bytes": "kept beyond the model after the last task; lower is better",
}


# --------------------------------------------------------------------------- data


@dataclass
class TaskCurve:
    """Accuracy on one task over training, aggregated over the runs (seeds) of one label.

    Point k is one moment of the training schedule (tasks trained, epochs within the
    current task), in schedule order. ``steps[k]`` is the optimizer step of that moment,
    averaged over the runs that reached it (runs of one config whose tasks hold different
    numbers of batches reach it a few steps apart); ``mean[k]`` and ``se[k]`` are the mean
    and standard error (sample sd / sqrt(n)) of the accuracy over those ``n[k]`` runs;
    ``se[k]`` is nan when n[k] == 1.
    """
    steps: np.ndarray  # (K,) float
    mean: np.ndarray   # (K,) float
    se: np.ndarray     # (K,) float
    n: np.ndarray      # (K,) int


@dataclass
class TaskCurves:
    """What :func:`plot_task_curves` draws for one method label.

    ``tasks`` maps the 1-based evaluated task to its :class:`TaskCurve`; ``boundaries``
    maps the 1-based trained task to the optimizer step at which its training ended,
    averaged over runs (only tasks known to have ended); ``n_seeds`` counts the seeds (one
    run each) that contributed; ``scenario`` and ``name`` are the scenario and experiment
    name the rows were restricted to, if any.
    """
    label: str
    split: str
    n_seeds: int
    scenario: str | None = None
    name: str | None = None
    tasks: dict[int, TaskCurve] = field(default_factory=dict)
    boundaries: dict[int, float] = field(default_factory=dict)


def task_curves(rows: Sequence[dict[str, str]], label: str, split: str = "test",
                scenario: str | None = None, name: str | None = None) -> TaskCurves:
    """Accuracy-vs-step curves of every task for the method `label`, mean ± SE over seeds.

    Every accuracy row of the label on `split` is used: the untrained evaluation (step 0),
    the evaluations inside a task (``train.eval_every``) and those at the end of each task.
    Each run id counts as one sample; runs need not be complete, so a killed run still
    shows how far it got. `scenario`, when given, keeps only that scenario's rows (the same
    label may have been run in several), and `name` only that experiment's (a sweep's grid
    points share labels). Each seed must have one run: runs of two configs under one label
    raise DataError (:func:`engram.reports.tables.count_seeds`) rather than count a seed twice.

    Seeds are matched by the point of the schedule, (task_trained, epoch), not by the raw
    step: with a seed-dependent split the tasks of two seeds differ by a few batches, so
    their steps drift apart and a per-step mean would average nothing (each step would
    hold one seed, and the line would zig-zag between seeds). When all seeds share their
    steps, the two are the same.

    Task boundaries come from the ``train_seconds`` rows (written when a task's training
    ends); for a run without one, the last step of that task's rows is used when the run
    has started a later task, since only then is the task known to have ended.
    """
    from engram.reports.tables import count_seeds

    picked = [r for r in rows if r["label"] == label
              and (scenario is None or r["scenario"] == scenario)
              and (name is None or r["name"] == name)]
    # task_eval -> (task_trained, epoch) -> run_id -> (step, accuracy); (run, task_trained,
    # epoch, task_eval) is unique in a results file, so nothing is overwritten in practice.
    points: dict[int, dict[tuple[int, int], dict[str, tuple[int, float]]]] = \
        defaultdict(lambda: defaultdict(dict))
    runs: dict[str, str] = {}  # run id -> seed, of the runs with accuracy rows
    ended: dict[tuple[str, int], int] = {}       # (run, task) -> step, from train_seconds
    last_step: dict[tuple[str, int], int] = {}   # (run, task_trained) -> last step seen
    for r in picked:
        trained, step = int(r["task_trained"]), int(r["step"])
        key = (r["run_id"], trained)
        last_step[key] = max(step, last_step.get(key, step))
        if r["metric"] == "train_seconds":
            ended[key] = step
        elif r["metric"] == "accuracy" and r["split"] == split:
            runs[r["run_id"]] = r["seed"]
            when = (trained, int(r["epoch"]))
            points[int(r["task_eval"])][when][r["run_id"]] = (step, float(r["value"]))

    where = f"method {label!r}" + (f" of experiment {name!r}" if name is not None else "") \
        + (f", {scenario}-incremental" if scenario is not None else "")
    n_seeds = count_seeds(runs.items(), where)
    curves = TaskCurves(label=label, split=split, n_seeds=n_seeds, scenario=scenario, name=name)
    for task in sorted(points):
        order = sorted(points[task])  # schedule order: (task_trained, epoch)
        stats = [mean_se([v for _, v in points[task][w].values()]) for w in order]
        curves.tasks[task] = TaskCurve(
            steps=np.array([np.mean([s for s, _ in points[task][w].values()]) for w in order],
                           dtype=float),
            mean=np.array([m for m, _ in stats], dtype=float),
            se=np.array([e for _, e in stats], dtype=float),
            n=np.array([len(points[task][w]) for w in order], dtype=int))

    ends: dict[int, list[int]] = defaultdict(list)
    for (run, task), step in last_step.items():
        if (run, task) in ended:
            ends[task].append(ended[(run, task)])
        elif task >= 1 and (run, task + 1) in last_step:
            ends[task].append(step)
    curves.boundaries = {task: float(np.mean(ends[task])) for task in sorted(ends)}
    return curves


def seeds_label(n: int) -> str:
    """'1 seed', '3 seeds': how many seeds a figure's numbers come from, for its titles."""
    return f"{n} seed{'s' if n != 1 else ''}"


# --------------------------------------------------------------------------- drawing


def plot_accuracy_matrix(R: np.ndarray, ax: "Axes", title: str = "",
                         colorbar: bool = True) -> "Axes":
    """Heatmap of an accuracy matrix: row i = after training task i, column j = task j.

    The colour scale is fixed to 0..1 so that heatmaps of different methods compare at a
    glance; every cell carries its value with 2 decimals, in black or white, whichever
    reads better on the cell's colour. NaN cells (never measured) stay blank. `colorbar`
    adds a colour bar beside the axes (taking room from them in ``ax.figure``).
    """
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.size == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {R.shape}")
    T = R.shape[0]
    image = ax.imshow(np.ma.masked_invalid(R), cmap="viridis", vmin=0.0, vmax=1.0,
                      aspect="equal", interpolation="nearest")
    # Size the "0.00" labels to the cells: estimate a cell's side in points from the figure
    # size (the axes take roughly 3/4 of it) so big matrices in big figures stay legible.
    width, height = ax.figure.get_size_inches()
    cell = 72 * 0.75 * min(width, height) / T
    fontsize = float(np.clip(0.3 * cell, 5.0, 10.0))
    for i in range(T):
        for j in range(T):
            value = R[i, j]
            if not np.isfinite(value):
                continue
            r, g, b, _ = image.cmap(image.norm(value))
            luminance = 0.299 * r + 0.587 * g + 0.114 * b  # perceived brightness of the cell
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize,
                    color="black" if luminance > 0.5 else "white")
    ticks = np.arange(T)
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("accuracy on task j")
    ax.set_ylabel("after training task i")
    ax.xaxis.set_label_position("top")  # reads like a table: header on top
    ax.xaxis.tick_top()
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("accuracy")
    if title:
        ax.set_title(title, pad=12)
    return ax


def _task_colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


def plot_task_curves(curves: TaskCurves, ax: "Axes",
                     task_boundaries: Mapping[int, float] | Sequence[float] | None = None,
                     ) -> "Axes":
    """One line per evaluated task (accuracy vs optimizer step), ±1 SE band over seeds.

    Dashed vertical lines mark where each task's training ended; the top axis names the
    task trained in each span ("T i", in that task's colour), so one sees each curve rise
    while its own task trains and fall (or not) afterwards. `task_boundaries` overrides
    ``curves.boundaries``: a mapping {1-based task: step its training ended} or a sequence
    of end steps, task 1's first; ``None`` uses those :func:`task_curves` found.
    """
    if task_boundaries is None:
        boundaries = dict(curves.boundaries)
    elif isinstance(task_boundaries, Mapping):
        boundaries = {int(t): float(s) for t, s in sorted(task_boundaries.items())}
    else:
        boundaries = {i: float(s) for i, s in enumerate(task_boundaries, start=1)}
    tasks = sorted(curves.tasks)
    colours = dict(zip(tasks, _task_colours(len(tasks))))
    for task in tasks:
        c = curves.tasks[task]
        ax.plot(c.steps, c.mean, color=colours[task], marker="o", markersize=2.5,
                linewidth=1.4, label=f"task {task}")
        if np.any(c.n > 1):  # a band needs at least two seeds at some step
            ax.fill_between(c.steps, c.mean - c.se, c.mean + c.se, color=colours[task],
                            alpha=0.2, linewidth=0)
    start, centres, names = 0, [], []
    for task, end in boundaries.items():
        ax.axvline(end, color="0.45", linestyle="--", linewidth=0.8, label="_task end")
        if end > start:
            centres.append((start + end) / 2)
            names.append(task)
        start = end
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    if centres:
        # Span names on a top axis rather than inside the plot, where curves near 1.0 run.
        top = ax.secondary_xaxis("top")
        top.set_xticks(centres, [f"T{t}" for t in names], fontsize=8)
        top.tick_params(length=0)
        for text, task in zip(top.get_xticklabels(), names):
            text.set_color(colours.get(task, "0.3"))
    ax.set_xlabel("optimizer step (dashed: a task's training ends; Ti on top: training task i)",
                  fontsize=9)
    ax.set_ylabel(f"{curves.split} accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    if tasks:
        ax.legend(title="evaluated on", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize=8, title_fontsize=8, frameon=False)
    band = "mean ± 1 SE over" if curves.n_seeds > 1 else "from"
    name = curves.label if curves.name is None else f"{curves.name} / {curves.label}"
    if curves.scenario is not None:
        name += f", {curves.scenario}-incremental"
    ax.set_title(f"{name}: accuracy on each task during training "
                 f"({band} {seeds_label(curves.n_seeds)})",
                 fontsize=10)
    return ax


def plot_method_comparison(table: Sequence[dict[str, Any]], ax: "Axes",
                           metric: str = "average_accuracy") -> "Axes":
    """Bars of the mean of `metric` per method label, ±1 SE error bars, seed counts shown.

    `table` is :func:`engram.reports.tables.summary_table`'s output. With several scenarios the
    bars are grouped by scenario (a gap between groups, one colour per scenario, a
    name on the top axis); with one, each method gets its own colour and the scenario goes
    in the title.
    """
    from matplotlib import colormaps

    from engram.reports.tables import method_names

    name = METRIC_NAMES.get(metric, metric.replace("_", " "))
    names = dict(zip(map(id, table), method_names(table)))  # name / label for a sweep's points
    scenarios = list(dict.fromkeys(str(e["scenario"]) for e in table))
    grouped = len(scenarios) > 1
    x, ticks, heights, centres = 0.0, [], [], []
    for s_index, scenario in enumerate(scenarios):
        entries = [e for e in table if str(e["scenario"]) == scenario]
        first = x
        for m_index, entry in enumerate(entries):
            mean, se = entry[metric]
            colour = colormaps["tab10"]((s_index if grouped else m_index) % 10)
            ax.bar(x, mean, width=0.7, color=colour)
            if np.isfinite(se):
                ax.errorbar(x, mean, yerr=se, color="black", capsize=4, linewidth=1)
            heights.append((x, mean, se if np.isfinite(se) else 0.0))
            ticks.append((x, f"{_wrap(names[id(entry)])}\n{seeds_label(int(entry['n_seeds']))}"))
            x += 1.0
        centres.append((first + x - 1.0) / 2)
        x += 0.6  # gap between scenario groups
    ax.set_xticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=8)
    if grouped:
        # Group names on a top axis: outside the bars, and no legend box to place.
        top = ax.secondary_xaxis("top")
        top.set_xticks(centres, [f"{s}-incremental" for s in scenarios], fontsize=9)
        top.tick_params(length=0)
        for s_index, text in enumerate(top.get_xticklabels()):
            text.set_color(colormaps["tab10"](s_index % 10))
    # Values above the bars (or below, for negative ones) so no one has to read the axis.
    span = max([abs(m) + s for _, m, s in heights] + [1e-9])
    for xpos, mean, se in heights:
        offset = (se + 0.02 * span) * (1 if mean >= 0 else -1)
        ax.text(xpos, mean + offset, f"{mean:.2f}", ha="center",
                va="bottom" if mean >= 0 else "top", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    if metric == "average_accuracy":
        ax.set_ylim(0, 1.1)
    else:
        low = min([m - s for _, m, s in heights] + [0.0])
        high = max([m + s for _, m, s in heights] + [0.0])
        pad = 0.15 * max(high - low, 0.05)
        ax.set_ylim(low - (pad if low < 0 else 0), high + pad)
    ax.set_ylabel(f"{name} (mean ± 1 SE)")
    hint = METRIC_HINTS.get(metric, "")
    where = "" if grouped or not scenarios else f", {scenarios[0]}-incremental"
    ax.set_title(f"{name}{where}\n{hint}" if hint else f"{name}{where}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return ax


def _scenario_colour(scenario: str, scenarios: Sequence[str]):
    """tab10 colour of a scenario: task, domain, class always get the first three, so a
    scenario keeps its colour from panel to panel and figure to figure; others follow."""
    from matplotlib import colormaps

    from engram.reports.tables import SCENARIO_ORDER

    others = [s for s in scenarios if s not in SCENARIO_ORDER]
    index = SCENARIO_ORDER.index(scenario) if scenario in SCENARIO_ORDER \
        else len(SCENARIO_ORDER) + others.index(scenario)
    return colormaps["tab10"](index % 10)


def plot_scenario_table(table: Sequence[dict[str, Any]], ax: "Axes",
                        metric: str = "average_accuracy", ci: bool = False) -> "Axes":
    """Grouped bars of `metric`: one group per method, one bar per scenario, ±1 SE error bars
    (with `ci`, the 95% t-interval, mean ± t_{0.975,n-1}·SE); the y label says which.

    `table` is :func:`engram.reports.tables.scenario_table`'s output; bar height = the cell's mean,
    error bar = its standard error (none with one seed). A method not run in a scenario, or
    a number not measured (nan), leaves a gap. ``extra_bytes`` is drawn in the decimal unit
    (B, kB, MB, GB) of its largest bar, each bar labelled with its own size, since memory
    spans orders of magnitude and a small bar (or a 0 B one) would not read off the axis;
    ``wall_seconds`` is in seconds.
    """
    from engram.reports.tables import byte_unit, format_bytes, method_names, scenario_columns

    scenarios = scenario_columns(table)
    values = [c[metric] for e in table for c in e["cells"].values() if np.isfinite(c[metric][0])]
    scale, unit = 1.0, {"wall_seconds": "s"}.get(metric, "")
    if metric == "extra_bytes":
        scale, unit = byte_unit(max([abs(m) for m, _ in values] + [0.0]))
    # Memory spanning orders of magnitude (a few bytes to a basis of gradients) reads on a
    # log axis; 0 B bars are then drawn as nothing, their labels sitting on the axis floor.
    positive = [m for m, _ in values if m > 0]
    log_floor = None
    if metric == "extra_bytes" and positive and max(positive) > 1000 * min(positive):
        log_floor = min(positive) / scale / 3
    width = 0.8 / max(len(scenarios), 1)
    for k, scenario in enumerate(scenarios):
        offset = (k - (len(scenarios) - 1) / 2) * width  # centre the group on the tick
        bars = [(i + offset, *e["cells"][scenario][metric], e["cells"][scenario]["n_seeds"])
                for i, e in enumerate(table)
                if scenario in e["cells"] and np.isfinite(e["cells"][scenario][metric][0])]
        if not bars:
            continue
        x, mean, se, n = (np.array(v, dtype=float) for v in zip(*bars))
        if ci:  # the half-width of the 95% t-interval, in place of the SE
            se = se * np.array([t_quantile(int(k)) for k in n])
        ax.bar(x, mean / scale, width=0.9 * width, color=_scenario_colour(scenario, scenarios),
               label=f"{scenario}-incremental")
        has_se = np.isfinite(se) & (se > 0)  # a zero-length bar would only draw its caps
        if metric == "extra_bytes":
            for xpos, m, top in zip(x, mean, np.where(has_se, mean + se, mean)):
                y = top / scale if log_floor is None else max(top / scale, log_floor)
                ax.annotate(format_bytes(m), (xpos, y), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom",
                            rotation=90, fontsize=7)
            ax.margins(y=0.25)  # room for the labels above the tallest bar
        if has_se.any():
            ax.errorbar(x[has_se], mean[has_se] / scale, yerr=se[has_se] / scale, fmt="none",
                        ecolor="black", capsize=3, linewidth=1)
    if len(table) > ROTATE_LABELS_ABOVE:  # many methods: slanted one-line labels stay apart
        ax.set_xticks(range(len(table)), method_names(table), fontsize=8, rotation=55,
                      ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(len(table)), [_wrap(n) for n in method_names(table)], fontsize=8)
    if log_floor is not None:
        ax.set_yscale("log")
        ax.set_ylim(bottom=log_floor, top=max(positive) / scale * 3000)  # room for the labels
    ax.axhline(0, color="black", linewidth=0.6)
    if metric == "average_accuracy":
        ax.set_ylim(0, 1.05)
    name = METRIC_NAMES.get(metric, metric.replace("_", " "))
    spread = "mean, 95% t-interval" if ci else "mean ± 1 SE"
    ax.set_ylabel(f"{name}{f' ({unit})' if unit else ''}, {spread}")
    counts = sorted({int(c["n_seeds"]) for e in table for c in e["cells"].values()})
    seeds = seeds_label(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]} seeds"
    hint = METRIC_HINTS.get(metric, "")
    ax.set_title(f"{name} ({seeds})\n{hint}" if hint else f"{name} ({seeds})", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    if scenarios:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return ax


ROTATE_LABELS_ABOVE = 12  # methods in a scenario-table panel beyond which tick labels slant


def _wrap(label: str) -> str:
    """Break a long label like ``ewc(strength=10,gamma=0.9)`` into short lines for a tick."""
    if len(label) <= 12:
        return label
    return label.replace("(", "\n(", 1).replace(",", ",\n")


# --------------------------------------------------------------------------- files


def new_figure(width: float, height: float) -> "Figure":
    """A matplotlib Figure of `width` x `height` inches on its own Agg canvas (no pyplot:
    no global figure registry, no GUI backend), constrained layout; save it with
    :func:`save_figure`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def accuracy_matrix_figure(R: np.ndarray, title: str) -> "Figure":
    """A figure of one accuracy matrix (:func:`plot_accuracy_matrix`), sized to its tasks: the
    run folder's ``accuracy_matrix_<label>.png`` and a tracker's image of one run."""
    T = np.asarray(R).shape[0]
    fig = new_figure(max(4.2, 0.55 * T + 2.4), max(3.6, 0.55 * T + 1.6))
    plot_accuracy_matrix(R, fig.add_subplot(), title=title)
    return fig


def figure_pixels(fig: "Figure") -> np.ndarray:
    """The figure drawn on its Agg canvas, as an (height, width, 3) uint8 RGB array (what an
    image logger such as TensorBoard's takes); the figure is cleared afterwards."""
    fig.canvas.draw()
    pixels = np.array(fig.canvas.buffer_rgba())[..., :3]
    fig.clear()
    return pixels


def save_figure(fig: "Figure", path: Path) -> Path:
    """Write a PNG atomically (a killed process leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()  # free the artists now; nothing else references the figure
    return path


def safe_name(label: str) -> str:
    """A file-name-safe form of a method label: ``ewc(strength=10)`` -> ``ewc_strength_10``."""
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("._-")
    return name[:80] or "method"


def _pick_split(rows: Sequence[dict[str, str]]) -> str | None:
    """test if the file has test accuracies, else val, else whatever split it has."""
    splits = {r["split"] for r in rows if r["metric"] == "accuracy"}
    for split in ("test", "val"):
        if split in splits:
            return split
    return min(splits) if splits else None


def write_plots(run_dir: str | Path, more_dirs: Sequence[str | Path] = (),
                out: str | Path | None = None) -> list[Path]:
    """Draw a run folder's figures into ``run_dir/plots/`` (or `out`) from its ``results.csv``
    alone; the rows of each folder in `more_dirs` join them, as in `engram table`
    (engram.results.read_folders), and their figures go to the same place.

    Writes, for every method label (and scenario, when one label ran in several, and
    experiment name, when several experiments, e.g. a sweep's grid points, share it):
    ``accuracy_matrix_<label>.png`` (mean accuracy matrix over the label's complete runs;
    left out when none is complete yet) and ``task_accuracy_<label>.png`` (accuracy on each
    task over training, every run). Then ``comparison.png``: average accuracy and average
    forgetting per label, mean ± SE over complete runs (left out when none is complete).
    Uses the test split, or val when the runs evaluated no test split. Returns the paths
    written. Raises DataError when a results.csv is missing or none holds accuracy rows.
    """
    from engram.results import accuracy_matrices, read_folders
    from engram.reports.tables import count_seeds, summary_table

    run_dir = Path(run_dir)
    rows = read_folders([run_dir, *more_dirs])
    split = _pick_split(rows)
    if split is None:
        where = " and ".join(str(Path(d) / "results.csv") for d in [run_dir, *more_dirs])
        raise DataError(f"{where} {'has' if not more_dirs else 'have'} no accuracy rows to "
                        "plot; a run writes its first ones when it starts, so let `engram "
                        "run` get past its start")
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    # Groups in first-appearance order (the config's method order).
    groups = list(dict.fromkeys((r["name"], r["label"], r["scenario"]) for r in rows
                                if r["metric"] == "accuracy" and r["split"] == split))
    scenarios_of, names_of = defaultdict(set), defaultdict(set)  # label -> its scenarios, names
    for name, label, scenario in groups:
        scenarios_of[label].add(scenario)
        names_of[label].add(name)
    used: set[str] = set()
    matrices = defaultdict(list)
    for m in accuracy_matrices(rows, split):
        if m.complete:
            matrices[(m.name, m.label, m.scenario)].append(m)

    for name, label, scenario in groups:
        several_names = len(names_of[label]) > 1
        stem = label if len(scenarios_of[label]) == 1 else f"{label}_{scenario}"
        stem = safe_name(f"{name}_{stem}" if several_names else stem)
        base, k = stem, 2
        while stem in used:  # two labels that sanitise alike must not overwrite each other
            stem, k = f"{base}_{k}", k + 1
        used.add(stem)
        where = f", {scenario}-incremental"
        shown = f"{name} / {label}" if several_names else label

        runs = matrices.get((name, label, scenario), [])
        if runs:
            # Runs of one config share T; should a hand-merged file mix sizes, use the
            # most common size rather than fail after a long run.
            shape = Counter(m.R.shape for m in runs).most_common(1)[0][0]
            runs = [m for m in runs if m.R.shape == shape]
            n_seeds = count_seeds([(m.run_id, m.seed) for m in runs],
                                  f"method {label!r} of experiment {name!r}{where}")
            Rs = [m.R for m in runs]
            with np.errstate(all="ignore"):
                mean_R = np.nanmean(np.stack(Rs), axis=0) if len(Rs) > 1 else Rs[0]
            fig = accuracy_matrix_figure(mean_R, f"{shown}: {split} accuracy{where}\n"
                                                 f"mean of {seeds_label(n_seeds)}")
            written.append(save_figure(fig, out / f"accuracy_matrix_{stem}.png"))

        curves = task_curves(rows, label, split, scenario=scenario,
                             name=name if several_names else None)
        fig = new_figure(7.5, 4.0)
        plot_task_curves(curves, fig.add_subplot())
        written.append(save_figure(fig, out / f"task_accuracy_{stem}.png"))

    table = summary_table(rows, split)
    if table:
        # Wide enough that the longest wrapped tick label (8 pt, ~0.065 in a character)
        # fits under its bar; two panels side by side.
        longest = max(len(line) for e in table for line in _wrap(str(e["label"])).split("\n"))
        per_bar = max(0.65, 0.065 * longest + 0.1)
        n_groups = len({e["scenario"] for e in table})
        fig = new_figure(max(7.0, 2 * per_bar * (len(table) + 0.6 * (n_groups - 1)) + 2.2), 4.2)
        left, right = fig.subplots(1, 2)
        plot_method_comparison(table, left, "average_accuracy")
        plot_method_comparison(table, right, "average_forgetting")
        written.append(save_figure(fig, out / "comparison.png"))
    return written


def write_table_png(run_dir: str | Path, split: str | None = None,
                    more_dirs: Sequence[str | Path] = (), ci: bool = False) -> Path:
    """Draw the three-scenario table of a run folder into ``run_dir/plots/scenario_table.png``.

    Four panels of :func:`plot_scenario_table` over the complete runs of
    ``run_dir/results.csv`` (and of each folder in `more_dirs`, drawn in the same table):
    average accuracy, average forgetting, wall time and extra memory, on `split` (default:
    test when measured, else val), error bars ±1 SE or with `ci` the 95% t-interval. Returns
    the path. Raises DataError when a results.csv is missing or there is no complete run.
    """
    from engram.results import read_folders
    from engram.reports.tables import method_names, scenario_columns, scenario_table

    run_dir = Path(run_dir)
    rows = read_folders([run_dir, *more_dirs])
    table = scenario_table(rows, split)
    if not table:
        raise DataError(f"{run_dir / 'results.csv'} has no complete runs yet; the scenario table averages "
                        "finished runs only, so let `engram run` finish at least one")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    # Panels stacked, each wide enough that a method's group of bars or its wrapped label
    # (8 pt, ~0.065 in a character) fits, capped so the figure stays readable on a page.
    if len(table) > ROTATE_LABELS_ABOVE:  # slanted labels: the width needs only the bars
        per_method = 0.25 * len(scenario_columns(table)) + 0.2
    else:
        longest = max(len(line) for n in method_names(table) for line in _wrap(n).split("\n"))
        per_method = max(0.3 * len(scenario_columns(table)) + 0.3, 0.065 * longest + 0.2)
    metrics = ("average_accuracy", "average_forgetting", "wall_seconds", "extra_bytes")
    slanted = len(table) > ROTATE_LABELS_ABOVE
    longest = max(len(n) for n in method_names(table))
    label_room = 0.06 * longest if slanted else 0.0  # inches under the bottom panel
    fig = new_figure(min(max(9.0, per_method * len(table) + 2.5), 18.0),
                      3.2 * len(metrics) + label_room)
    axes = fig.subplots(len(metrics), 1, sharex=True)
    for ax, metric in zip(axes, metrics):
        plot_scenario_table(table, ax, metric, ci=ci)
    for ax in axes[:-1]:  # one set of method names, under the bottom panel
        ax.tick_params(labelbottom=False)
    return save_figure(fig, out / ("scenario_table.png" if split in (None, "test")
                             else f"scenario_table_{split}.png"))
