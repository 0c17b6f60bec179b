"""SI's path integral against a hand-computed run of SGD steps on a quadratic."""

from __future__ import annotations

import torch
from torch import nn

from engram.methods.base import Context, penalty_value
from engram.methods.si import SI
from engram.training import finish_gradients


class Quadratic(nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))


def _run_task(method, model, ctx, a, lr, steps):
    """The runner's hook order with loss 0.5 * sum(a * theta^2) + SI's penalty."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    method.before_task(ctx)
    for _ in range(steps):
        loss = 0.5 * (a * model.theta.pow(2)).sum()
        optimizer.zero_grad()
        loss.backward()
        finish_gradients([ctx], [method])  # SI's penalty gradient, then its after_backward
        optimizer.step()
        method.after_step(None, ctx)
    method.after_task(ctx)


def test_si_importance_matches_a_hand_computed_path_integral():
    a, lr, steps, xi, c = [1.0, 3.0], 0.1, 4, 0.1, 0.5
    model = Quadratic([1.0, -2.0])
    ctx = Context(model=model, stream=None, train_cfg=None, generator=torch.Generator(),
                  device=torch.device("cpu"))
    method = SI(SI.Params(strength=c, damping=xi))
    _run_task(method, model, ctx, torch.tensor(a, dtype=torch.float64), lr, steps)

    # by hand, per coordinate: theta_{k+1} = theta_k (1 - lr a); w = sum_k lr a^2 theta_k^2
    expected_omega, anchor = [], []
    for a_i, theta0 in zip(a, [1.0, -2.0]):
        theta, w = theta0, 0.0
        for _ in range(steps):
            grad = a_i * theta
            new = theta - lr * grad
            w += -grad * (new - theta)
            theta = new
        expected_omega.append(max(0.0, w / ((theta - theta0) ** 2 + xi)))
        anchor.append(theta)
    torch.testing.assert_close(method.omega["theta"], torch.tensor(expected_omega, dtype=torch.float64))

    # Task 2, same loss plus SI's penalty: the path integral must use the UNregularised
    # gradient a*theta, while the applied step includes the penalty's 2 c Omega (theta - theta~).
    _run_task(method, model, ctx, torch.tensor(a, dtype=torch.float64), lr, steps)
    second = []
    for i, a_i in enumerate(a):
        theta = start = anchor[i]
        w = 0.0
        for _ in range(steps):
            grad = a_i * theta
            step = grad + 2 * c * expected_omega[i] * (theta - anchor[i])
            new = theta - lr * step
            w += -grad * (new - theta)
            theta = new
        second.append(max(0.0, expected_omega[i] + w / ((theta - start) ** 2 + xi)))
    torch.testing.assert_close(method.omega["theta"], torch.tensor(second, dtype=torch.float64))


def test_si_penalty_changes_the_gradient():
    model = Quadratic([1.0, -2.0])
    ctx = Context(model=model, stream=None, train_cfg=None, generator=torch.Generator(),
                  device=torch.device("cpu"))
    method = SI(SI.Params(strength=2.0))
    _run_task(method, model, ctx, torch.tensor([1.0, 3.0], dtype=torch.float64), 0.1, 3)
    assert penalty_value(method, ctx).item() == 0.0  # at the anchor
    with torch.no_grad():
        model.theta.add_(0.5)
    (grad,) = torch.autograd.grad(penalty_value(method, ctx), [model.theta])
    expected = 2 * 2.0 * method.omega["theta"] * 0.5
    torch.testing.assert_close(grad, expected)
    assert grad.abs().sum() > 0
    model.theta.grad = None  # and what the training loop adds: the same gradient
    finish_gradients([ctx], [method])
    torch.testing.assert_close(model.theta.grad, expected)
