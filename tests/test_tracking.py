"""`--log tensorboard` and `--log mlflow`: what an experiment logs, read back with each
backend's own reader and compared with results.csv (engram.reports.tracking)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engram.cli import build_parser, main
from engram.config import config_to_dict
from engram.results import read_rows
from tests.conftest import tiny_config

EXPERIMENT_COMMANDS = ("demo", "run", "sweep", "profile", "plasticity", "window")


def _config(tmp_path: Path, **sections) -> Path:
    """A seconds-fast config: 2 tasks of 1 epoch, one seed."""
    raw = {"stream": {"n_tasks": 2}, "train": {"epochs": 1}, "data": {"limit": 240}, **sections}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(tiny_config(**raw))))
    return path


def _scalar_rows(rows: list[dict[str, str]], run_id: str, metric: str, task: str,
                 split: str = "test") -> list[tuple[int, float]]:
    return sorted((int(r["step"]), float(r["value"])) for r in rows
                  if r["run_id"] == run_id and r["metric"] == metric
                  and r["task_eval"] == task and r["split"] == split)


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture
def local_mlflow(monkeypatch):
    """No MLFLOW_TRACKING_URI (engram's default store, OUT/mlruns) and no
    MLFLOW_ALLOW_FILE_STORE: engram allows its own file store (set by it, undone after)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset below")  # so that teardown restores it
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


@pytest.mark.parametrize("command", EXPERIMENT_COMMANDS)
def test_every_experiment_command_takes_log_once_or_twice(command):
    parser = build_parser()
    positional = {"sweep": ["x.yaml"], "run": ["x.yaml"]}.get(command, [])
    assert parser.parse_args([command, *positional]).log == []
    args = parser.parse_args([command, *positional, "--log", "tensorboard", "--log", "mlflow"])
    assert args.log == ["tensorboard", "mlflow"]
    with pytest.raises(SystemExit):
        parser.parse_args([command, *positional, "--log", "wandb"])


def test_without_log_no_tracker_is_imported(tmp_path):
    """No --log: neither tensorboard nor mlflow (nor the tracking module) is imported."""
    config = _config(tmp_path)
    code = (f"import sys; from engram.cli import main\n"
            f"assert main(['run', {str(config)!r}, '--out', {str(tmp_path / 'o')!r}, '-q']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow')"
            " or m in ('torch.utils.tensorboard', 'engram.reports.tracking')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "o" / "tensorboard").exists() and not (tmp_path / "o" / "mlruns").exists()


def test_tensorboard_scalars_equal_the_rows_with_image_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "out"
    config = _config(tmp_path, methods=["naive", {"name": "ewc", "strength": 10}])
    assert main(["run", str(config), "--out", str(out), "-q", "--log", "tensorboard"]) == 0
    rows = read_rows(out / "results.csv")
    ewc = next(r for r in rows if r["method"] == "ewc")
    assert ewc["label"] == "ewc(strength=10.0)"
    folder = out / "tensorboard" / f"ewc(strength=10.0)-seed0-{ewc['run_id']}"
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == sorted(
        f"{r['label']}-seed0-{r['run_id']}" for r in rows if r["metric"] == "run_complete")
    events = _events(folder)
    for metric, task, split in (("accuracy", "1", "test"), ("loss", "2", "test"),
                                ("train_loss", "", "train")):
        tag = f"{split}/{metric}" + (f"/task{task}" if task else "")
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = _scalar_rows(rows, ewc["run_id"], metric, task, split)
        assert [s for s, _ in logged] == [s for s, _ in expected], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    image = events.Images("accuracy_matrix/test")
    assert len(image) == 1 and image[0].encoded_image_string[:4] == b"\x89PNG"
    assert image[0].width > 100 and image[0].height > 100
    from engram.reports.tables import average_accuracy
    from engram.results import accuracy_matrices

    matrix = next(m for m in accuracy_matrices(rows) if m.run_id == ewc["run_id"])
    final = events.Scalars("final/average_accuracy")
    assert final[-1].value == pytest.approx(average_accuracy(matrix.R), rel=1e-6)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert session.hparams["label"].string_value == "ewc(strength=10.0)"
    assert session.hparams["method.strength"].number_value == 10.0
    assert session.hparams["seed"].number_value == 0

    # a rerun skips both finished runs: nothing is logged again
    before = sorted(p for p in (out / "tensorboard").rglob("*") if p.is_file())
    assert main(["run", str(config), "--out", str(out), "-q", "--log", "tensorboard"]) == 0
    assert sorted(p for p in (out / "tensorboard").rglob("*") if p.is_file()) == before


def test_a_resumed_run_gets_its_matrix_from_the_table(tmp_path):
    """A job resumed in a later call writes only its last rows; the tracker reads the
    earlier ones back from results.csv for the finished run's matrix and final metrics."""
    pytest.importorskip("tensorboard")
    from engram.experiments.continual import run_plan_of
    from engram.reports.tables import average_forgetting
    from engram.results import accuracy_matrices
    from engram.reports.tracking import TensorBoardTracker

    config = _config(tmp_path, stream={"n_tasks": 3})
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "-q"]) == 0
    rows = read_rows(out / "results.csv")
    plan = run_plan_of(tiny_config(stream={"n_tasks": 3}, train={"epochs": 1},
                                   data={"limit": 240}))
    tracker = TensorBoardTracker()
    tracker.start(plan, out)
    job = plan.jobs[0]
    tracker.rows(job, [r for r in rows if r["task_trained"] == "3"])  # the last task only
    tracker.finished(job, None)
    tracker.shutdown()
    events = _events(out / "tensorboard" / f"naive-seed0-{job.run_id}")
    assert [e.step for e in events.Scalars("test/accuracy/task1")] == \
        [int(r["step"]) for r in rows if r["metric"] == "accuracy" and r["task_eval"] == "1"
         and r["task_trained"] == "3"]
    matrix = accuracy_matrices(rows)[0]
    assert events.Scalars("final/average_forgetting")[0].value == \
        pytest.approx(average_forgetting(matrix.R), rel=1e-6)
    assert events.Images("accuracy_matrix/test")


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, local_mlflow):
    """A call interrupted in a job leaves its MLflow run KILLED; the next call's rows for
    that job go to the same run, which then finishes."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from engram.experiments.continual import run_plan_of
    from engram.reports.tracking import MlflowTracker

    out = tmp_path / "out"
    assert main(["run", str(_config(tmp_path)), "--out", str(out), "-q"]) == 0
    rows = read_rows(out / "results.csv")
    plan = run_plan_of(tiny_config(stream={"n_tasks": 2}, train={"epochs": 1},
                                   data={"limit": 240}))
    job = plan.jobs[0]
    first = MlflowTracker()
    first.start(plan, out)
    first.rows(job, [r for r in rows if r["task_trained"] in ("0", "1")])
    first.shutdown()  # interrupted
    second = MlflowTracker()
    second.start(plan, out)
    second.rows(job, [r for r in rows if r["task_trained"] == "2"])
    second.finished(job, None)
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("out").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "test.accuracy.task1")
    assert sorted(m.step for m in history) == \
        [s for s, _ in _scalar_rows(rows, job.run_id, "accuracy", "1")]
    assert "final.average_accuracy" in run.data.metrics


def test_mlflow_runs_params_metrics_and_artifacts(tmp_path, local_mlflow):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    config = _config(tmp_path, methods=["naive", {"name": "ewc", "strength": 10}],
                     seeds=[0, 1], plots=True)
    assert main(["run", str(config), "--out", str(out), "-q", "--log", "mlflow"]) == 0
    rows = read_rows(out / "results.csv")
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("out")
    runs = client.search_runs([experiment.experiment_id])
    jobs = {r.data.tags["run_id"]: r for r in runs if "engram.summary" not in r.data.tags}
    assert sorted(r.info.run_name for r in jobs.values()) == \
        ["ewc(strength=10.0)-seed0", "ewc(strength=10.0)-seed1", "naive-seed0", "naive-seed1"]
    assert set(jobs) == {r["run_id"] for r in rows}
    for run_id, run in jobs.items():
        first = next(r for r in rows if r["run_id"] == run_id)
        assert run.info.status == "FINISHED" and run.data.tags["command"] == "run"
        assert run.data.params["seed"] == first["seed"]
        assert run.data.params["label"] == first["label"]
        history = client.get_metric_history(run.info.run_id, "test.accuracy.task2")
        logged = sorted((m.step, m.value) for m in history)
        expected = _scalar_rows(rows, run_id, "accuracy", "2")
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-9)
        assert "final.average_accuracy" in run.data.metrics
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == \
            ["accuracy_matrix_test.png"]
    ewc = next(r for r in jobs.values() if r.data.params["method"] == "ewc")
    assert ewc.data.params["method.strength"] == "10.0"
    summary = next(r for r in runs if "engram.summary" in r.data.tags)
    assert summary.data.metrics["completed"] == 4.0
    files = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"config.yaml", "results.csv", "plots"} <= files
    plots = {Path(a.path).name for a in client.list_artifacts(summary.info.run_id, "plots")}
    assert plots == {p.name for p in (out / "plots").glob("*.png")} and plots

    # a rerun runs nothing and logs nothing
    assert main(["run", str(config), "--out", str(out), "-q", "--log", "mlflow"]) == 0
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)


def test_mlflow_uses_the_tracking_uri_of_the_environment(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "elsewhere").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "out"
    assert main(["run", str(_config(tmp_path)), "--out", str(out), "-q", "--log", "mlflow",
                 "--log", "tensorboard"]) == 0
    assert not (out / "mlruns").exists() and (out / "tensorboard").is_dir()
    runs = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("out").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["naive-seed0", "run summary"]


def test_plasticity_metrics_in_mlflow(tmp_path, local_mlflow):
    """A pooled metric and its per-layer ones (dead_units, dead_units/layer1) both logged."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from engram.experiments.plasticity import PLASTICITY_COLUMNS, PLASTICITY_KEY

    config = tmp_path / "p.yaml"
    config.write_text("seeds: [0]\nproblem: {n_tasks: 3, flip_every: 100, probe_size: 20}\n"
                      "model: {hidden: [4]}\nmethods: [naive]\n")
    out = tmp_path / "o"
    assert main(["plasticity", str(config), "--out", str(out), "-q", "--log", "mlflow"]) == 0
    rows = read_rows(out / "results.csv", PLASTICITY_COLUMNS, PLASTICITY_KEY)
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("o").experiment_id],
                                "tags.label = 'naive'")
    assert run.info.status == "FINISHED"
    for metric in ("dead_units", "dead_units/layer1", "online_loss"):
        expected = sorted((int(r["step"]), float(r["value"])) for r in rows
                          if r["metric"] == metric)
        logged = sorted((m.step, m.value) for m in
                        client.get_metric_history(run.info.run_id, metric.replace("/", ".")))
        assert expected and logged == [(s, pytest.approx(v)) for s, v in expected], metric


