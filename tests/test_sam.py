"""SAM's gradient is the task loss's gradient at w + rho g/||g||, and the weights come back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram.methods.sam import SAM
from tests.conftest import tiny_config
from tests.test_methods import _context


def _squared_error(outputs, targets):
    """A regression loss on the class problem: squared distance to the one-hot target."""
    return (outputs - F.one_hot(targets, outputs.shape[1])).pow(2).sum(1).mean()


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, _squared_error])
def test_sam_gradient_is_taken_at_the_perturbed_weights(loss_fn):
    """By hand, with the problem's own loss ctx.loss_fn (SAM used cross-entropy whatever the
    problem's loss was)."""
    ctx = _context(tiny_config())
    ctx.loss_fn = loss_fn
    data = ctx.stream.tasks[0].train
    ctx.batch = type(data)(*(part[:16] for part in data))
    model, params = ctx.model, list(ctx.model.parameters())
    original = [p.detach().clone() for p in params]

    loss = loss_fn(model(ctx.batch.x, ctx.batch.task), ctx.batch.y)
    model.zero_grad()
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    SAM(SAM.Params(rho=0.5)).after_backward(ctx)
    got = torch.cat([p.grad.reshape(-1) for p in params])

    # by hand: a copy of the weights moved by rho g/||g||, plain autograd there
    perturbed = [p.detach() + 0.5 * gp.view_as(p) / g.norm() for p, gp in
                 zip(params, torch.split(g, [p.numel() for p in params]))]
    perturbed = [w.view_as(p).requires_grad_() for w, p in zip(perturbed, params)]
    named = dict(zip([n for n, _ in model.named_parameters()], perturbed))
    out = torch.func.functional_call(model, named, (ctx.batch.x, ctx.batch.task))
    expected = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        loss_fn(out, ctx.batch.y), perturbed)])
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, g)  # the update really changed
    for p, w in zip(params, original):
        torch.testing.assert_close(p.detach(), w)  # weights restored after the probe


def test_sam_in_the_window_experiment_uses_its_squared_error():
    """The sliding window's targets are real vectors: SAM's gradient there is the squared
    error's at the perturbed weights (cross-entropy silently took the targets as class
    probabilities), and a short run trains."""
    from engram.config import parse_method
    from engram.data.streams import TensorSet
    from engram.methods.base import Context
    from engram.experiments.window import WindowConfig, run_window, squared_norm_loss, window_data

    cfg = WindowConfig(n_points=20, x_dim=6, width=6, y_dim=3, depth=2, window=5,
                       init="default", max_steps=30, record_every=10)
    model = cfg.network()
    x, y = window_data(cfg)
    ctx = Context(model=model, stream=None, train_cfg=None, generator=torch.Generator(),
                  device=torch.device("cpu"), loss_fn=squared_norm_loss,
                  batch=TensorSet(x[:5], y[:5], torch.zeros(5, dtype=torch.long)))
    params = list(model.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        squared_norm_loss(model(x[:5]), y[:5]), params)])
    for p, gp in zip(params, torch.split(g, [p.numel() for p in params])):
        p.grad = gp.view_as(p).clone()
    SAM(SAM.Params(rho=0.1)).after_backward(ctx)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    perturbed = [(p.detach() + 0.1 * gp.view_as(p) / g.norm()).requires_grad_()
                 for p, gp in zip(params, torch.split(g, [p.numel() for p in params]))]
    named = dict(zip([n for n, _ in model.named_parameters()], perturbed))
    out = torch.func.functional_call(model, named, (x[:5],))
    expected = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        squared_norm_loss(out, y[:5]), perturbed)])
    torch.testing.assert_close(got, expected)

    record = run_window(cfg, parse_method("sam", {}, "test"))
    plain = run_window(cfg)
    assert record.point_loss[-1].mean() < record.point_loss[0].mean()  # it learns
    assert not (record.point_loss[-1] == plain.point_loss[-1]).all()  # and SAM acts
