"""The Ray backend of the harness (engram.experiments.ray_backend): the same rows as the local
pool, a lost worker retried without duplicates, a job's failure recorded and not retried,
resume, the CLI. One local Ray instance (2 CPUs) is shared by the module's tests."""

from __future__ import annotations

import os
import signal
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from engram.cli import main  # noqa: E402
from engram.errors import ConfigError, EngramError  # noqa: E402
from engram.experiments import harness  # noqa: E402
from engram.experiments.harness import Job, JobSink, Plan, run_plan  # noqa: E402
from engram.experiments.ray_backend import LOST_WORKER_RETRIES, connect, import_ray  # noqa: E402
from engram.experiments.sweep import run_sweep  # noqa: E402
from engram.results import read_rows  # noqa: E402
# clean_registries (autouse): each test here, too, forgets the plugins it loaded
from tests.test_plugins import clean_registries, pids, write_config, write_plugin  # noqa: E402,F401
from tests.test_sweep import measured, sweep_file  # noqa: E402

COLUMNS = ["run_id", "seed", "metric", "value"]
KEY = ("run_id", "metric")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module: run_plan uses it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@dataclass
class Behaviour:
    fail: bool = False  # raise an EngramError after the first row
    die: int = 0        # its first `die` attempts SIGKILL their own worker after the first row


def execute_toy(job: Job, sink: JobSink) -> None:
    """Module level, so Ray workers import it. Each attempt leaves a line in
    OUT/attempts-<run id>; the rows: `loss`, `recorded` (how many of its rows the job was told
    the table holds), then `run_complete`."""
    with open(sink.folder / f"attempts-{job.run_id}", "a") as f:
        f.write(f"{os.getpid()}\n")
    sink.emit([{"run_id": job.run_id, "seed": job.seed, "metric": "loss", "value": job.seed}])
    sink.report(1)
    if attempts(sink.folder, job.run_id) <= job.payload.die:
        wait_until_written(sink.folder, job.run_id)  # so the retry has a row to be told of
        os.kill(os.getpid(), signal.SIGKILL)  # the Ray worker process dies mid-job
    if job.payload.fail:
        raise EngramError(f"job {job.seed} failed")
    sink.emit([{"run_id": job.run_id, "seed": job.seed, "metric": "recorded",
                "value": len(sink.recorded)}])
    sink.report(1)
    sink.emit([{"run_id": job.run_id, "seed": job.seed, "metric": "run_complete", "value": 1}])


