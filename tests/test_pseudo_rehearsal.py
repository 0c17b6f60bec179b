"""Pseudo-rehearsal: LwF's distillation on fresh uniform random inputs; no data is kept."""

from __future__ import annotations

import copy

import pytest
import torch

from engram.methods.lwf import distillation
from engram.methods.pseudo_rehearsal import PseudoRehearsal
from tests.conftest import tiny_config
from tests.test_methods import _context, _train_two_tasks


def _at_second_task(scenario: str, **params):
    ctx = _context(tiny_config(stream={"scenario": scenario}))
    method = PseudoRehearsal(PseudoRehearsal.Params(**params))
    for task in ctx.stream.tasks[:2]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        method.before_task(ctx)
    return ctx, method


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_penalty_is_distillation_on_uniform_random_inputs_and_changes_the_gradient(scenario):
    ctx, method = _at_second_task(scenario, strength=2.0, temperature=3.0, pseudo_batch_size=7)
    old_model = copy.deepcopy(ctx.model)
    with torch.no_grad():  # move away from the frozen copy, else the distillation gradient is 0
        for p in ctx.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = ctx.generator.get_state()
    penalty = method.penalty(ctx)

    # by hand: the same draws, the earlier outputs of both networks
    u = torch.rand((7,) + tuple(ctx.stream.input_shape),
                   generator=torch.Generator().set_state(state))
    assert 0.0 <= float(u.min()) and float(u.max()) <= 1.0

    def earlier(model):
        if scenario == "task":  # task 1's head of every random input
            return model(u, torch.zeros(7, dtype=torch.long))
        logits = model(u)
        return logits[:, torch.unique(ctx.stream.tasks[0].train.y)] if scenario == "class" else logits

    with torch.no_grad():
        target = earlier(old_model)
    expected = 2.0 * distillation(target, earlier(ctx.model), 3.0)
    torch.testing.assert_close(penalty, expected)
    grads = torch.autograd.grad(penalty, list(ctx.model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_fresh_inputs_every_step():
    ctx, method = _at_second_task("class", pseudo_batch_size=4)
    first = method.distillation_inputs(ctx)
    second = method.distillation_inputs(ctx)
    assert first.shape == (4,) + tuple(ctx.stream.input_shape)
    assert not torch.equal(first, second)


def test_stores_no_training_inputs_only_the_frozen_network():
    ctx, method, _, _ = _train_two_tasks("pseudo_rehearsal")
    method.before_task(ctx)  # freeze the network trained on task 2, as a third task would
    stored = [t for t in method.state_dict()["old_model"].values()]
    model_bytes = sum(p.numel() * p.element_size() for p in ctx.model.parameters())
    columns_bytes = method.old_columns.numel() * 8  # class-IL: which classes are earlier (int64)
    assert method.extra_bytes() == model_bytes + columns_bytes
    input_dims = tuple(ctx.stream.input_shape)
    assert not any(tuple(t.shape[1:]) == input_dims for t in stored)  # no images among them
