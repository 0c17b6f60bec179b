"""Plasticity problems and their online runner: the target network, the flips, the
permutations, the online error's definition, rows and resume, the command."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from engram.schema import parse_dataclass
from engram.data.problems import (LTUTarget, ProblemConfig, bit_flipping_tasks,
                                  permuted_digits_tasks)
from engram.experiments.plasticity import (PLASTICITY_COLUMNS, PLASTICITY_KEY, PlasticityConfig,
                                           load_plasticity_config, run_plasticity)
from engram.results import read_rows


def test_ltu_target_by_hand():
    w_in = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    b_in = torch.tensor([1.0, -1.0])
    target = LTUTarget(w_in, b_in, torch.tensor([1.0, -1.0]), torch.tensor(1.0),
                       threshold=torch.tensor([0.5, 1.5]))
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    # unit 1: 1 + x0 - x1 > 0.5; unit 2: x0 + x1 - 1 > 1.5 (never with bits)
    assert target(x).tolist() == [2.0, 2.0, 2.0]
    drawn = LTUTarget.draw(4, 3, 0.7, torch.Generator().manual_seed(0))
    assert set(drawn.w_in.unique().tolist()) <= {-1.0, 1.0}
    s = (4 - drawn.w_in.sum(1) + drawn.b_in) / 2  # LoP's S_i
    torch.testing.assert_close(drawn.threshold, 0.7 * 5 - s)


@pytest.mark.parametrize("flip_one", [False, True])
def test_flipping_bits_hold_within_a_task_and_change_between(flip_one):
    cfg = ProblemConfig(n_tasks=6, flip_every=50, n_inputs=8, n_flipping=5, flip_one=flip_one)
    tasks = list(bit_flipping_tasks(cfg, seed=0))
    assert len(tasks) == 6 and all(len(t.train) == 50 for t in tasks)
    flips = [t.train.x[:, :5] for t in tasks]
    assert all(torch.equal(f, f[:1].expand_as(f)) for f in flips)  # constant within a task
    assert any(tasks[0].train.x[:, 5:].std(0) > 0)  # the free bits vary
    changed = [int((a[0] != b[0]).sum()) for a, b in zip(flips, flips[1:])]
    if flip_one:
        assert changed == [1] * 5
    else:
        assert sum(changed) > 5  # all redrawn: usually several bits change
    again = list(bit_flipping_tasks(cfg, seed=0))
    assert all(torch.equal(a.train.y, b.train.y) for a, b in zip(tasks, again))


def test_permuted_tasks_permute_pixels_and_keep_labels():
    images = torch.rand(30, 12)
    labels = torch.arange(30) % 10
    cfg = ProblemConfig(kind="permuted_digits", n_tasks=3, examples_per_task=20)
    tasks = list(permuted_digits_tasks(cfg, images, labels, seed=0))
    for task in tasks:
        assert len(task.train) == 20
        for x, y in zip(task.train.x, task.train.y):  # each row is some image, permuted
            match = [i for i in range(30) if torch.equal(images[i].sort().values, x.sort().values)]
            assert match and labels[match[0]] == y
    assert not torch.equal(tasks[0].train.x[:, :3], tasks[1].train.x[:, :3])


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
    assert report.runs_done == 2 and list(rows[0]) == PLASTICITY_COLUMNS
    per_task = {r["metric"] for r in rows if r["task"] == "1"}
    assert {"online_loss", "dead_units", "effective_rank", "weight_magnitude"} <= per_task
    assert sum(r["metric"] == "online_loss" for r in rows) == 2 * 4
    assert run_plasticity(cfg, tmp_path / "a", show_progress=False).runs_skipped == 2
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


def test_class_stream_cycles_class_groups():
    from engram.data.problems import class_stream_tasks

    images, labels = torch.rand(60, 4), torch.arange(60) % 6
    cfg = ProblemConfig(kind="class_stream", n_tasks=7, classes_per_task=2)
    tasks = list(class_stream_tasks(cfg, images, labels, seed=0))
    groups = [tuple(sorted(t.classes)) for t in tasks]
    assert len(set(groups[:3])) == 3 and groups[3:6] == groups[:3] and groups[6] == groups[0]
    for task in tasks:
        assert set(task.train.y.tolist()) == set(task.classes) and len(task.train) == 20


def test_binned_curves_average_each_seed_then_across_seeds():
    from engram.experiments.plasticity import metric_curves

    rows = [{"metric": "online_loss", "label": "m", "seed": str(s), "task": str(t),
             "value": str(10 * s + t), "run_id": f"r{s}"} for s in (0, 1) for t in range(1, 7)]
    tasks, mean, se, n = metric_curves(rows, "online_loss", bin_tasks=3)["m"]
    assert list(tasks) == [3, 6] and n == 2
    assert list(mean) == [(2 + 12) / 2, (5 + 15) / 2]  # seed bins: 2, 5 and 12, 15
    assert list(se) == pytest.approx([5.0, 5.0])  # sd 10/sqrt(2), over sqrt(2)


def test_an_unknown_problem_is_named_in_the_error():
    from engram.errors import ConfigError

    with pytest.raises(ConfigError, match="problem.kind: unknown plasticity problem 'flipping'; choose one of: bit_flipping"):
        tiny(problem={"kind": "flipping"})


def test_summary_windows_and_standard_errors_by_hand():
    from engram.experiments.plasticity import format_plasticity_summary, plasticity_summary

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
