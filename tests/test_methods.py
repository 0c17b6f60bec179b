"""Registry-parametrized tests: every registered method, without a test written for it.

For each method: the loss stays finite, the parameters change, the state round-trips
through a weights-only checkpoint, and the same seed gives identical result rows.
"""

from __future__ import annotations

import io

import pytest
import torch

from engram.config import parse_method
from engram.data import DATASETS, build_stream
from engram.methods import METHODS, Context
from engram.methods.base import penalty_value
from engram.models import build_model
from engram.results import read_rows
from engram.experiments.continual import run_experiment
from engram.training import train_task
from tests.conftest import tiny_config

ALL_METHODS = METHODS.names()


def _context(cfg, seed=0):
    source = DATASETS.get(cfg.data.source)(None)
    stream = build_stream(source, cfg.data, cfg.stream, seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, stream.input_shape, stream.n_heads, stream.head_dim)
    return Context(model=model, stream=stream, train_cfg=cfg.train,
                   generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def _train_two_tasks(name, scenario="class"):
    """Train a fresh model with the method's defaults on tasks 1 and 2 of a tiny stream."""
    cfg = tiny_config(stream={"scenario": scenario})
    ctx = _context(cfg)
    method = METHODS.get(name)(parse_method(name, {}, "test").params)
    ctx.model = method.prepare_model(ctx.model, ctx)  # as run_one does: a wrapper, or the same
    initial = [p.detach().clone() for p in ctx.model.parameters()]
    losses = []
    for task in ctx.stream.tasks[:2]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: losses.append(loss))
    return ctx, method, losses, initial


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_method_trains_with_finite_loss_and_changes_parameters(name, scenario):
    ctx, method, losses, before = _train_two_tasks(name, scenario)
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    changed = [not torch.equal(b, p) for b, p in zip(before, ctx.model.parameters())]
    assert any(changed), f"{name} left every parameter unchanged"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_state_round_trips_through_weights_only_load(name):
    ctx, method, _, _ = _train_two_tasks(name)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = METHODS.get(name)(method.params)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    original, loaded = method.state_dict(), restored.state_dict()
    assert original.keys() == loaded.keys()
    flat = lambda tree: list(_leaves(tree))  # noqa: E731
    for a, b in zip(flat(original), flat(loaded), strict=True):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
    state = ctx.generator.get_state()  # a penalty may draw (pseudo-rehearsal's random inputs)
    penalty_a = penalty_value(method, ctx)
    ctx.generator.set_state(state)
    penalty_b = penalty_value(restored, ctx)
    assert (penalty_a is None) == (penalty_b is None)
    if penalty_a is not None:
        assert torch.equal(penalty_a, penalty_b)


def _leaves(tree):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key])
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _leaves(item)
    else:
        yield tree


@pytest.mark.parametrize("name", ALL_METHODS)
def test_same_seed_gives_identical_rows(name, tmp_path):
    cfg = tiny_config(methods=[name], seeds=[3])
    rows = []
    for folder in ("a", "b"):
        run_experiment(cfg, tmp_path / folder, show_progress=False)
        rows.append([{k: v for k, v in r.items()} for r in read_rows(tmp_path / folder / "results.csv")
                     if r["metric"] != "train_seconds"])
    assert rows[0] == rows[1]
    assert len(rows[0]) > 10


def test_every_method_has_params_dataclass_and_docstring():
    for entry in METHODS.entries():
        assert entry.obj.__doc__ and entry.obj.__module__
        module = __import__(entry.obj.__module__, fromlist=["_"])
        assert module.__doc__ and len(module.__doc__) > 80, f"{entry.name} needs a module docstring"
        entry.obj.Params()  # every parameter has a default


def test_every_task_end_records_the_methods_extra_bytes(tmp_path):
    """The memory bill: joint keeps every seen task's training set, naive keeps nothing."""
    cfg = tiny_config(methods=["naive", "joint"])
    rows = read_rows(run_experiment(cfg, tmp_path, show_progress=False).results)
    source = DATASETS.get("digits")(None)
    stream = build_stream(source, cfg.data, cfg.stream, seed=0)
    task_bytes = [sum(part.numel() * part.element_size() for part in task.train)
                  for task in stream.tasks]
    for method, expected in (("naive", [0] * len(task_bytes)),
                             ("joint", [sum(task_bytes[:t + 1]) for t in range(len(task_bytes))])):
        recorded = [float(r["value"]) for r in rows
                    if r["method"] == method and r["metric"] == "extra_bytes"]
        assert recorded == expected
