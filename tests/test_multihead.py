"""Multi-head with a frozen trunk: the trunk stops after N tasks, old tasks stop moving."""

from __future__ import annotations

import copy

import pytest
import torch

from engram.methods.multihead import MultiHead
from engram.training import evaluate, train_task
from tests.conftest import tiny_config
from tests.test_methods import _context


def _train(freeze_after: int, n_tasks: int = 3, **train):
    ctx = _context(tiny_config(stream={"scenario": "task"}, train=train or {"epochs": 2}))
    method = MultiHead(MultiHead.Params(freeze_trunk_after=freeze_after))
    bodies, accuracies = [], []
    for task in ctx.stream.tasks[:n_tasks]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: None)
        bodies.append(copy.deepcopy(ctx.model.body.state_dict()))
        accuracies.append(evaluate(ctx.model, ctx.stream.tasks[0].test))
    return ctx, bodies, accuracies


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_trunk_is_bit_identical_after_it_freezes_and_task_one_does_not_move(optimizer, weight_decay):
    # frozen parameters get no gradient, so not even weight decay touches them
    ctx, bodies, accuracies = _train(1, optimizer=optimizer, weight_decay=weight_decay, epochs=2,
                                     momentum=0.9 if optimizer == "sgd" else 0.0)
    for later in bodies[1:]:
        for name, value in bodies[0].items():
            assert torch.equal(value, later[name]), name
    if weight_decay == 0:  # decay would shrink task 1's head, which shares the head layer
        assert accuracies[0] == accuracies[1] == accuracies[2]


def test_never_freezing_is_fine_tuning():
    _, bodies, _ = _train(0, n_tasks=2)
    assert any(not torch.equal(bodies[0][k], bodies[1][k]) for k in bodies[0])


def test_trunk_trains_until_task_n():
    _, bodies, _ = _train(2)
    assert any(not torch.equal(bodies[0][k], bodies[1][k]) for k in bodies[0])
    assert all(torch.equal(bodies[1][k], bodies[2][k]) for k in bodies[1])