def test_window_scalars_in_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from engram.experiments.window import WINDOW_COLUMNS, WINDOW_KEY

    out = tmp_path / "w"
    assert main(["window", "run.max_steps=120", "run.n_points=40", "run.window=10",
                 "run.record_every=10", "--out", str(out), "--no-animation", "--quiet",
                 "--log", "tensorboard"]) == 0
    rows = read_rows(out / "results.csv", WINDOW_COLUMNS, WINDOW_KEY)
    (folder,) = (out / "tensorboard").iterdir()
    assert folder.name == f"plain-seed0-{rows[0]['run_id']}"
    events = _events(folder)
    for metric in ("weight_norm", "relearn_steps"):
        expected = sorted((int(r["step"]), float(r["value"])) for r in rows
                          if r["metric"] == metric)
        logged = [(e.step, e.value) for e in events.Scalars(metric)]
        assert expected and [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_profile_and_plasticity_rows_become_scalars():
    from engram.reports.tracking import scalar_rule
    from engram.experiments.plasticity import PLASTICITY_COLUMNS
    from engram.experiments.profile import PROFILE_COLUMNS

    profile = scalar_rule(PROFILE_COLUMNS)
    row = {"epoch": 2, "direction": "least_first", "scope": "layer", "aggregation": "weight",
           "reducer": "mean", "measure": "fisher_exact", "threshold": 0.35, "val_loss": 1.5,
           "val_accuracy": 0.25}
    assert profile(row) == [("val_loss/epoch2/least_first/layer/weight-mean/fisher_exact", 1.5, 35),
                            ("val_accuracy/epoch2/least_first/layer/weight-mean/fisher_exact",
                             0.25, 35)]
    plasticity = scalar_rule(PLASTICITY_COLUMNS)
    assert plasticity({"task": 3, "step": 600, "metric": "dead_units/layer0", "value": 0.5}) \
        == [("dead_units/layer0", 0.5, 600)]
    assert plasticity({"task": "", "step": 900, "metric": "run_complete", "value": 1}) == []


@pytest.mark.parametrize("backend, module", [("tensorboard", "tensorboard"),
                                             ("mlflow", "mlflow")])
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys,
                                                        backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "out"
    assert main(["run", str(_config(tmp_path)), "--out", str(out), "--log", backend]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"engram: error: --log {backend} needs the {module} package: "
                           f"pip install -e \".[{backend}]\"")
    assert not out.exists()


def test_a_failing_backend_says_so_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from engram.reports.tracking import TensorBoardTracker

    def full_disk(self, log, points):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardTracker, "write", full_disk)
    out = tmp_path / "out"
    config = _config(tmp_path, methods=["naive", "ewc"])
    assert main(["run", str(config), "--out", str(out), "-q", "--log", "tensorboard"]) == 0
    err = capsys.readouterr().err
    assert err.count("logging stopped") == 1 and "No space left on device" in err
    assert {r["method"] for r in read_rows(out / "results.csv")
            if r["metric"] == "run_complete"} == {"naive", "ewc"}
