"""The online plasticity runner and its reports: the online error's definition, rows and
resume on the harness, workers, failures, the command, the curves and the summary. The
problems themselves are tests/test_problems.py."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from engram.schema import parse_dataclass
from engram.experiments.plasticity import (PLASTICITY_COLUMNS, PLASTICITY_KEY, PlasticityConfig,
                                           load_plasticity_config, run_plasticity)
from engram.results import read_rows


def tiny(**raw) -> PlasticityConfig:
    base = {"seeds": [0, 1], "problem": {"n_tasks": 4, "flip_every": 200, "probe_size": 50},
            "model": {"hidden": [5]}}
    base.update(raw)
    methods = base.pop("methods", None)
    cfg = parse_dataclass(PlasticityConfig, base)
    if methods:
        from engram.config import parse_methods
        cfg.methods = parse_methods(methods)
    return cfg


@pytest.mark.parametrize("method", ["naive", "replay"])
def test_online_error_is_the_loss_before_each_update(tmp_path, method):
    """With lr 0 nothing is learned, so the online loss of a task is the plain loss of the
    fixed network on it, and online accuracy its plain accuracy; with replay too: online
    error counts the step's new examples only, not the remembered ones mixed in."""
    from engram.models import build_model
    from engram.experiments.plasticity import problem_tasks

    for kind in ("bit_flipping", "permuted_digits"):
        cfg = tiny(seeds=[0], train={"epochs": 1, "batch_size": 1, "lr": 0.0},
                   methods=[{"name": method}] if method == "naive" else
                   [{"name": method, "memory": 20, "replay_batch_size": 3}],
                   problem={"kind": kind, "n_tasks": 2, "flip_every": 100, "examples_per_task": 100})
        run_plasticity(cfg, tmp_path / kind, show_progress=False)
        rows = read_rows(tmp_path / kind / "results.csv", PLASTICITY_COLUMNS, PLASTICITY_KEY)
        tasks, shape, outputs, _ = problem_tasks(cfg, 0)
        torch.manual_seed(0)
        model = build_model(cfg.model, shape, 1, outputs)
        with torch.no_grad():
            for task in tasks:
                out = model(task.train.x)
                expected = {}
                if kind == "bit_flipping":
                    expected["online_loss"] = F.mse_loss(out.squeeze(-1), task.train.y)
                else:
                    expected["online_loss"] = F.cross_entropy(out, task.train.y)
                    expected["online_accuracy"] = (out.argmax(1) == task.train.y).float().mean()
                for metric, want in expected.items():
                    (value,) = [float(r["value"]) for r in rows
                                if r["metric"] == metric and r["task"] == str(task.index + 1)]
                    assert value == pytest.approx(float(want), rel=1e-4), (kind, metric)


def test_rows_per_task_rerun_skips_and_a_cut_run_finishes_without_duplicates(tmp_path):
    cfg = tiny()
    report = run_plasticity(cfg, tmp_path / "a", show_progress=False)
    rows = read_rows(tmp_path / "a" / "results.csv", PLASTICITY_COLUMNS, PLASTICITY_KEY)
    assert (report.completed, report.skipped) == (2, 0) and list(rows[0]) == PLASTICITY_COLUMNS
    per_task = {r["metric"] for r in rows if r["task"] == "1"}
    assert {"online_loss", "dead_units", "effective_rank", "weight_magnitude"} <= per_task
    assert sum(r["metric"] == "online_loss" for r in rows) == 2 * 4
    assert run_plasticity(cfg, tmp_path / "a", show_progress=False).skipped == 2
    lines = (tmp_path / "a" / "results.csv").read_text().splitlines(keepends=True)
    cut = tmp_path / "b"
    cut.mkdir()
    shutil.copy(tmp_path / "a" / "experiment.json", cut)  # the folder's experiment record
    (cut / "results.csv").write_text("".join(lines[: len(lines) // 2]))
    run_plasticity(cfg, cut, show_progress=False)
    resumed = read_rows(cut / "results.csv", PLASTICITY_COLUMNS, PLASTICITY_KEY)
    key = lambda r: tuple(r[k] for k in PLASTICITY_KEY)  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, rows))
    assert {key(r): r["value"] for r in resumed} == {key(r): r["value"] for r in rows}


def test_cli_runs_and_plots(tmp_path, capsys):
    from engram.cli import main

    config = tmp_path / "p.yaml"
    config.write_text("seeds: [0, 1]\nproblem: {n_tasks: 3, flip_every: 100, probe_size: 20}\n"
                      "model: {hidden: [4]}\nmethods: [naive]\n")
    assert main(["plasticity", str(config), "--out", str(tmp_path / "o"), "-q"]) == 0
    assert (tmp_path / "o" / "plots" / "plasticity.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plasticity", str(config), "train.epochs=3", "--out", str(tmp_path / "o")]) == 2
    assert "learned online" in capsys.readouterr().err


def test_shipped_plasticity_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "plasticity").glob("*.yaml")):
        cfg = load_plasticity_config(path)
        assert cfg.problem.n_tasks >= 10 and math.isfinite(cfg.train.lr)


def test_parallel_workers_write_the_same_rows(tmp_path):
    cfg = tiny()
    run_plasticity(cfg, tmp_path / "one", show_progress=False)
    run_plasticity(cfg, tmp_path / "two", show_progress=False, workers=2)
    rows = [read_rows(tmp_path / d / "results.csv", PLASTICITY_COLUMNS, PLASTICITY_KEY)
            for d in ("one", "two")]
    key = lambda r: tuple(r[k] for k in PLASTICITY_KEY)  # noqa: E731
    assert {key(r): r["value"] for r in rows[0]} == {key(r): r["value"] for r in rows[1]}


