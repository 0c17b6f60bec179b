"""Every shipped config validates, and each one whose data is here runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram.config import load_config
from engram.results import read_rows
from engram.experiments.sweep import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if not {"profile", "plasticity", "window"} & set(p.parts))  # own schemas
MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"
QUICK = ["train.epochs=1", "seeds=[0]", "plots=false", "data.limit=300"]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "naive_split_digits.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_validates_and_runs_when_its_data_is_here(path, tmp_path, monkeypatch):
    """A plain config is a one-point sweep, so every config goes through the sweep path."""
    _, jobs = load_sweep(path, QUICK)
    if len({job.payload.cfg.stream.scenario for job in jobs}) > 1:
        overrides = QUICK + ["stream.scenario=class"]  # one scenario is enough to check it runs
        _, jobs = load_sweep(path, overrides)
    else:
        overrides = QUICK
    data = jobs[0].payload.cfg.data
    if data.source in ("cifar10", "cifar100", "tiny_imagenet"):  # files that are not here
        report = run_sweep(path, tmp_path, overrides=overrides, show_progress=False)
        assert report.failures and all(f"{data.path}: no such folder" in f["error"]
                                       for f in report.failures)
        return
    if data.source == "mnist":
        if not MNIST.is_dir():
            pytest.skip("the MNIST test set is not at ../shared/data/mnist-t10k")
        monkeypatch.chdir(ROOT)  # the config names the data folder relative to the repository
    report = run_sweep(path, tmp_path, overrides=overrides, show_progress=False)
    assert report.failures == [] and report.completed == len(jobs)
    rows = read_rows(tmp_path / "results.csv")
    assert sum(r["metric"] == "run_complete" for r in rows) == len(jobs)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_configs_with_one_grid_point_load_for_engram_run(path):
    _, jobs = load_sweep(path, QUICK)
    if len({job.payload.cfg.name for job in jobs}) > 1 or len({job.payload.cfg.stream.scenario for job in jobs}) > 1:
        pytest.skip("a sweep: run it with engram sweep")
    load_config(path, QUICK)
