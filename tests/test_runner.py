"""The runner: rows as measured, resume after a real kill, and the errors users meet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from engram.config import config_to_dict
from engram.errors import ConfigError, DivergenceError, EngramError
from engram.results import COLUMNS, ResultWriter, read_rows, row_key
from engram.experiments.continual import run_experiment
from engram.experiments.harness import resolve_device
from engram.results import accuracy_matrices
from tests.conftest import tiny_config


def _comparable(rows):
    """Rows without wall-clock timings, sorted by key, for run-to-run comparison."""
    kept = [r for r in rows if r["metric"] != "train_seconds"]
    return sorted(kept, key=lambda r: (row_key(r), r["value"]))


def test_rows_build_a_full_accuracy_matrix_and_untrained_baseline(tmp_path):
    cfg = tiny_config(train={"eval_every": 1, "epochs": 2, "eval_splits": ["val", "test"]},
                      data={"val_fraction": 0.1})
    run_experiment(cfg, tmp_path, show_progress=False)
    rows = read_rows(tmp_path / "results.csv")
    assert set(rows[0]) == set(COLUMNS)
    assert len({row_key(r) for r in rows}) == len(rows), "duplicate rows"
    (matrix,) = accuracy_matrices(rows)
    assert matrix.complete and matrix.R.shape == (3, 3)
    assert not torch.isnan(torch.tensor(matrix.R)).any()
    assert not torch.isnan(torch.tensor(matrix.baseline)).any()
    # the in-task evaluation (epoch 1) is a curve point, the end-of-task one fills R
    assert {r["epoch"] for r in rows if r["metric"] == "accuracy" and r["task_trained"] == "1"} \
        == {"1", "2"}
    assert {r["split"] for r in rows if r["metric"] == "accuracy"} == {"val", "test"}


def _write_config(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def _engram(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "engram", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize("checkpoint_seconds", [0.0, 1000.0], ids=["from-checkpoint", "from-start"])
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, checkpoint_seconds):
    """Kill `engram run` half way with SIGKILL, resume it, compare with a clean run."""
    cfg = tiny_config(methods=["naive", "replay"], seeds=[0, 1],
                      train={"epochs": 15, "eval_every": 5}, checkpoint_seconds=checkpoint_seconds,
                      data={"limit": 600})
    config = _write_config(tmp_path, cfg)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    process = _engram("run", str(config), "--out", str(killed), "-q")
    results = killed / "results.csv"
    deadline = time.time() + 60
    total_runs = 4
    while time.time() < deadline:  # wait until about half the runs are done, then kill
        if results.exists():
            text = results.read_text()
            if text.count("run_complete") >= total_runs // 2 and text.count("\n") > 5:
                break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_rows(results)
    assert 0 < sum(r["metric"] == "run_complete" for r in partial) < total_runs, \
        "the kill should land half way; make the runs longer if this fails"

    resumed = _engram("run", str(config), "--out", str(killed), "--resume", "-q")
    assert resumed.wait(120) == 0, resumed.stderr.read().decode()
    uninterrupted = _engram("run", str(config), "--out", str(clean), "-q")
    assert uninterrupted.wait(120) == 0, uninterrupted.stderr.read().decode()

    after_resume = read_rows(results)
    assert len({row_key(r) for r in after_resume}) == len(after_resume), "duplicates after resume"
    assert _comparable(after_resume) == _comparable(read_rows(clean / "results.csv"))
    for row in partial:  # nothing written before the kill was lost or changed
        assert row in after_resume
    assert not (killed / "checkpoints").exists()


def test_completed_runs_are_skipped_on_resume(tmp_path):
    cfg = tiny_config()
    run_experiment(cfg, tmp_path, show_progress=False)
    before = (tmp_path / "results.csv").read_text()
    run_experiment(cfg, tmp_path, show_progress=False)
    assert (tmp_path / "results.csv").read_text() == before


def test_a_rerun_with_more_seeds_runs_only_the_new_seed(tmp_path):
    """Rerunning resumes (no --resume needed); a seed added to the config runs, alone."""
    run_experiment(tiny_config(seeds=[0]), tmp_path, show_progress=False)
    report = run_experiment(tiny_config(seeds=[0, 1]), tmp_path, show_progress=False)
    assert (report.total, report.skipped, report.completed) == (2, 1, 1)
    assert {r["seed"] for r in read_rows(tmp_path / "results.csv")} == {"0", "1"}


def test_resume_with_a_different_config_is_refused(tmp_path):
    run_experiment(tiny_config(), tmp_path, show_progress=False)
    with pytest.raises(EngramError, match=r"holds another experiment \(train.lr: 0.05 there, "
                                          r"0.01 here\); .*only seeds may grow"):
        run_experiment(tiny_config(train={"lr": 0.01}), tmp_path, show_progress=False)


def test_half_written_last_line_is_cut_before_appending(tmp_path):
    path = tmp_path / "results.csv"
    cfg = tiny_config()
    run_experiment(cfg, tmp_path, show_progress=False)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:10])  # killed in the middle of a row
    with ResultWriter(path) as writer:
        assert len(writer.keys) == 4
    assert path.read_text() == "".join(lines[:5])


def test_unreadable_checkpoint_names_the_file(tmp_path):
    cfg = tiny_config()
    from engram.experiments.continual import continual_run_id as run_id
    (tmp_path / "checkpoints").mkdir(parents=True)
    bad = tmp_path / "checkpoints" / f"{run_id(cfg, cfg.methods[0], 0)}.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EngramError, match=r"checkpoint .*\.pt cannot be read"):
        run_experiment(cfg, tmp_path, show_progress=False)


def test_divergence_stops_with_a_clear_message(tmp_path):
    # lambda * F * lr far above 2: the quadratic penalty makes SGD oscillate and blow up
    cfg = tiny_config(methods=[{"name": "ewc", "strength": 1e9}])
    with pytest.raises(DivergenceError, match=r"diverged on task 2 .* lower train.lr"):
        run_experiment(cfg, tmp_path, show_progress=False)
    # rows measured before the divergence (the untrained evaluation) are kept
    assert any(r["task_trained"] == "0" for r in read_rows(tmp_path / "results.csv"))


def test_device_errors_name_the_key():
    with pytest.raises(ConfigError, match="device: 'gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_with_data_on_the_device(tmp_path):
    cfg = tiny_config(device="cuda", methods=["naive", "ewc", "replay", "joint"])
    run_experiment(cfg, tmp_path, show_progress=False)
    assert sum(r["metric"] == "run_complete" for r in read_rows(tmp_path / "results.csv")) == 4


def test_summary_uses_validation_when_no_test_split_was_measured(tmp_path):
    from engram.reports.tables import summary_table
    cfg = tiny_config(train={"eval_splits": ["val"]}, data={"val_fraction": 0.2})
    run_experiment(cfg, tmp_path, show_progress=False)
    (entry,) = summary_table(read_rows(tmp_path / "results.csv"))
    assert entry["n_seeds"] == 1 and 0 <= entry["average_accuracy"][0] <= 1


def test_checkpoints_without_results_are_not_resumed_silently(tmp_path):
    """A checkpoint left behind by deleted results must not make a fresh run skip tasks."""
    cfg = tiny_config(checkpoint_seconds=0.0)
    run_experiment(cfg, tmp_path / "a", show_progress=False)
    expected = _comparable(read_rows(tmp_path / "a" / "results.csv"))
    from engram.experiments.continual import continual_run_id as run_id
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    stale = tmp_path / "b" / "checkpoints" / f"{run_id(cfg, cfg.methods[0], 0)}.pt"
    torch.save({"model": {}, "method": {}, "generator": torch.Generator().get_state(),
                "step": 99, "tasks_done": 2}, stale)
    run_experiment(cfg, tmp_path / "b", show_progress=False)
    assert _comparable(read_rows(tmp_path / "b" / "results.csv")) == expected


def _stop_in_task(monkeypatch, index: int) -> None:
    """Make train_task raise KeyboardInterrupt when it reaches task `index` (0-based): a kill
    between that task's start and its end, after the checkpoint of the task before it."""
    import engram.experiments.continual as runner
    real_train_task = runner.train_task

    def stop(ctx, method, on_epoch):
        if ctx.task.index == index:
            raise KeyboardInterrupt
        real_train_task(ctx, method, on_epoch)

    monkeypatch.setattr(runner, "train_task", stop)


