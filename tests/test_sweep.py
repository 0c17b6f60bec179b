"""Sweeps: grid expansion, resume by run id, parallel workers, failures that do not stop others."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml

from engram.cli import main
from engram.errors import ConfigError
from engram.results import COLUMNS, read_rows
from engram.experiments.continual import continual_jobs as sweep_jobs
from engram.experiments.sweep import expand_sweep, run_sweep

TINY = {
    "name": "tiny",
    "seeds": [0],
    "plots": False,
    "data": {"source": "digits", "limit": 300},
    "stream": {"kind": "split", "scenario": "class", "n_tasks": 2, "classes_per_task": 2},
    "model": {"kind": "mlp", "hidden": [16]},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "methods": ["naive"],
}


def sweep_file(tmp_path, name="sweep.yaml", **changes):
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw[section][leaf] = value
        else:
            raw[section] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def measured(rows):
    """Row identity and value, without wall time (which differs between identical runs)."""
    return sorted((r["run_id"], r["task_trained"], r["epoch"], r["task_eval"], r["split"],
                   r["metric"], r["value"]) for r in rows if r["metric"] != "train_seconds")


# ----------------------------------------------------------------------------- the grid

def test_lists_of_scalars_are_axes_and_the_grid_is_their_product():
    raw = {**TINY, "stream": {**TINY["stream"], "scenario": ["task", "class"]},
           "train": {**TINY["train"], "lr": [0.01, 0.1, 0.2]}}
    points = expand_sweep(raw)
    assert len(points) == 6
    assert [p for p, _ in points][:2] == [{"stream.scenario": "task", "train.lr": 0.01},
                                          {"stream.scenario": "task", "train.lr": 0.1}]
    for point, cfg in points:
        assert cfg.stream.scenario == point["stream.scenario"] and cfg.train.lr == point["train.lr"]
        # the name tells points apart in tables; the scenario has its own column
        assert cfg.name == f"tiny[train.lr={point['train.lr']}]"


def test_list_valued_keys_need_a_list_of_lists_to_become_an_axis():
    plain = expand_sweep({**TINY, "model": {"kind": "mlp", "hidden": [16, 8]}})
    assert len(plain) == 1 and plain[0][1].model.hidden == [16, 8]
    grid = expand_sweep({**TINY, "model": {"kind": "mlp", "hidden": [[16], [16, 8]]}})
    assert [cfg.model.hidden for _, cfg in grid] == [[16], [16, 8]]


def test_seeds_are_the_seed_list_not_an_axis():
    points = expand_sweep({**TINY, "seeds": [0, 1, 2]})
    assert len(points) == 1
    assert len(sweep_jobs(points)) == 3


def test_method_parameters_may_list_alternatives():
    points = expand_sweep({**TINY, "methods": ["naive", {"name": "ewc", "strength": [1, 10]}]})
    (_, cfg), = points
    assert [m.label() for m in cfg.methods] == ["naive", "ewc(strength=1.0)", "ewc(strength=10.0)"]


def test_keys_that_do_not_change_results_cannot_be_varied():
    with pytest.raises(ConfigError, match="threads: a sweep cannot vary threads"):
        expand_sweep({**TINY, "threads": [1, 2]})


def test_runs_are_unique_by_run_id():
    # two methods entries that are the same method are one run per seed
    points = expand_sweep({**TINY, "methods": ["naive", "naive"], "seeds": [0, 1]})
    jobs = sweep_jobs(points)
    assert len({job.run_id for job in jobs}) == len(jobs) == 2


def test_a_bad_alternative_stops_the_sweep_before_anything_runs_naming_the_point():
    raw = {**TINY, "train": {**TINY["train"], "lr": [0.1, -1.0]}}
    with pytest.raises(ConfigError, match=r"grid point \[train.lr=-1.0\]: train.lr: -1.0 is out of range"):
        expand_sweep(raw)


def test_an_unknown_key_is_still_an_error():
    with pytest.raises(ConfigError, match="unknown key train.lrr"):
        expand_sweep({**TINY, "train": {"lrr": [0.1, 0.2]}})


# ----------------------------------------------------------------------------- running

def test_sweep_runs_every_job_and_a_rerun_measures_nothing_again(tmp_path):
    path = sweep_file(tmp_path, seeds=[0, 1], stream__scenario=["task", "class"])
    report = run_sweep(path, tmp_path / "out", show_progress=False)
    assert (report.total, report.skipped, report.completed, report.failures) == (4, 0, 4, [])
    results = tmp_path / "out" / "results.csv"
    rows = read_rows(results)
    assert len({r["run_id"] for r in rows if r["metric"] == "run_complete"}) == 4
    assert {r["scenario"] for r in rows} == {"task", "class"}
    before = results.read_bytes()
    again = run_sweep(path, tmp_path / "out", show_progress=False)
    assert (again.skipped, again.completed) == (4, 0)
    assert results.read_bytes() == before
    assert yaml.safe_load((tmp_path / "out" / "sweep.yaml").read_text()) == yaml.safe_load(path.read_text())


def test_overrides_apply_before_the_grid_is_expanded(tmp_path):
    path = sweep_file(tmp_path)
    report = run_sweep(path, tmp_path / "out", overrides=["seeds=[0,1]", "train.lr=[0.05,0.1]"],
                       show_progress=False)
    assert report.total == 4
    stored = yaml.safe_load((tmp_path / "out" / "sweep.yaml").read_text())
    assert stored["seeds"] == [0, 1] and stored["train"]["lr"] == [0.05, 0.1]


def test_an_interrupted_sweep_resumes_to_the_same_rows(tmp_path):
    path = sweep_file(tmp_path, seeds=[0, 1], methods=["naive", {"name": "ewc", "strength": 10}])
    full = run_sweep(path, tmp_path / "full", show_progress=False)
    assert full.completed == 4
    rows = read_rows(tmp_path / "full" / "results.csv")
    # Simulate a kill: the last run lost its tail, the one before lost only its completion row.
    ids = list(dict.fromkeys(r["run_id"] for r in rows))
    cut = [r for r in rows if r["run_id"] != ids[-1] or r["task_trained"] == "0"]
    cut = [r for r in cut if not (r["run_id"] == ids[-2] and r["metric"] == "run_complete")]
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "full" / "experiment.json", tmp_path / "cut")  # the sweep's record
    with open(tmp_path / "cut" / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(cut)
    resumed = run_sweep(path, tmp_path / "cut", show_progress=False)
    assert (resumed.skipped, resumed.completed) == (2, 2)
    assert measured(read_rows(tmp_path / "cut" / "results.csv")) == measured(rows)


def test_adding_a_seed_runs_only_the_new_runs(tmp_path):
    run_sweep(sweep_file(tmp_path, seeds=[0]), tmp_path / "out", show_progress=False)
    report = run_sweep(sweep_file(tmp_path, seeds=[0, 1]), tmp_path / "out", show_progress=False)
    assert (report.total, report.skipped, report.completed) == (2, 1, 1)
    assert (tmp_path / "out" / "sweep.1.yaml").exists()  # the earlier sweep file is kept


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path):
    path = sweep_file(tmp_path, train__lr=[0.05, 1e30])  # the second diverges
    report = run_sweep(path, tmp_path / "out", show_progress=False)
    assert report.completed == 1
    (failure,) = report.failures
    assert failure["point"] == {"train.lr": 1e30}
    assert failure["error"].startswith("DivergenceError: training diverged")
    stored = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert stored == [failure]
    complete = {r["name"] for r in read_rows(tmp_path / "out" / "results.csv")
                if r["metric"] == "run_complete"}
    assert complete == {"tiny[train.lr=0.05]"}


def test_workers_give_the_same_rows_as_one_process_and_never_interleave(tmp_path):
    path = sweep_file(tmp_path, seeds=[0, 1], stream__scenario=["task", "domain", "class"],
                      train__lr=[0.05, 1e30])
    serial = run_sweep(path, tmp_path / "serial", show_progress=False)
    parallel = run_sweep(path, tmp_path / "parallel", workers=2, show_progress=False)
    assert (serial.completed, len(serial.failures)) == (parallel.completed, len(parallel.failures)) == (6, 6)
    assert sorted(f["run_id"] for f in serial.failures) == sorted(f["run_id"] for f in parallel.failures)
    results = tmp_path / "parallel" / "results.csv"
    with open(results, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == COLUMNS and all(len(line) == len(COLUMNS) for line in lines)
    assert measured(read_rows(results)) == measured(read_rows(tmp_path / "serial" / "results.csv"))


# ----------------------------------------------------------------------------- the command

def test_cli_dry_run_lists_the_grid(tmp_path, capsys):
    path = sweep_file(tmp_path, stream__scenario=["task", "class"])
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs, 0 already done" in out and out.count("todo") == 2
    assert not (tmp_path / "out" / "results.csv").exists()


def test_cli_sweep_reports_failures_with_exit_status_1(tmp_path, capsys):
    path = sweep_file(tmp_path, train__lr=[0.05, 1e30])
    status = main(["sweep", str(path), "--out", str(tmp_path / "out"), "-q"])
    captured = capsys.readouterr()
    assert status == 1
    assert "2 runs: 0 were already done, 1 finished now, 1 failed" in captured.out
    assert "naive seed 0 [train.lr=1e+30]: DivergenceError" in captured.err


def test_cli_sweep_rejects_zero_workers(tmp_path, capsys):
    path = sweep_file(tmp_path)
    with pytest.raises(SystemExit) as info:  # refused by the argument parser
        main(["sweep", str(path), "--out", str(tmp_path / "out"), "--workers", "0"])
    assert info.value.code == 2
    assert "argument --workers: must be at least 1, got 0" in capsys.readouterr().err


def test_engram_run_on_a_sweep_file_points_to_engram_sweep(tmp_path, capsys):
    path = sweep_file(tmp_path, stream__scenario=["task", "class"])
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "stream.scenario: ['task', 'class'] is not allowed" in err
    assert f"lists alternatives (2 runs): run it with `engram sweep {path}`" in err


def test_a_worker_killed_mid_run_is_reported_and_a_rerun_finishes_its_job(tmp_path):
    import multiprocessing
    import os
    import signal
    import threading
    import time

    # runs of about 6 s each: longer than a worker's start-up even on a loaded machine (with
    # 2 s runs, CI once saw one worker finish all three before the other had started)
    path = sweep_file(tmp_path, seeds=[0, 1, 2], train__epochs=900)
    out = tmp_path / "out"
    reports = []
    sweep = threading.Thread(target=lambda: reports.append(
        run_sweep(path, out, workers=2, show_progress=False)))
    sweep.start()
    deadline = time.monotonic() + 60
    # Wait until both workers are inside a run (training rows of two unfinished runs),
    # then kill one. Killing a worker still starting up would only hand its job to the
    # other worker (seen on a loaded machine), which is not what this test is about.
    while time.monotonic() < deadline:
        results = out / "results.csv"
        if results.exists():
            rows = read_rows(results)
            training = {r["run_id"] for r in rows if r["metric"] == "train_loss"}
            complete = {r["run_id"] for r in rows if r["metric"] == "run_complete"}
            if len(training - complete) >= 2:  # (on a loaded machine one may finish first)
                break
        time.sleep(0.05)
    assert multiprocessing.active_children(), "the sweep ended before two runs were in progress"
    victim = multiprocessing.active_children()[0]
    os.kill(victim.pid, signal.SIGKILL)
    sweep.join(timeout=120)
    (report,) = reports
    (failure,) = report.failures
    assert "the worker process died (exit code -9)" in failure["error"]
    assert report.completed == 2
    again = run_sweep(path, out, show_progress=False)
    assert (again.skipped, again.completed, again.failures) == (2, 1, [])
    rows = read_rows(out / "results.csv")
    assert {r["run_id"] for r in rows if r["metric"] == "run_complete"} == \
        {r["run_id"] for r in rows}