def wait_until_written(out: Path, run: str, seconds: float = 20) -> None:
    """Until the driver has written a row of `run` to the table (one machine here)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (out / "results.csv").exists() and f"{run}," in (out / "results.csv").read_text():
            return
        time.sleep(0.02)


def toy_plan(**behaviour: Behaviour) -> Plan:
    """Four jobs, run0..run3; `behaviour` by run id (default: just finish)."""
    jobs = [Job(f"run{seed}", seed, "toy", behaviour.get(f"run{seed}", Behaviour()), size=2)
            for seed in range(4)]
    return Plan(command="toy", identity={"toy": 1}, growable=(), config={"toy": 1},
                columns=COLUMNS, key=KEY, jobs=jobs, execute=execute_toy)


def table(out: Path) -> list[tuple[str, str, str]]:
    return sorted((r["run_id"], r["metric"], r["value"])
                  for r in read_rows(out / "results.csv", COLUMNS, KEY))


def attempts(out: Path, run: str) -> int:
    return len((out / f"attempts-{run}").read_text().splitlines())


class CountingBar:
    """A progress bar that counts the units it is advanced by."""
    def __init__(self, *args) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- no cluster needed

def test_without_ray_installed_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r'--backend ray needs Ray: pip install -e "\.\[ray\]"'):
        import_ray()


def test_an_unreachable_address_is_one_line_before_ray_starts():
    started = []
    fake = types.SimpleNamespace(is_initialized=lambda: False,
                                 init=lambda **kwargs: started.append(kwargs))
    with pytest.raises(ConfigError, match=r"--address 127.0.0.1:1: no Ray cluster answers there"):
        connect(fake, "127.0.0.1:1", 2)
    with pytest.raises(ConfigError, match=r"--address ray://127.0.0.1:1: no Ray cluster"):
        connect(fake, "ray://127.0.0.1:1", 2)
    assert started == []


# ----------------------------------------------------------------------------- on the local Ray

def test_a_sweep_on_ray_gives_the_rows_of_the_local_pool_and_a_rerun_skips_it(tmp_path, local_ray):
    path = sweep_file(tmp_path, seeds=[0, 1], methods=["naive", "ewc"])
    local = run_sweep(path, tmp_path / "local", workers=2, show_progress=False)
    on_ray = run_sweep(path, tmp_path / "ray", workers=2, show_progress=False, backend="ray")
    assert (on_ray.total, on_ray.completed, on_ray.failures) == (local.total, local.completed,
                                                                  []) == (4, 4, [])
    ray_rows = read_rows(tmp_path / "ray" / "results.csv")
    assert measured(ray_rows) == measured(read_rows(tmp_path / "local" / "results.csv"))
    assert len({r["run_id"] for r in ray_rows}) == 4
    assert ray.is_initialized()  # the instance run_plan found is left running
    results = tmp_path / "ray" / "results.csv"
    before = results.read_bytes()
    again = run_sweep(path, tmp_path / "ray", workers=2, show_progress=False, backend="ray")
    assert (again.skipped, again.completed) == (4, 0) and results.read_bytes() == before


def test_a_killed_worker_is_retried_and_every_row_is_written_once(tmp_path, local_ray, monkeypatch):
    bar = CountingBar()
    monkeypatch.setattr(harness, "_progress_bar", lambda *args: bar)
    report = run_plan(toy_plan(run1=Behaviour(die=1)), tmp_path, workers=2, backend="ray")
    assert (report.completed, report.failures) == (4, [])
    assert attempts(tmp_path, "run1") == 2
    assert [attempts(tmp_path, f"run{i}") for i in (0, 2, 3)] == [1, 1, 1]
    # each row once; the retry was told that its first attempt's `loss` row is in the table
    assert table(tmp_path) == sorted(
        [(f"run{i}", "loss", str(i)) for i in range(4)]
        + [(f"run{i}", "recorded", "1" if i == 1 else "0") for i in range(4)]
        + [(f"run{i}", "run_complete", "1") for i in range(4)])
    assert bar.n == 8  # the retry's re-reported progress is not counted twice


def test_a_worker_killed_every_time_fails_its_job_after_the_retries(tmp_path, local_ray):
    report = run_plan(toy_plan(run2=Behaviour(die=99)), tmp_path, workers=2, backend="ray",
                      show_progress=False, raise_failures=False)
    (failure,) = report.failures
    assert failure["run_id"] == "run2" and report.completed == 3
    assert failure["error"].startswith(f"the Ray worker running this job was lost "
                                       f"{LOST_WORKER_RETRIES + 1} times")
    assert attempts(tmp_path, "run2") == LOST_WORKER_RETRIES + 1


def test_a_failing_job_is_recorded_not_retried_and_a_rerun_runs_only_it(tmp_path, local_ray):
    report = run_plan(toy_plan(run0=Behaviour(fail=True)), tmp_path, workers=2, backend="ray",
                      show_progress=False, raise_failures=False)
    (failure,) = report.failures
    assert (failure["run_id"], failure["error"]) == ("run0", "EngramError: job 0 failed")
    assert report.completed == 3 and attempts(tmp_path, "run0") == 1
    again = run_plan(toy_plan(), tmp_path, workers=2, backend="ray", show_progress=False)
    assert (again.skipped, again.completed, again.failures) == (3, 1, [])
    assert [attempts(tmp_path, f"run{i}") for i in range(4)] == [2, 1, 1, 1]
    assert not (tmp_path / "failures.jsonl").exists()


def test_raise_failures_raises_the_jobs_engram_error_naming_it(tmp_path, local_ray):
    with pytest.raises(EngramError, match="toy seed 3: job 3 failed"):
        run_plan(toy_plan(run3=Behaviour(fail=True)), tmp_path, workers=2, backend="ray",
                 show_progress=False)


def test_cli_sweep_on_ray_and_address_without_ray(tmp_path, local_ray, capsys):
    path = sweep_file(tmp_path, seeds=[0, 1])
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--backend", "ray",
                 "--workers", "2", "-q"]) == 0
    assert "2 runs: 0 were already done, 2 finished now, 0 failed" in capsys.readouterr().out
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert len({r["run_id"] for r in rows if r["metric"] == "run_complete"}) == 2
    assert main(["sweep", str(path), "--out", str(tmp_path / "other"),
                 "--address", "127.0.0.1:6379"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "engram: error: --address names a Ray cluster: it needs --backend ray"


def test_a_ray_sweep_imports_the_plugin_in_its_tasks(tmp_path, local_ray):
    """The job travels pickled and is unpickled in the task after the plugin is loaded."""
    plugin = write_plugin(tmp_path / "lab")
    grid = write_config(tmp_path, "grid.yaml",
                        methods=[{"name": "l2zero", "strength": [0.0, 0.5]}])
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--import", str(plugin), "--backend", "ray",
                 "--workers", "2", "--out", str(out), "-q"]) == 0
    rows = read_rows(out / "results.csv")
    assert len({r["run_id"] for r in rows if r["metric"] == "run_complete"}) == 2
    assert str(os.getpid()) not in pids(plugin)
