"""The standard benchmark configs (configs/seq_*.yaml): valid at full scale, and their --smoke
scale runs end to end on CPU on small written files of the real formats."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engram.config import load_config
from engram.errors import ConfigError
from engram.results import read_rows
from tests.test_image_sources import write_preset, write_tiny

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BENCHMARKS = {"seq_cifar10": ("cifar10", 5, 2), "seq_cifar100": ("cifar100", 10, 10),
              "seq_tinyimagenet": ("tiny_imagenet", 10, 20)}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_the_full_scale_is_the_papers_setting(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    source, n_tasks, per_task = BENCHMARKS[name]
    assert (cfg.data.source, cfg.stream.n_tasks, cfg.stream.classes_per_task) == (
        source, n_tasks, per_task)
    assert cfg.stream.scenario == "class" and cfg.model.kind == "resnet18"
    assert (cfg.train.optimizer, cfg.train.batch_size) == ("sgd", 32)
    assert cfg.train.epochs == (100 if source == "tiny_imagenet" else 50)  # DER's Sec. 4
    assert cfg.train.augment.crop_padding == 4 and cfg.train.augment.flip
    names = [spec.name for spec in cfg.methods]
    assert {"naive", "joint", "replay", "der", "derpp", "er_ace", "icarl"} <= set(names)
    smoke = load_config(CONFIGS / f"{name}.yaml", smoke=True)
    assert (smoke.model.kind, smoke.train.epochs, smoke.seeds) == ("resnet18_slim", 1, [0])


def test_smoke_needs_a_smoke_list():
    with pytest.raises(ConfigError, match="has no smoke: list"):
        load_config(CONFIGS / "demo.yaml", smoke=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_the_smoke_scale_runs_on_written_files(tmp_path, name):
    from engram.cli import main

    source = BENCHMARKS[name][0]
    if source == "tiny_imagenet":  # 8x8 images: a ResNet's strides need more than 2x2
        path = tmp_path / "data"
        write_tiny(path, per_class=1, val_per_class=1, size=8,
                   wnids=[f"n{i:04d}" for i in range(200)])
    else:
        path = write_preset(source, tmp_path / "data")
    out = tmp_path / "out"
    start = time.perf_counter()
    assert main(["run", str(CONFIGS / f"{name}.yaml"), "--smoke", f"data.path={path}",
                 "--out", str(out), "-q"]) == 0
    print(f"{name} --smoke: {time.perf_counter() - start:.1f} s")
    rows = read_rows(out / "results.csv")
    n_tasks = BENCHMARKS[name][1]
    accuracy = [r for r in rows if r["metric"] == "accuracy" and r["split"] == "test"
                and int(r["task_trained"]) == n_tasks]
    assert sorted({r["method"] for r in accuracy}) == ["derpp", "joint", "naive", "replay"]
    assert len(accuracy) == 4 * n_tasks  # every task evaluated after the last, per method


def test_loading_leaves_the_callers_dict_alone():
    from engram.config import load_config_dict

    raw = {"seeds": [0], "smoke": ["seeds=[1]"], "train": {"epochs": 3}}
    assert load_config_dict(raw, ["train.epochs=2"], smoke=True).seeds == [1]
    assert raw == {"seeds": [0], "smoke": ["seeds=[1]"], "train": {"epochs": 3}}
    assert load_config_dict(raw, smoke=True).seeds == [1]  # the smoke list is still there