def test_binned_curves_average_each_seed_then_across_seeds():
    from engram.reports.plasticity import metric_curves

    rows = [{"metric": "online_loss", "label": "m", "seed": str(s), "task": str(t),
             "value": str(10 * s + t), "run_id": f"r{s}"} for s in (0, 1) for t in range(1, 7)]
    tasks, mean, se, n = metric_curves(rows, "online_loss", bin_tasks=3)["m"]
    assert list(tasks) == [3, 6] and n == 2
    assert list(mean) == [(2 + 12) / 2, (5 + 15) / 2]  # seed bins: 2, 5 and 12, 15
    assert list(se) == pytest.approx([5.0, 5.0])  # sd 10/sqrt(2), over sqrt(2)


def test_summary_windows_and_standard_errors_by_hand():
    from engram.reports.plasticity import format_plasticity_summary, plasticity_summary

    # 10 tasks: early = tasks 2-3, late = tasks 9-10; value = seed * 10 + task
    rows = [{"metric": "online_loss", "label": "m", "seed": str(s), "task": str(t),
             "value": str(10 * s + t), "run_id": f"r{s}"} for s in (0, 1) for t in range(1, 11)]
    (entry,) = plasticity_summary(rows)
    assert entry["early_tasks"] == (2, 3) and entry["late_tasks"] == (9, 10)
    assert entry["early"][0] == pytest.approx((2.5 + 12.5) / 2)
    assert entry["late"][0] == pytest.approx((9.5 + 19.5) / 2)
    assert entry["late"][1] == pytest.approx(5.0)  # sd 10/sqrt(2), over sqrt(2)
    assert "tasks 2-3 -> tasks 9-10" in format_plasticity_summary([entry])


def test_a_diverging_run_names_its_method_seed_and_task(tmp_path):
    from engram.errors import DivergenceError

    cfg = tiny(seeds=[3], train={"epochs": 1, "batch_size": 1, "lr": 1e6},
               methods=[{"name": "l2_init", "strength": 0.5}],
               problem={"n_tasks": 2, "flip_every": 50})
    with pytest.raises(DivergenceError,
                       match=r"^l2_init\(strength=0\.5\) seed 3: training diverged on task 1 "):
        run_plasticity(cfg, tmp_path, show_progress=False)


def _diverging(seeds: list[int]) -> PlasticityConfig:
    return tiny(seeds=seeds, train={"epochs": 1, "batch_size": 1, "lr": 1e6},
                methods=[{"name": "l2_init", "strength": 0.5}],
                problem={"n_tasks": 2, "flip_every": 50})


def test_a_run_diverging_in_a_worker_raises_the_same_error(tmp_path):
    from engram.errors import DivergenceError

    with pytest.raises(DivergenceError,
                       match=r"^l2_init\(strength=0\.5\) seed 3: training diverged on task 1 "):
        run_plasticity(_diverging([3, 4]), tmp_path, show_progress=False, workers=2)


def test_failures_are_reported_and_the_command_lists_them(tmp_path, capsys):
    import yaml

    from engram.cli import main
    from engram.experiments.plasticity import plasticity_config_dict

    report = run_plasticity(_diverging([3, 4]), tmp_path / "lib", show_progress=False,
                            raise_failures=False)
    assert (report.total, report.completed, report.skipped) == (2, 0, 0)
    assert [(f["label"], f["seed"]) for f in report.failures] == [("l2_init(strength=0.5)", 3),
                                                                  ("l2_init(strength=0.5)", 4)]
    assert report.failures[0]["error"].startswith(
        "DivergenceError: training diverged on task 1 ")  # label and seed have their own fields
    assert (tmp_path / "lib" / "failures.jsonl").read_text().count("\n") == 2

    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(plasticity_config_dict(_diverging([3]))))
    assert main(["plasticity", str(config), "--out", str(tmp_path / "cli"), "-q"]) == 1
    captured = capsys.readouterr()
    assert "0 runs done, 0 already there" in captured.out
    assert "1 of 1 runs failed" in captured.err
    assert "l2_init(strength=0.5) seed 3: DivergenceError: training diverged on task 1" \
        in captured.err


def test_run_ids_and_plan_are_those_of_the_folders_already_written():
    """The harness's run id of the same canonical content: folders written before the port
    keep their run ids, so a rerun skips their runs."""
    from engram.experiments.plasticity import plasticity_plan, plasticity_run_id

    cfg = tiny()
    assert [plasticity_run_id(cfg, cfg.methods[0], seed) for seed in cfg.seeds] == \
        ["2f03edf43b86", "216202d46da7"]
    plan = plasticity_plan(tiny(methods=["naive", {"name": "l2_init", "strength": 0.5}]))
    assert [(job.label, job.seed, job.size) for job in plan.jobs] == [
        ("naive", 0, 4), ("l2_init(strength=0.5)", 0, 4), ("naive", 1, 4),
        ("l2_init(strength=0.5)", 1, 4)]
    assert (plan.command, plan.growable, plan.unit) == ("plasticity", ("seeds",), "task")
    assert not {"threads", "device"} & set(plan.identity) and "seeds" in plan.identity


def test_augmentation_is_refused_not_ignored():
    from engram.errors import ConfigError

    with pytest.raises(ConfigError, match="train.augment: the plasticity problems are not "
                                          "images"):
        parse_dataclass(PlasticityConfig, {"train": {"augment": {"flip": True}}})
