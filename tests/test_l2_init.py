"""L2 Init: the penalty pulls toward the run's own initial draw; its gradient is
2 lambda (theta - theta_0)."""

from __future__ import annotations

import torch

from engram.config import ModelConfig
from engram.methods.base import Context, penalty_value
from engram.methods.l2_init import L2Init
from engram.models import build_model
from engram.training import finish_gradients


def _setup(strength=0.3):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=[5, 4]), (3,), 1, 2)
    ctx = Context(model=model, stream=None, train_cfg=None, generator=torch.Generator(),
                  device=torch.device("cpu"))
    method = L2Init(L2Init.Params(strength=strength))
    method.prepare_model(model, ctx)
    return model, ctx, method


def test_theta_0_is_the_initial_draw_and_the_penalty_starts_at_zero():
    model, ctx, method = _setup()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert penalty_value(method, ctx).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape))
    method.before_task(ctx)  # later tasks do not move the anchor
    for name in initial:
        assert torch.equal(method.initial[name], initial[name])


def test_penalty_value_and_gradient_match_2_lambda_theta_minus_theta_0():
    model, ctx, method = _setup(strength=0.3)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape))
    expected = 0.3 * sum(((p.detach() - initial[n]) ** 2).sum()
                         for n, p in model.named_parameters())
    penalty = penalty_value(method, ctx)
    torch.testing.assert_close(penalty, expected)
    model.zero_grad()
    penalty.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * 0.3 * (p.detach() - initial[name]))
    model.zero_grad(set_to_none=True)  # what the training loop adds: the same gradient
    finish_gradients([ctx], [method])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * 0.3 * (p.detach() - initial[name]))


def test_a_parameter_added_later_is_anchored_at_its_own_start():
    model, ctx, method = _setup()
    model.extra = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    method.before_task(ctx)
    assert torch.equal(method.initial["extra"], torch.tensor([2.0, -1.0]))
    assert penalty_value(method, ctx).item() == 0.0