def test_a_checkpoint_ahead_of_the_results_is_not_resumed(tmp_path, monkeypatch):
    """A sweep worker can checkpoint a task whose rows its killed parent never wrote; resuming
    that checkpoint would leave the task without rows, so the run starts over instead."""
    import csv

    from engram.results import COLUMNS

    cfg = tiny_config(checkpoint_seconds=0.0)  # a checkpoint after every task but the last
    run_experiment(cfg, tmp_path / "full", show_progress=False)
    _stop_in_task(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", show_progress=False)
    monkeypatch.undo()
    assert len(list((tmp_path / "cut" / "checkpoints").glob("*.pt"))) == 1  # after task 2
    results = tmp_path / "cut" / "results.csv"
    kept = [r for r in read_rows(results) if r["task_trained"] != "2"]  # task 2's rows lost
    with open(results, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    run_experiment(cfg, tmp_path / "cut", show_progress=False)

    def measured(path):
        return sorted((r["task_trained"], r["epoch"], r["task_eval"], r["split"], r["metric"],
                       r["value"]) for r in read_rows(path / "results.csv")
                      if r["metric"] != "train_seconds")

    assert measured(tmp_path / "cut") == measured(tmp_path / "full")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device,old_checkpoint", [
    ("cpu", False), ("cpu", True), pytest.param("cuda", False, marks=CUDA)],
    ids=["checkpoint", "old-checkpoint", "cuda"])
