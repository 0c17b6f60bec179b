"""GEM: the projected gradient meets every task's constraint, is the nearest such vector
(checked against an independent primal solve and random feasible points), reduces to A-GEM
for one constraint, and leaves a conflict-free gradient in training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from engram.methods.agem import project_agem
from engram.methods.gem import GEM, project_gem


def _conflicting_problem(generator, t, p):
    """A gradient g (p,) and t memory gradients, at least two of them with g . g_k < 0."""
    grad = torch.randn(p, generator=generator, dtype=torch.float64)
    memory = torch.randn(t, p, generator=generator, dtype=torch.float64)
    memory[:2] -= 1.5 * grad  # pull the first two against g
    assert int((memory @ grad < 0).sum()) >= 2
    return grad, memory


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_projection_meets_every_constraint(margin):
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        t, p = 2 + trial % 6, 5 + trial % 20
        grad, memory = _conflicting_problem(generator, t, p)
        projected = project_gem(grad, memory, margin=margin, eps=0.0)
        dots = memory @ projected
        assert (dots >= -1e-9 * memory.norm(dim=1) * grad.norm()).all(), (trial, dots)


def test_no_conflict_leaves_the_gradient_untouched():
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        grad = torch.randn(12, generator=generator, dtype=torch.float64)
        memory = torch.randn(4, 12, generator=generator, dtype=torch.float64)
        memory = torch.where((memory @ grad < 0).unsqueeze(1), -memory, memory)  # all agree
        assert torch.equal(project_gem(grad, memory, margin=0.5, eps=1e-3), grad)


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_one_constraint_is_the_agem_projection(eps):
    generator = torch.Generator().manual_seed(2)
    checked = 0
    for _ in range(100):
        grad = torch.randn(20, generator=generator, dtype=torch.float64)
        reference = torch.randn(20, generator=generator, dtype=torch.float64)
        gem = project_gem(grad, reference.unsqueeze(0), margin=0.0, eps=eps)
        torch.testing.assert_close(gem, project_agem(grad, reference, eps), rtol=1e-10, atol=1e-12)
        checked += bool(torch.dot(grad, reference) < 0)
    assert checked > 20  # both branches exercised


def test_projection_is_the_nearest_feasible_vector():
    """Against an independent solve of the primal QP min ||z - g||^2 s.t. G z >= 0 (scipy's
    SLSQP), and against feasible points near g~: none is closer to g."""
    generator = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    for trial in range(30):
        t, p = 3 + trial % 4, 8
        grad, memory = _conflicting_problem(generator, t, p)
        projected = project_gem(grad, memory, margin=0.0, eps=0.0)
        g, G = grad.numpy(), memory.numpy()
        primal = minimize(lambda z: 0.5 * np.sum((z - g) ** 2), g, jac=lambda z: z - g,
                          constraints=[{"type": "ineq", "fun": lambda z: G @ z, "jac": lambda z: G}],
                          method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
        assert primal.success
        np.testing.assert_allclose(projected.numpy(), primal.x, atol=1e-5)
        distance = float((projected - grad).norm())
        for _ in range(200):
            z = projected.numpy() + rng.normal(scale=0.3, size=p)
            if (G @ z >= 0).all():
                assert np.linalg.norm(z - g) >= distance - 1e-12


def _after_two_tasks(**params):
    from tests.conftest import tiny_config
    from tests.test_methods import _context

    ctx = _context(tiny_config())
    method = GEM(GEM.Params(memory_per_task=30, **params))
    for task in ctx.stream.tasks[:2]:
        ctx.task = task
        method.after_task(ctx)  # memories of tasks 1 and 2
    ctx.task = ctx.stream.tasks[2]
    return ctx, method


def test_after_backward_leaves_no_conflict_with_any_memory():
    ctx, method = _after_two_tasks(margin=0.0, eps=0.0)
    assert [len(m) for m in method.memories] == [30, 30]
    params = list(ctx.model.parameters())
    data, conflicts = ctx.task.train, 0
    for start in range(0, 64, 8):
        loss = ctx.loss_fn(ctx.model(data.x[start:start + 8], data.task[start:start + 8]),
                           data.y[start:start + 8])
        ctx.model.zero_grad()
        loss.backward()
        before = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        method.after_backward(ctx)
        after = torch.cat([p.grad.reshape(-1) for p in params])
        references = method.memory_gradients(ctx, params)  # recomputed independently
        assert (references @ after >= -1e-4 * references.norm(dim=1) * after.norm()).all()
        conflicts += bool((references @ before < 0).any())
    assert conflicts > 0, "no conflicting step: the test did not exercise the projection"


def test_under_adam_no_step_raises_a_memory_loss_to_first_order():
    """g_k . d <= 0 for every memory and the step d Adam actually makes; with the paper's
    gradient projection alone some steps raise one."""
    from tests.test_ogd import _steps

    raised = {}
    for project in ("update", "gradient"):
        ctx, method = _after_two_tasks(eps=0.0, project=project)
        optimizer = torch.optim.Adam(ctx.model.parameters(), lr=0.01)
        params = list(ctx.model.parameters())
        steps, raised[project] = _steps(ctx, method, optimizer, 12), 0  # task 2's batches
        while True:
            references = method.memory_gradients(ctx, params)  # at the weights before the step
            update = next(steps, None)
            if update is None:
                break
            raised[project] += bool((references @ update
                                     > 1e-6 * references.norm(dim=1) * update.norm()).any())
    assert raised["update"] == 0
    assert raised["gradient"] > 0  # the test can tell


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    ctx, method = _after_two_tasks()
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = GEM(method.params)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for old, new in zip(method.memories, restored.memories):
        for a, b in zip(old, new):
            assert torch.equal(a, b)
    params = list(ctx.model.parameters())
    torch.testing.assert_close(restored.memory_gradients(ctx, params),
                               method.memory_gradients(ctx, params))
