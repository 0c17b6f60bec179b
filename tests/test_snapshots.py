"""Per-task snapshots: each task is evaluated with exactly the weights it ended with."""

from __future__ import annotations

import copy

import torch

from engram.data.streams import TensorSet
from engram.methods.snapshots import SnapshotNet, Snapshots
from engram.results import read_rows
from engram.experiments.continual import run_experiment
from engram.training import evaluate, train_task
from tests.conftest import tiny_config
from tests.test_methods import _context


def _train(scenario: str, n_tasks: int = 3):
    ctx = _context(tiny_config(stream={"scenario": scenario}))
    method = Snapshots()
    models_at_task_end = []
    for task in ctx.stream.tasks[:n_tasks]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: None)
        models_at_task_end.append(copy.deepcopy(ctx.model))
    return ctx, method, models_at_task_end


def test_task_incremental_accuracy_is_exactly_the_stored_models():
    ctx, method, stored = _train("task")
    net = method.eval_model(ctx)
    assert isinstance(net, SnapshotNet)
    for task, model in zip(ctx.stream.tasks, stored):
        assert evaluate(net, task.test) == evaluate(model, task.test)
    # the live model has moved on: task 1 through it differs from its snapshot
    first = ctx.stream.tasks[0].test
    assert evaluate(ctx.model, first) != evaluate(stored[0], first)


def test_a_batch_mixing_tasks_uses_each_examples_own_snapshot():
    ctx, method, stored = _train("task")
    parts = [TensorSet(*(part[:5] for part in task.test)) for task in ctx.stream.tasks]
    x = torch.cat([p.x for p in parts])
    task_ids = torch.cat([p.task for p in parts])
    with torch.no_grad():
        mixed = method.eval_model(ctx)(x, task_ids)
        by_hand = torch.cat([model(p.x, p.task) for model, p in zip(stored, parts)])
    torch.testing.assert_close(mixed, by_hand)


def test_without_task_ids_at_test_the_live_model_is_evaluated():
    for scenario in ("domain", "class"):
        ctx, method, _ = _train(scenario, n_tasks=2)
        assert method.eval_model(ctx) is ctx.model


def test_memory_bill_is_one_model_per_finished_task(tmp_path):
    cfg = tiny_config(stream={"scenario": "task"}, methods=["snapshots"])
    rows = read_rows(run_experiment(cfg, tmp_path, show_progress=False).results)
    ctx = _context(cfg)
    model_bytes = sum(t.numel() * t.element_size() for t in ctx.model.state_dict().values())
    bills = [float(r["value"]) for r in rows if r["metric"] == "extra_bytes"]
    assert bills == [model_bytes * t for t in (1, 2, 3)]


def test_old_tasks_never_move_in_the_accuracy_rows(tmp_path):
    cfg = tiny_config(stream={"scenario": "task"}, methods=["snapshots"])
    rows = read_rows(run_experiment(cfg, tmp_path, show_progress=False).results)
    acc = {(int(r["task_trained"]), int(r["task_eval"])): float(r["value"]) for r in rows
           if r["metric"] == "accuracy" and r["split"] == "test"}
    for task in (1, 2):
        assert acc[(task, task)] == acc[(3, task)]
