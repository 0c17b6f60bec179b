"""engram.reports.figures: drawing functions on tiny synthetic rows, and write_plots from a CSV alone."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from engram.errors import DataError
from engram.reports.figures import (plot_accuracy_matrix, plot_method_comparison, plot_task_curves,
                          safe_name, task_curves, write_plots)
from engram.results import ResultWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_rows(label: str, seed: int, acc, steps_per_task: int = 10, scenario: str = "class",
             complete: bool = True, tasks_trained: int | None = None) -> list[dict]:
    """Rows of one synthetic run on 2 tasks: baseline, a mid-task and an end-of-task eval.

    acc(task_trained, epoch, task_eval) gives the accuracy; epoch 1 is mid-task, 2 the end.
    `tasks_trained` (default 2) stops the run early, as a killed run would.
    """
    T = 2 if tasks_trained is None else tasks_trained
    n_tasks = 2
    common = dict(run_id=f"{label}-{scenario}-{seed}", name="t", seed=seed,
                  method=label.split("(")[0], label=label, params="{}", dataset="digits",
                  stream="split", scenario=scenario)
    rows = []

    def evals(trained: int, epoch: int, step: int) -> None:
        for j in range(1, n_tasks + 1):
            rows.append(dict(common, task_trained=trained, epoch=epoch, step=step, task_eval=j,
                             split="test", metric="accuracy", value=acc(trained, epoch, j)))
            rows.append(dict(common, task_trained=trained, epoch=epoch, step=step, task_eval=j,
                             split="test", metric="loss", value=1.0))

    evals(0, 0, 0)
    for i in range(1, T + 1):
        mid, end = (i - 1) * steps_per_task + steps_per_task // 2, i * steps_per_task
        rows.append(dict(common, task_trained=i, epoch=1, step=mid, task_eval="", split="train",
                         metric="train_loss", value=0.5))
        evals(i, 1, mid)
        rows.append(dict(common, task_trained=i, epoch=2, step=end, task_eval="", split="train",
                         metric="train_loss", value=0.4))
        evals(i, 2, end)
        rows.append(dict(common, task_trained=i, epoch=2, step=end, task_eval="", split="train",
                         metric="train_seconds", value=0.1))
    if complete:
        rows.append(dict(common, task_trained=T, epoch=2, step=T * steps_per_task, task_eval="",
                         split="", metric="run_complete", value=1))
    return rows


def as_strings(rows: list[dict]) -> list[dict[str, str]]:
    """What read_rows would return: every value a string."""
    return [{k: str(v) for k, v in r.items()} for r in rows]


def acc_for(seed: int):
    """A simple, seed-dependent accuracy: 0.1 * (task_trained + epoch + task_eval) + 0.05 * seed."""
    return lambda trained, epoch, j: round(0.1 * (trained + epoch + j) / 2 + 0.05 * seed, 4)


def write_csv(path, rows) -> None:
    with ResultWriter(path) as writer:
        writer.write(rows)


def test_import_does_not_import_matplotlib():
    code = "import sys, engram.reports.figures; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_heatmap_annotates_every_cell_with_two_decimals_on_a_fixed_scale():
    R = np.array([[0.9, 0.0, 0.123], [0.5, 0.876, 0.25], [0.333, 0.6, 1.0]])
    ax = plot_accuracy_matrix(R, Figure().add_subplot(), title="naive")
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(texts) == R.size
    for (i, j), text in texts.items():
        assert text.get_text() == f"{R[i, j]:.2f}"
    assert texts[(0, 1)].get_color() == "white" and texts[(2, 2)].get_color() == "black"
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert ax.get_title() == "naive"
    assert "task i" in ax.get_ylabel() and "task j" in ax.get_xlabel()


def test_heatmap_leaves_unmeasured_cells_blank():
    R = np.array([[0.5, np.nan], [np.nan, np.nan]])
    ax = plot_accuracy_matrix(R, Figure().add_subplot())
    assert [t.get_text() for t in ax.texts] == ["0.50"]


def test_task_curves_mean_and_se_over_two_seeds_match_a_hand_computation():
    rows = as_strings(run_rows("naive", 0, acc_for(0)) + run_rows("naive", 1, acc_for(1))
                      + run_rows("replay", 0, lambda *_: 0.99))
    curves = task_curves(rows, "naive")
    assert curves.n_seeds == 2 and sorted(curves.tasks) == [1, 2]
    assert curves.boundaries == {1: 10, 2: 20}
    for j, curve in curves.tasks.items():
        # baseline at 0, mid-task 1 at 5, end of task 1 at 10, mid-task 2 at 15, end at 20
        assert curve.steps.tolist() == [0, 5, 10, 15, 20]
        when = [(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)]
        for k, (trained, epoch) in enumerate(when):
            a, b = acc_for(0)(trained, epoch, j), acc_for(1)(trained, epoch, j)
            mean = (a + b) / 2
            sd = math.sqrt(((a - mean) ** 2 + (b - mean) ** 2) / 1)  # ddof = 1
            assert curve.mean[k] == pytest.approx(mean)
            assert curve.se[k] == pytest.approx(sd / math.sqrt(2))
            assert curve.n[k] == 2


def test_task_curves_of_an_unfinished_run_mark_only_tasks_that_ended():
    rows = run_rows("naive", 0, acc_for(0), complete=False, tasks_trained=1)
    rows = [r for r in rows if r["metric"] != "train_seconds"]  # fall back on later-task rows
    curves = task_curves(as_strings(rows), "naive")
    assert curves.boundaries == {} and math.isnan(curves.tasks[1].se[0])
    rows += run_rows("naive", 0, acc_for(0))[-12:-8]  # first rows of task 2 (train_loss, evals)
    assert task_curves(as_strings(rows), "naive").boundaries == {1: 10}


@pytest.mark.parametrize("seeds, bands", [([0], 0), ([0, 1], 2)])
def test_plot_task_curves_draws_one_line_per_task_and_bands_with_several_seeds(seeds, bands):
    rows = as_strings([r for s in seeds for r in run_rows("naive", s, acc_for(s))])
    ax = plot_task_curves(task_curves(rows, "naive"), Figure().add_subplot())
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["task 1", "task 2"]
    assert [line.get_xdata().tolist() for line in lines] == [[0, 5, 10, 15, 20]] * 2
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in dashed] == [10, 20]
    assert len(ax.collections) == bands
    assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1


def test_method_comparison_bar_heights_are_the_means_with_seed_counts():
    table = [
        {"label": "naive", "scenario": "class", "n_seeds": 3, "average_accuracy": (0.2, 0.01),
         "average_forgetting": (0.9, 0.02)},
        {"label": "ewc(strength=10)", "scenario": "class", "n_seeds": 1,
         "average_accuracy": (0.45, float("nan")), "average_forgetting": (-0.05, float("nan"))},
        {"label": "naive", "scenario": "task", "n_seeds": 2, "average_accuracy": (0.7, 0.05),
         "average_forgetting": (0.1, 0.01)},
    ]
    for metric in ("average_accuracy", "average_forgetting"):
        ax = plot_method_comparison(table, Figure().add_subplot(), metric)
        heights = [p.get_height() for p in ax.patches]
        assert heights == pytest.approx([e[metric][0] for e in table])
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["naive\n3 seeds", "ewc\n(strength=10)\n1 seed", "naive\n2 seeds"]
        assert metric.replace("_", " ") in ax.get_ylabel()
        (top,) = ax.child_axes  # two scenarios: grouped, each named on the top axis
        assert [t.get_text() for t in top.get_xticklabels()] == ["class-incremental",
                                                                  "task-incremental"]
        assert len(ax.containers) - len(ax.patches) == 2  # error bars only where SE is finite


def test_safe_name():
    assert safe_name("ewc(strength=10)") == "ewc_strength_10"
    assert safe_name("a/b c") == "a_b_c" and safe_name("(..)") == "method"


def test_write_plots_from_the_csv_alone(tmp_path):
    rows = []
    for label in ("naive", "ewc(strength=10)"):
        for seed in (0, 1):
            rows += run_rows(label, seed, acc_for(seed))
    rows += run_rows("replay", 0, acc_for(0), complete=False, tasks_trained=1)
    write_csv(tmp_path / "results.csv", rows)
    written = write_plots(tmp_path)
    names = sorted(p.name for p in written)
    assert names == sorted([
        "accuracy_matrix_naive.png", "task_accuracy_naive.png",
        "accuracy_matrix_ewc_strength_10.png", "task_accuracy_ewc_strength_10.png",
        "task_accuracy_replay.png",  # incomplete: curves, but no matrix
        "comparison.png"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names  # no temp files left
    for path in written:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 200_000


def test_write_plots_without_complete_runs_still_draws_curves(tmp_path):
    write_csv(tmp_path / "results.csv", run_rows("naive", 0, acc_for(0), complete=False,
                                                 tasks_trained=1))
    assert [p.name for p in write_plots(tmp_path)] == ["task_accuracy_naive.png"]


def test_missing_results_file_is_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "results.csv")):
        write_plots(tmp_path)


def test_results_without_accuracy_rows_are_refused_by_name(tmp_path):
    rows = [r for r in run_rows("naive", 0, acc_for(0)) if r["metric"] != "accuracy"]
    write_csv(tmp_path / "results.csv", rows)
    with pytest.raises(DataError, match=r"results\.csv has no accuracy rows"):
        write_plots(tmp_path)


@pytest.mark.parametrize("given, expected",
                         [(None, [10, 20]), ({2: 15}, [15]), ([4, 8, 12], [4, 8, 12])])
def test_plot_task_curves_takes_explicit_task_boundaries(given, expected):
    curves = task_curves(as_strings(run_rows("naive", 0, acc_for(0))), "naive")
    ax = plot_task_curves(curves, Figure().add_subplot(), task_boundaries=given)
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in dashed] == expected


def test_heatmap_colorbar_is_optional():
    fig = Figure()
    plot_accuracy_matrix(np.eye(2), fig.add_subplot(), colorbar=False)
    assert len(fig.axes) == 1
    fig = Figure()
    plot_accuracy_matrix(np.eye(2), fig.add_subplot())
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "accuracy"


def test_task_curves_match_seeds_by_schedule_point_when_their_steps_drift_apart():
    # Seed 1's tasks hold one batch more per epoch: same schedule, steps a little later.
    rows = as_strings(run_rows("naive", 0, acc_for(0), steps_per_task=10)
                      + run_rows("naive", 1, acc_for(1), steps_per_task=12))
    curves = task_curves(rows, "naive")
    curve = curves.tasks[1]
    assert curve.steps.tolist() == [0, 5.5, 11, 16.5, 22]  # mean of (0,0), (5,6), (10,12), ...
    assert curve.n.tolist() == [2] * 5
    a, b = acc_for(0)(1, 2, 1), acc_for(1)(1, 2, 1)  # end of task 1, evaluated on task 1
    assert curve.mean[2] == pytest.approx((a + b) / 2)
    assert curve.se[2] == pytest.approx(abs(a - b) / 2)  # sd of two values / sqrt(2)
    assert curves.boundaries == {1: 11, 2: 22}
