"""The one experiment harness (engram.experiments.harness): failure isolation, resume."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from engram.experiments.harness import Job, JobSink, Plan, run_plan
from engram.results import read_rows

COLUMNS = ["run_id", "seed", "metric", "value"]
KEY = ("run_id", "metric")


@dataclass
class Payload:
    fail: bool  # this job raises before its run_complete row


def execute_or_fail(job: Job, sink: JobSink) -> None:
    """Module level, so spawned workers can import it: one measured row, then either a
    failure or the run_complete row."""
    sink.emit([{"run_id": job.run_id, "seed": job.seed, "metric": "loss", "value": job.seed}])
    sink.report(1)
    if job.payload.fail:
        raise ValueError(f"job {job.seed} failed")
    sink.emit([{"run_id": job.run_id, "seed": job.seed, "metric": "run_complete", "value": 1}])


def tiny_plan(failing: set[int]) -> Plan:
    """Four jobs, seeds 0-3; the seeds in `failing` raise."""
    jobs = [Job(f"run{seed}", seed, "toy", Payload(seed in failing)) for seed in range(4)]
    return Plan(command="toy", identity={"toy": 1}, growable=(), config={"toy": 1},
                columns=COLUMNS, key=KEY, jobs=jobs, execute=execute_or_fail)


def completed_seeds(out) -> set[int]:
    rows = read_rows(out / "results.csv", COLUMNS, KEY)
    return {int(r["seed"]) for r in rows if r["metric"] == "run_complete"}


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_jobs_are_listed_and_the_others_finish(tmp_path, workers):
    report = run_plan(tiny_plan({0, 1}), tmp_path, workers=workers, show_progress=False,
                      raise_failures=False)
    assert (report.total, report.skipped, report.completed) == (4, 0, 2) and not report.ok
    assert sorted(f["seed"] for f in report.failures) == [0, 1]
    assert all("ValueError: job" in f["error"] and f["label"] == "toy" for f in report.failures)
    assert completed_seeds(tmp_path) == {2, 3}
    listed = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert sorted((f["run_id"], f["seed"]) for f in listed) == [("run0", 0), ("run1", 1)]
    # fixed and rerun: only the failed jobs run again, and failures.jsonl is gone
    again = run_plan(tiny_plan(set()), tmp_path, workers=workers, show_progress=False)
    assert (again.skipped, again.completed, again.failures) == (2, 2, [])
    assert completed_seeds(tmp_path) == {0, 1, 2, 3}
    assert not (tmp_path / "failures.jsonl").exists()


def test_raise_failures_raises_the_first_error_after_the_others_ran(tmp_path):
    with pytest.raises(ValueError, match="job [01] failed") as info:
        run_plan(tiny_plan({0, 1}), tmp_path, workers=2, show_progress=False)
    assert "2 of 4 runs failed" in "".join(info.value.__notes__)
    assert completed_seeds(tmp_path) == {2, 3}
    assert len((tmp_path / "failures.jsonl").read_text().splitlines()) == 2


def test_a_log_gets_a_line_per_finished_run(tmp_path, capsys):
    """stderr that is not a terminal (here: captured) gets no bar but a line per job."""
    from engram.experiments.continual import run_experiment
    from tests.conftest import tiny_config

    run_experiment(tiny_config(seeds=[0, 1]), tmp_path, show_progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("engram")]
    assert lines == ["engram run: [1/2] naive seed 0 done", "engram run: [2/2] naive seed 1 done"]
    run_experiment(tiny_config(seeds=[0, 1]), tmp_path, show_progress=False)
    assert "engram run:" not in capsys.readouterr().err  # -q: nothing
