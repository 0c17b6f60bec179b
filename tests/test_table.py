"""The three-scenario table: numbers by hand from synthetic rows, text, markdown and PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from engram.errors import DataError
from engram.reports.figures import plot_scenario_table, write_table_png
from engram.results import ResultWriter
from engram.reports.tables import (byte_unit, format_bytes, format_scenario_table, method_names,
                            scenario_columns, scenario_table)
from tests.conftest import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
R0 = [[0.9, 0.1], [0.3, 0.8]]  # final average 0.55, forgetting 0.6, BWT -0.6
R1 = [[0.8, 0.2], [0.5, 0.7]]  # final average 0.60, forgetting 0.3, BWT -0.3


def run_rows(R, seed: int, scenario: str = "class", label: str = "naive", name: str = "exp",
             train_seconds=(1.0, 2.0), extra_bytes=(0, 0), complete: bool = True
             ) -> list[dict[str, str]]:
    """Rows of one run as read_rows returns them: R[i][j] = accuracy on task j+1 after task
    i+1, one train_seconds and extra_bytes row per task (None leaves them out, as in files
    written before they existed), and run_complete when `complete`."""
    T = len(R)
    common = dict(run_id=f"{name}-{label}-{scenario}-{seed}", name=name, seed=seed,
                  method=label.split("(")[0], label=label, params="{}", dataset="digits",
                  stream="split", scenario=scenario, epoch=1)
    rows = [dict(common, task_trained=0, step=0, task_eval=j, split="test", metric="accuracy",
                 value=0.1) for j in range(1, T + 1)]
    for i in range(1, T + 1):
        at = dict(common, task_trained=i, step=10 * i)
        rows += [dict(at, task_eval=j, split="test", metric="accuracy", value=R[i - 1][j - 1])
                 for j in range(1, T + 1)]
        if train_seconds is not None:
            rows.append(dict(at, task_eval="", split="train", metric="train_seconds",
                             value=train_seconds[i - 1]))
        if extra_bytes is not None:
            rows.append(dict(at, task_eval="", split="", metric="extra_bytes",
                             value=extra_bytes[i - 1]))
    if complete:
        rows.append(dict(common, task_trained=T, step=10 * T, task_eval="", split="",
                         metric="run_complete", value=1))
    return [{k: str(v) for k, v in r.items()} for r in rows]


def two_seeds(**kwargs) -> list[dict[str, str]]:
    return (run_rows(R0, 0, train_seconds=(1.0, 2.0), extra_bytes=(100, 300), **kwargs)
            + run_rows(R1, 1, train_seconds=(1.5, 2.5), extra_bytes=(100, 500), **kwargs))


def test_cells_are_mean_and_standard_error_over_seeds_by_hand():
    (entry,) = scenario_table(two_seeds())
    assert (entry["name"], entry["label"], list(entry["cells"])) == ("exp", "naive", ["class"])
    cell = entry["cells"]["class"]
    assert cell["n_seeds"] == 2
    # Two values a, b: mean (a + b) / 2, sd (ddof=1) |a - b| / sqrt(2), SE = sd / sqrt(2).
    expected = {
        "average_accuracy": ((0.55 + 0.60) / 2, 0.05 / 2),
        "average_forgetting": ((0.6 + 0.3) / 2, 0.3 / 2),
        "backward_transfer": ((-0.6 - 0.3) / 2, 0.3 / 2),
        "wall_seconds": ((3.0 + 4.0) / 2, 1.0 / 2),     # summed over tasks: 1+2, 1.5+2.5
        "extra_bytes": ((300 + 500) / 2, 200 / 2),      # the last task's, not the first's
    }
    for metric, (mean, se) in expected.items():
        assert cell[metric] == pytest.approx((mean, se)), metric


def test_one_seed_has_no_standard_error():
    (entry,) = scenario_table(run_rows(R0, 0))
    mean, se = entry["cells"]["class"]["average_accuracy"]
    assert mean == pytest.approx(0.55) and math.isnan(se)


def test_incomplete_runs_are_ignored():
    rows = two_seeds() + run_rows([[0.0, 0.0], [0.0, 0.0]], 2, complete=False)
    rows += run_rows(R0, 0, label="replay", complete=False)  # nothing complete: no entry
    (entry,) = scenario_table(rows)
    assert entry["label"] == "naive" and entry["cells"]["class"]["n_seeds"] == 2
    assert entry["cells"]["class"]["average_accuracy"][0] == pytest.approx(0.575)


@pytest.mark.parametrize("seconds, memory", [(None, None), ((1.0, None), (0, None))])
def test_missing_cost_rows_give_nan_not_a_crash(seconds, memory):
    rows = run_rows(R0, 0, train_seconds=seconds, extra_bytes=memory)
    rows = [r for r in rows if r["value"] != "None"]  # a task without its row
    cell = scenario_table(two_seeds() + [dict(r, seed="2", run_id="old") for r in rows]
                          )[0]["cells"]["class"]
    assert cell["n_seeds"] == 3
    if memory is None:  # no extra_bytes at all: unknown; a missing last one: the one before
        assert all(math.isnan(v) for v in cell["extra_bytes"])
    assert all(math.isnan(v) for v in cell["wall_seconds"])  # one task untimed: no sum
    assert cell["average_accuracy"][0] == pytest.approx((0.55 + 0.6 + 0.55) / 3)
    text = format_scenario_table(scenario_table(rows))
    assert "wall time" in text and "n/a" in text.split("wall time")[1]


def test_scenario_columns_are_task_domain_class_then_the_others_alphabetically():
    rows = []
    for seed, scenario in enumerate(["class", "zeta", "domain", "alpha", "task"]):
        rows += run_rows(R0, seed, scenario=scenario)
    (entry,) = scenario_table(rows)
    order = ["task", "domain", "class", "alpha", "zeta"]
    assert list(entry["cells"]) == order and scenario_columns([entry]) == order
    header = format_scenario_table([entry]).splitlines()[1].split()
    assert header == ["method"] + [f"{s}-incremental" for s in order]


def test_entries_in_first_seen_order_and_methods_not_run_in_a_scenario_show_a_dash():
    rows = (run_rows(R0, 0, label="replay", scenario="task") + run_rows(R0, 0, label="naive")
            + run_rows(R1, 1, label="replay", scenario="task"))
    table = scenario_table(rows)
    assert [e["label"] for e in table] == ["replay", "naive"]
    block = format_scenario_table(table).split("\n\n")[0].splitlines()
    assert block[3].split() == ["replay", "0.575", "±", "0.025", "(n=2)", "–"]
    assert block[4].split() == ["naive", "–", "0.550", "(n=1)"]  # seed counts differ: per cell


def test_method_names_show_the_experiment_only_when_there_are_several():
    entry = lambda name, label: {"name": name, "label": label, "cells": {}}  # noqa: E731
    assert method_names([entry("a", "naive"), entry("a", "ewc")]) == ["naive", "ewc"]
    assert method_names([entry("a", "naive"), entry("b", "naive")]) == ["naive", "b / naive"]
    # the experiment with most rows reads bare; grid names lose their section prefixes
    table = [entry("b[model.hidden=[8]]", "naive"), entry("a", "naive"), entry("a", "ewc")]
    assert method_names(table) == ["b[hidden=[8]] / naive", "naive", "ewc"]
    rows = run_rows(R0, 0, name="a") + run_rows(R0, 0, name="b")
    assert format_scenario_table(scenario_table(rows)).splitlines()[3].startswith("naive  ")


def test_format_scenario_table_reads_as_expected():
    rows = two_seeds() + two_seeds(scenario="task")
    text = format_scenario_table(scenario_table(rows))
    assert text == "\n".join([
        "average accuracy (mean ± SE over 2 seeds)",
        "method  task-incremental  class-incremental",
        "------  ----------------  -----------------",
        "naive   0.575 ± 0.025     0.575 ± 0.025",
        "",
        "average forgetting",
        "method  task-incremental  class-incremental",
        "------  ----------------  -----------------",
        "naive   0.450 ± 0.150     0.450 ± 0.150",
        "",
        "backward transfer",
        "method  task-incremental  class-incremental",
        "------  ----------------  -----------------",
        "naive   -0.450 ± 0.150    -0.450 ± 0.150",
        "",
        "wall time (training, summed over tasks)",
        "method  task-incremental  class-incremental",
        "------  ----------------  -----------------",
        "naive   3.5 ± 0.5 s       3.5 ± 0.5 s",
        "",
        "extra memory (kept beyond the model after the last task)",
        "method  task-incremental  class-incremental",
        "------  ----------------  -----------------",
        "naive   400 ± 100 B       400 ± 100 B",
        "",
        "accuracy on all tasks after the last one; forgetting > 0 and BWT < 0 mean old tasks "
        "got worse; ± = standard error over seeds (sample sd / √n; --ci adds the 95% "
        "t-interval); kB = 1000 B; n/a = not measured; – = not run",
    ])


def test_markdown_is_pipe_tables_with_the_same_cells():
    rows = two_seeds() + run_rows(R0, 0, label="replay", extra_bytes=(4_000, 12_345))
    text = format_scenario_table(scenario_table(rows), markdown=True)
    blocks = text.split("\n\n")
    assert blocks[0].splitlines()[0] == "**average accuracy (mean ± SE over seeds, n per cell)**"
    table = blocks[1].splitlines()  # the block after a title is its table
    assert table[:2] == ["| method | class-incremental |", "| --- | --- |"]
    assert table[2:] == ["| naive | 0.575 ± 0.025 (n=2) |", "| replay | 0.550 (n=1) |"]
    assert "| replay | 12.3 kB |" in text and "(n=" not in text.split("average forgetting")[1]


def test_bytes_in_decimal_units():
    assert byte_unit(0) == (1.0, "B") and byte_unit(999) == (1.0, "B")
    assert byte_unit(1000) == (1e3, "kB") and byte_unit(4.5e6) == (1e6, "MB")
    assert byte_unit(2e9) == (1e9, "GB") and byte_unit(3e12) == (1e12, "TB")
    assert format_bytes(1234.0, 0.0) == "1.2 kB" and format_bytes(1234.0, 100.0) == "1.2 ± 0.1 kB"
    rows = (run_rows(R0, 0, label="a", extra_bytes=(0, 0))
            + run_rows(R0, 0, label="b", extra_bytes=(0, 12_300))
            + run_rows(R0, 0, label="c", extra_bytes=(0, 4_500_000)))
    memory = format_scenario_table(scenario_table(rows)).split("extra memory")[1].splitlines()
    assert [line.split(maxsplit=1)[1] for line in memory[3:6]] == ["0 B", "12.3 kB", "4.5 MB"]


def test_no_complete_runs():
    assert format_scenario_table(scenario_table(run_rows(R0, 0, complete=False))) == \
        "no complete runs yet"


def test_plot_draws_one_bar_per_method_and_scenario_with_se_error_bars():
    rows = (two_seeds() + two_seeds(label="ewc", scenario="task")
            + run_rows(R1, 0, label="ewc", scenario="class", extra_bytes=(0, 2_000)))
    table = scenario_table(rows)  # naive: class only (2 seeds); ewc: task (2), class (1)
    ax = plot_scenario_table(table, Figure().add_subplot())
    heights = [round(p.get_height(), 6) for p in ax.patches]
    assert heights == [0.575, 0.575, 0.6]  # task: ewc; class: naive, ewc; no bar for naive/task
    tab10 = [to_rgba(f"C{i}") for i in range(3)]
    assert [p.get_facecolor() for p in ax.patches] == [tab10[0], tab10[2], tab10[2]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["task-incremental",
                                                                   "class-incremental"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["naive", "ewc"]
    assert len(ax.collections) == 2  # an error bar per scenario with SEs; none for n=1
    assert "average accuracy" in ax.get_ylabel() and "1-2 seeds" in ax.get_title()
    ax = plot_scenario_table(table, Figure().add_subplot(), "extra_bytes")
    assert [round(p.get_height(), 6) for p in ax.patches] == [0.4, 0.4, 2.0]
    assert "extra memory (kB)" in ax.get_ylabel()
    assert [t.get_text() for t in ax.texts] == ["400 B", "400 B", "2.0 kB"]  # own size each


def test_write_table_png(tmp_path):
    with ResultWriter(tmp_path / "results.csv") as writer:
        writer.write(two_seeds() + two_seeds(scenario="domain", label="ewc(strength=10)"))
    path = write_table_png(tmp_path)
    assert path == tmp_path / "plots" / "scenario_table.png"
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["scenario_table.png"]  # no temp file


def test_write_table_png_refuses_missing_or_unfinished_results(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "results.csv") + " does not exist"):
        write_table_png(tmp_path)
    with ResultWriter(tmp_path / "results.csv") as writer:
        writer.write(run_rows(R0, 0, complete=False))
    with pytest.raises(DataError, match=r"results\.csv has no complete runs"):
        write_table_png(tmp_path)


def test_end_to_end_replay_keeps_memory_and_naive_none(tmp_path):
    from engram.results import read_rows
    from engram.experiments.continual import run_experiment

    run_experiment(tiny_config(methods=["naive", "replay"]), tmp_path, show_progress=False)
    table = {e["label"]: e for e in scenario_table(read_rows(tmp_path / "results.csv"))}
    assert list(table) == ["naive", "replay"]
    naive, replay = (table[k]["cells"]["class"] for k in ("naive", "replay"))
    assert naive["extra_bytes"][0] == 0 and replay["extra_bytes"][0] > 0
    assert naive["wall_seconds"][0] > 0 and np.isfinite(replay["average_accuracy"][0])


def _val_and_test(R_val, R_test, seed):
    """One run's rows with a val split (R_val) beside its test split (R_test)."""
    test = run_rows(R_test, seed)
    val = [dict(r, split="val", value=str(R_val[int(r["task_trained"]) - 1][int(r["task_eval"]) - 1]))
           for r in test if r["metric"] == "accuracy" and r["task_trained"] != "0"]
    return test + val