def test_resume_with_dropout_matches_an_uninterrupted_run(tmp_path, monkeypatch, device,
                                                          old_checkpoint):
    """Dropout masks come from torch's global RNG, not the run's generator: the checkpoint
    must carry that state too, or the resumed tasks draw other masks. A checkpoint from an
    engram that did not save it is not resumed: the run starts over, with the same numbers."""
    cfg = tiny_config(model={"kind": "mlp", "hidden": [32], "dropout": 0.3},
                      stream={"n_tasks": 4}, checkpoint_seconds=0.0, device=device)
    run_experiment(cfg, tmp_path / "full", show_progress=False)
    _stop_in_task(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", show_progress=False)
    monkeypatch.undo()
    (checkpoint,) = (tmp_path / "cut" / "checkpoints").glob("*.pt")  # after task 2
    if old_checkpoint:
        state = torch.load(checkpoint, weights_only=True)
        del state["global_rng"]
        torch.save(state, checkpoint)
    run_experiment(cfg, tmp_path / "cut", show_progress=False)
    assert _comparable(read_rows(tmp_path / "cut" / "results.csv")) == \
        _comparable(read_rows(tmp_path / "full" / "results.csv"))


def test_run_ids_are_those_earlier_engrams_wrote():
    """The harness's one run-id function hashes the same description as before, so folders
    written before the harness resume under it (values computed with the code before it)."""
    from engram.cli import DEMO_CONFIG
    from engram.config import load_config
    from engram.experiments.continual import continual_run_id

    cfg = load_config(DEMO_CONFIG)
    assert [continual_run_id(cfg, m, 0) for m in cfg.methods] == \
        ["b8e49b8e7a5f", "cecfb60d43ba", "2a45c97954b6", "96e348da404f"]
