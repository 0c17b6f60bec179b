"""RWalk / EWC++: the online Fisher and the path score against a hand-computed run of SGD
steps on a quadratic; the penalty's value and gradient; a weights-only checkpoint."""

from __future__ import annotations

import io

import torch

from engram.methods.base import Context, penalty_value
from engram.methods.rwalk import EWCpp, RWalk
from tests.test_si import Quadratic, _run_task

A, THETA0, LR, STEPS = [1.0, 3.0, 0.5], [1.0, -2.0, 0.5], 0.1, 5


def _context(model):
    return Context(model=model, stream=None, train_cfg=None, generator=torch.Generator(),
                   device=torch.device("cpu"))


def _hand_task_one(alpha, every, xi, thetas=THETA0, fishers=(0.0, 0.0, 0.0)):
    """Plain floats, per coordinate: g = a theta, theta <- theta - lr g; every `every` steps
    (and at the end) F <- alpha mean(g^2) + (1 - alpha) F, then
    s += relu(w / (1/2 F (theta - theta_interval_start)^2 + xi)), w <- 0."""
    fisher, score, anchor = [], [], []
    for a, theta, f in zip(A, thetas, fishers):
        s = w = squares = 0.0
        start, count = theta, 0
        for step in range(STEPS):
            grad = a * theta
            new = theta - LR * grad
            w += -grad * (new - theta)
            squares += grad ** 2
            theta, count = new, count + 1
            if count == every or step == STEPS - 1:
                f = alpha * squares / count + (1 - alpha) * f
                s += max(0.0, w / (0.5 * f * (theta - start) ** 2 + xi))
                w = squares = 0.0
                start, count = theta, 0
        fisher.append(f)
        score.append(s)
        anchor.append(theta)
    return fisher, score, anchor


def _normalised(values):
    low, high = min(values), max(values)
    return [(v - low) / (high - low + 1e-32) for v in values]


def test_online_fisher_and_path_score_match_a_hand_computation():
    alpha, every, xi = 0.9, 2, 1e-3  # 5 steps: intervals of 2, 2 and a last one of 1
    model = Quadratic(THETA0)
    method = RWalk(RWalk.Params(alpha=alpha, update_every=every, damping=xi))
    _run_task(method, model, _context(model), torch.tensor(A, dtype=torch.float64), LR, STEPS)

    fisher, score, anchor = _hand_task_one(alpha, every, xi)
    as64 = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(method.fisher["theta"], as64(fisher))
    torch.testing.assert_close(method.score["theta"], as64(score))
    expected = [f + s for f, s in zip(_normalised(fisher), _normalised(score))]
    torch.testing.assert_close(method.omega["theta"], as64(expected))
    torch.testing.assert_close(method.anchor["theta"], as64(anchor))

    # task 2 without the penalty (strength 0, so the steps stay hand-computable): the Fisher
    # carries on from task 1's, and the score is the average of the two tasks' scores
    method.params.strength = 0.0
    _run_task(method, model, _context(model), torch.tensor(A, dtype=torch.float64), LR, STEPS)
    fisher2, score2, _ = _hand_task_one(alpha, every, xi, anchor, fisher)
    torch.testing.assert_close(method.fisher["theta"], as64(fisher2))
    torch.testing.assert_close(method.score["theta"],
                               as64([(s1 + s2) / 2 for s1, s2 in zip(score, score2)]))


def test_ewcpp_weights_the_penalty_by_the_normalised_fisher_alone():
    model = Quadratic(THETA0)
    method = EWCpp(EWCpp.Params(alpha=0.5, update_every=3))
    _run_task(method, model, _context(model), torch.tensor(A, dtype=torch.float64), LR, STEPS)
    fisher, _, _ = _hand_task_one(0.5, 3, 1e-3)
    torch.testing.assert_close(method.omega["theta"],
                               torch.tensor(_normalised(fisher), dtype=torch.float64))


def test_the_fisher_is_a_moving_average_across_tasks():
    """Not reset at a task boundary: task 2's first update mixes in task 1's last Fisher."""
    model = Quadratic(THETA0)
    ctx = _context(model)
    method = RWalk(RWalk.Params(alpha=0.9, update_every=100, strength=0.0))  # one interval per task
    a = torch.tensor(A, dtype=torch.float64)
    _run_task(method, model, ctx, a, LR, 1)
    first = method.fisher["theta"].clone()
    grad = a * model.theta.detach()  # task 2's only step: g = a theta (no penalty: strength 0)
    _run_task(method, model, ctx, a, LR, 1)
    torch.testing.assert_close(method.fisher["theta"], 0.9 * grad ** 2 + 0.1 * first)


def test_penalty_equals_the_hand_formula_and_changes_the_gradient():
    strength = 2.0
    model = Quadratic(THETA0)
    ctx = _context(model)
    method = RWalk(RWalk.Params(strength=strength, update_every=2))
    _run_task(method, model, ctx, torch.tensor(A, dtype=torch.float64), LR, STEPS)
    assert penalty_value(method, ctx).item() == 0.0  # at the anchor
    with torch.no_grad():
        model.theta.add_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    weight, anchor = method.omega["theta"], method.anchor["theta"]
    theta = model.theta.detach()
    expected = strength * float((weight * (theta - anchor) ** 2).sum())
    penalty = penalty_value(method, ctx)
    assert abs(penalty.item() - expected) < 1e-12
    assert weight.max() > 0
    (gradient,) = torch.autograd.grad(penalty, model.theta)
    torch.testing.assert_close(gradient, 2 * strength * weight * (theta - anchor))
    assert gradient.abs().max() > 0  # the penalty does pull the weights back


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    model = Quadratic(THETA0)
    ctx = _context(model)
    a = torch.tensor(A, dtype=torch.float64)
    method = RWalk(RWalk.Params(update_every=2))
    _run_task(method, model, ctx, a, LR, STEPS)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = RWalk(method.params)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        model.theta.add_(0.25)
    assert penalty_value(restored, ctx).item() == penalty_value(method, ctx).item() > 0
    # and both continue identically through a second task
    twin = Quadratic(model.theta.detach().tolist())
    _run_task(method, model, ctx, a, LR, 3)
    _run_task(restored, twin, _context(twin), a, LR, 3)
    for key in ("fisher", "score", "omega", "anchor"):
        torch.testing.assert_close(getattr(restored, key)["theta"], getattr(method, key)["theta"])
