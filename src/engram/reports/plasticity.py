"""Reports of `engram plasticity` results: the per-task curves, their figure and the summary.

Reads the rows engram.experiments.plasticity writes (PLASTICITY_COLUMNS): per method label and
seed, one value per task of each metric; curves and summaries are taken over seeds
(engram.stats.mean_se), a label with two runs on one seed is refused (DataError).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

PLOTTED = (("online_loss", "online loss per task (squared error; cross-entropy for classes)"),
           ("online_accuracy", "online accuracy per task"),
           ("dead_units", "fraction of dead units"),
           ("effective_rank", "effective rank of hidden features (mean over layers)"),
           ("weight_magnitude", "mean |w|"))


def _per_seed(rows: list[dict[str, str]], metric: str) -> dict[str, dict[int, dict[int, float]]]:
    """label -> seed -> task -> value of `metric`, labels in first-seen order. A label with
    two runs on one seed (two configs' runs in one folder, which the label does not tell
    apart) raises DataError (:func:`engram.reports.tables.count_seeds`) instead of counting it twice."""
    from engram.reports.tables import count_seeds

    per_label: dict[str, dict[int, dict[int, float]]] = {}
    runs: dict[str, dict[str, str]] = {}  # label -> run id -> seed
    for r in rows:
        if r["metric"] != metric or not r["task"]:
            continue
        per_label.setdefault(r["label"], {}).setdefault(int(r["seed"]), {})[int(r["task"])] = \
            float(r["value"])
        runs.setdefault(r["label"], {})[r["run_id"]] = r["seed"]
    for label, by_run in runs.items():
        count_seeds(by_run.items(), f"method {label!r}")
    return per_label


def metric_curves(rows: list[dict[str, str]], metric: str, bin_tasks: int = 1
                  ) -> dict[str, tuple]:
    """label -> (tasks (T,), mean over seeds (T,), standard error (T,), n seeds), for one
    metric (:func:`engram.stats.mean_se`: SE nan with one seed); only tasks every seed of
    the label has reached. With bin_tasks > 1 each seed's values are first averaged over
    bins of that many tasks (x = the bin's last task), as the paper bins the online error,
    and the mean and SE are taken over the seeds' bin values."""
    import numpy as np

    from engram.stats import mean_se

    curves = {}
    for label, by_seed in _per_seed(rows, metric).items():
        tasks = sorted(set.intersection(*(set(v) for v in by_seed.values())))
        values = np.array([[by_seed[s][t] for t in tasks] for s in sorted(by_seed)])  # (S, T)
        if bin_tasks > 1 and len(tasks) >= bin_tasks:
            n_bins = len(tasks) // bin_tasks
            values = values[:, :n_bins * bin_tasks].reshape(len(values), n_bins, bin_tasks)
            values = values.mean(-1)  # (S, bins)
            tasks = tasks[bin_tasks - 1:n_bins * bin_tasks:bin_tasks]
        mean, se = mean_se(values)
        curves[label] = (np.array(tasks), mean, se, len(values))
    return curves


def write_plasticity_plots(rows: list[dict[str, str]], out_dir: str | Path,
                           bin_tasks: int | None = None) -> Path:
    """One figure, `out_dir/plasticity.png`: a panel per recorded metric of `PLOTTED` against
    the task number, a line per method with a ±1 SE band over seeds; the online error and
    accuracy in bins of `bin_tasks` tasks (default: a twentieth of the tasks)."""
    from engram.reports.figures import new_figure, save_figure

    present = [(m, title) for m, title in PLOTTED if any(r["metric"] == m for r in rows)]
    n_tasks = max((int(r["task"]) for r in rows if r["task"]), default=1)
    bin_tasks = bin_tasks or max(1, n_tasks // 20)
    fig = new_figure(7.0, 2.6 * len(present))
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (metric, title) in zip(axes, present):
        binned = bin_tasks if metric.startswith("online") else 1
        for label, (tasks, mean, se, n) in metric_curves(rows, metric, binned).items():
            line, = ax.plot(tasks, mean, label=f"{label} ({n} seeds)", linewidth=1.2)
            ax.fill_between(tasks, mean - se, mean + se, color=line.get_color(), alpha=0.25,
                            linewidth=0)
        ax.set_title(title + (f", bins of {binned} tasks" if binned > 1 else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    axes[-1].set_xlabel("task (diagnostics at its start; online error over it)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out / "plasticity.png")


# ----------------------------------------------------------------------------- summary

SUMMARISED = ("online_loss", "online_accuracy", "dead_units", "effective_rank",
              "weight_magnitude")


def plasticity_summary(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per method label and metric of `SUMMARISED`: mean ± standard error over seeds
    (:func:`engram.stats.mean_se`) of each seed's mean over the early tasks (2 to 1 + T/5:
    the first, from-scratch task left out) and over the late tasks (the last T/5). One
    entry per (label, metric); n_seeds counts distinct seeds, and two runs of one label on
    one seed raise DataError (see :func:`_per_seed`). A seed with no task in a window gives
    that window nan."""
    from engram.stats import mean_se

    n_tasks = max((int(r["task"]) for r in rows if r["task"]), default=0)
    fifth = max(1, n_tasks // 5)
    windows = {"early": (2, 1 + fifth), "late": (n_tasks - fifth + 1, n_tasks)}
    table = []
    for metric in SUMMARISED:
        for label, per_seed in _per_seed(rows, metric).items():
            entry: dict[str, Any] = {"label": label, "metric": metric}
            for name, (lo, hi) in windows.items():
                means = []  # one per seed: its mean over the window's tasks
                for by_task in per_seed.values():
                    inside = [v for t, v in by_task.items() if lo <= t <= hi]
                    means.append(sum(inside) / len(inside) if inside else math.nan)
                entry[name] = mean_se(means)
                entry[f"{name}_tasks"] = (lo, hi)
            entry["n_seeds"] = len(per_seed)
            table.append(entry)
    return table


def format_plasticity_summary(table: list[dict[str, Any]]) -> str:
    """The summary as aligned text: one block per metric, a line per method, each window
    "mean ± SE [95% t-interval]" over the seeds (a mean alone with one seed)."""
    from engram.reports.tables import format_stat

    lines = []
    for metric in dict.fromkeys(e["metric"] for e in table):
        block = [e for e in table if e["metric"] == metric]
        (lo1, hi1), (lo2, hi2) = block[0]["early_tasks"], block[0]["late_tasks"]
        lines.append(f"{metric} (mean ± SE over seeds [95% t-interval]): "
                     f"tasks {lo1}-{hi1} -> tasks {lo2}-{hi2}")
        width = max(len(e["label"]) for e in block)
        cells = [[format_stat(*e[w], n=e["n_seeds"]) for w in ("early", "late")] for e in block]
        early = max(len(c[0]) for c in cells)
        for e, (a, b) in zip(block, cells):
            n = e["n_seeds"]
            lines.append(f"  {e['label']:<{width}}  {a:<{early}}  ->  {b}"
                         f"  ({n} seed{'s' if n != 1 else ''})")
        lines.append("")
    return "\n".join(lines)
