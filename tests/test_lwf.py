"""LwF: distillation targets come from the frozen previous model, per scenario."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram.methods.lwf import LwF, distillation
from tests.conftest import tiny_config
from tests.test_methods import _context


def test_distillation_matches_the_formula():
    old = torch.tensor([[2.0, 0.0, -1.0]])
    new = torch.tensor([[0.0, 1.0, 0.0]])
    p = torch.softmax(old / 2, -1)
    expected = -(p * torch.log_softmax(new / 2, -1)).sum()
    torch.testing.assert_close(distillation(old, new, 2.0), expected)
    same = distillation(old, old, 2.0)
    assert same < distillation(old, new, 2.0)  # minimised (over new) by new == old


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_penalty_distils_earlier_outputs_and_changes_the_gradient(scenario):
    ctx = _context(tiny_config(stream={"scenario": scenario}))
    method = LwF(LwF.Params(strength=1.5, temperature=2.0))
    ctx.seen_tasks = [ctx.stream.tasks[0]]
    ctx.task = ctx.stream.tasks[0]
    method.before_task(ctx)
    assert method.old_model is None and method.penalty(ctx) is None  # nothing to keep yet
    ctx.seen_tasks.append(ctx.stream.tasks[1])
    ctx.task = ctx.stream.tasks[1]
    method.before_task(ctx)
    old = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx.batch = ctx.task.train
    x = ctx.batch.x[:16]
    ctx.batch = type(ctx.batch)(x, ctx.batch.y[:16], ctx.batch.task[:16])
    penalty = method.penalty(ctx)

    # by hand: the earlier outputs of a model with the old weights vs the current weights
    def earlier(params):
        raw = torch.func.functional_call(ctx.model, params, (x,), {"task": None}) \
            if scenario != "task" else None
        if scenario == "task":
            features = torch.func.functional_call(ctx.model.body, {k[5:]: v for k, v in params.items()
                                                                   if k.startswith("body.")}, (x,))
            full = F.linear(features, params["head.weight"], params["head.bias"])
            return full.view(len(x), ctx.model.n_heads, ctx.model.head_dim)[:, 0]
        if scenario == "class":
            return raw[:, torch.unique(ctx.stream.tasks[0].train.y)]
        return raw
    current = dict(ctx.model.named_parameters())
    expected = 1.5 * distillation(earlier(old).detach(), earlier(current), 2.0)
    torch.testing.assert_close(penalty, expected)
    grads = torch.autograd.grad(penalty, list(ctx.model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