def test_cli_table_prints_the_chosen_split_as_markdown_and_writes_the_png(tmp_path, capsys):
    from engram.cli import main

    with ResultWriter(tmp_path / "results.csv") as writer:
        writer.write(_val_and_test(R1, R0, 0) + _val_and_test(R1, R0, 1))
    assert main(["table", str(tmp_path), "--markdown", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "| method | class-incremental |" in out
    assert "| naive | 0.600 ± 0.000 |" in out  # R1's final average, from the val rows
    assert (tmp_path / "plots" / "scenario_table_val.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["table", str(tmp_path), "--no-png"]) == 0
    assert "naive   0.550 ± 0.000" in capsys.readouterr().out  # test by default
    assert not (tmp_path / "plots" / "scenario_table.png").exists()


def test_cli_table_names_a_missing_results_file(tmp_path, capsys):
    from engram.cli import main

    assert main(["table", str(tmp_path)]) == 2
    assert "results.csv does not exist" in capsys.readouterr().err


def test_table_joins_several_folders_into_one_table(tmp_path, capsys):
    from engram.cli import main

    main_dir, baselines = tmp_path / "main", tmp_path / "baselines"
    for folder, name, label in ((main_dir, "exp", "naive"), (baselines, "wide", "naive")):
        folder.mkdir()
        with ResultWriter(folder / "results.csv") as writer:
            writer.write(two_seeds(name=name, label=label))
    assert main(["table", str(main_dir), str(baselines), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| naive |" in out and "| wide / naive |" in out
    assert (main_dir / "plots" / "scenario_table.png").is_file()
    assert main(["table", str(main_dir), str(tmp_path / "nowhere")]) == 2
    assert "nowhere/results.csv does not exist" in capsys.readouterr().err
