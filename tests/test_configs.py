"""Every shipped config validates, and each one whose data is here runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram.config import load_config
from engram.errors import DataError
from engram.results import read_rows
from engram.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"
QUICK = ["train.epochs=1", "seeds=[0]", "plots=false", "data.limit=300"]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "naive_split_digits.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_validates_and_runs_when_its_data_is_here(path, tmp_path, monkeypatch):
    cfg = load_config(path, QUICK)
    if cfg.data.source == "cifar10":
        with pytest.raises(DataError, match="cifar-10-batches-py"):
            run_experiment(cfg, tmp_path, show_progress=False)
        return
    if cfg.data.source == "mnist":
        if not MNIST.is_dir():
            pytest.skip("the MNIST test set is not at ../shared/data/mnist-t10k")
        monkeypatch.chdir(ROOT)  # the config names the data folder relative to the repository
    run_experiment(cfg, tmp_path, show_progress=False)
    rows = read_rows(tmp_path / "results.csv")
    assert sum(r["metric"] == "run_complete" for r in rows) == len(cfg.methods)
