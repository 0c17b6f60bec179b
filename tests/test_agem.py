"""A-GEM: the projection never conflicts with the memory gradient, and it changes the update."""

from __future__ import annotations

import torch

from engram.methods.agem import project_agem


def test_projection_has_non_negative_dot_with_the_reference():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        grad = torch.randn(50, generator=generator, dtype=torch.float64)
        reference = torch.randn(50, generator=generator, dtype=torch.float64)
        projected = project_agem(grad, reference, eps=0.0)
        assert torch.dot(projected, reference) >= -1e-10
        if torch.dot(grad, reference) < 0:
            assert torch.dot(projected, reference).abs() < 1e-10  # exactly onto the boundary
            assert not torch.allclose(projected, grad)             # the update did change
        else:
            assert torch.equal(projected, grad)                    # no conflict: untouched


def test_projection_matches_the_formula_on_a_hand_example():
    grad = torch.tensor([1.0, -2.0])
    reference = torch.tensor([0.0, 1.0])
    # g.g_ref = -2 < 0: g - (-2 / 1) g_ref = [1, 0]
    torch.testing.assert_close(project_agem(grad, reference, eps=0.0), torch.tensor([1.0, 0.0]))


def test_after_backward_leaves_a_gradient_that_does_not_raise_the_memory_loss():
    import torch.nn.functional as F

    from engram.methods.agem import AGEM
    from tests.test_methods import _context
    from tests.conftest import tiny_config

    ctx = _context(tiny_config())
    method = AGEM(AGEM.Params(memory=50, reference_batch_size=1000))  # reference = whole memory
    ctx.task = ctx.stream.tasks[0]
    method.after_task(ctx)  # memory now holds task 1
    buffer = method.memory.buffer
    params = list(ctx.model.parameters())
    conflicts = 0
    for start in range(0, 64, 8):  # task 2 batches: these pull away from task 1
        task2 = ctx.stream.tasks[1].train
        loss = F.cross_entropy(ctx.model(task2.x[start:start + 8], task2.task[start:start + 8]),
                               task2.y[start:start + 8])
        ctx.model.zero_grad()
        loss.backward()
        before = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        method.after_backward(ctx)
        after = torch.cat([p.grad.reshape(-1) for p in params])
        reference = torch.autograd.grad(
            F.cross_entropy(ctx.model(buffer.x, buffer.task), buffer.y), params)
        reference = torch.cat([g.reshape(-1) for g in reference])
        assert torch.dot(after, reference) >= -1e-4 * reference.norm() * after.norm()
        conflicts += bool(torch.dot(before, reference) < 0)
    assert conflicts > 0, "no conflicting step: the test did not exercise the projection"


# ----------------------------------------------------------------------------- the update

from tests.test_ogd import _double, _steps  # noqa: E402  (the same runner-step helpers)


def _agem_after_task_one(ctx, **params):
    from engram.methods.agem import AGEM

    # reference = the whole memory of 50 task-1 examples, so g_ref is deterministic
    method = AGEM(AGEM.Params(memory=50, reference_batch_size=1000, **params))
    ctx.task = ctx.stream.tasks[0]
    method.after_task(ctx)
    return method


def _memory_gradient(ctx, method):
    buffer = method.memory.buffer
    params = list(ctx.model.parameters())
    loss = ctx.loss_fn(ctx.model(buffer.x, buffer.task), buffer.y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_under_plain_sgd_projecting_the_update_equals_projecting_the_gradient():
    from tests.conftest import tiny_config
    from tests.test_methods import _context

    updates = {}
    for project in ("update", "gradient"):
        ctx = _double(_context(tiny_config()))
        # eps = 0: with eps > 0 the projected gradient keeps a part eps / |g_ref|^2 of the
        # conflict, which the update's projection then removes as well
        method = _agem_after_task_one(ctx, project=project, eps=0.0)
        optimizer = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
        updates[project] = torch.stack(list(_steps(ctx, method, optimizer, 6)))
    torch.testing.assert_close(updates["update"], updates["gradient"], rtol=1e-12, atol=1e-15)


def test_under_adam_no_step_raises_the_memory_loss_to_first_order():
    """g_ref . d <= 0 for the step d the optimizer actually makes (g_ref at the weights
    before it); with the gradient projection alone Adam's steps often raise it."""
    from tests.conftest import tiny_config
    from tests.test_methods import _context

    raised = {}
    for project in ("update", "gradient"):
        ctx = _context(tiny_config())
        method = _agem_after_task_one(ctx, project=project)
        optimizer = torch.optim.Adam(ctx.model.parameters(), lr=0.01)
        steps, raised[project] = _steps(ctx, method, optimizer, 30), 0
        while True:
            reference = _memory_gradient(ctx, method)  # at the weights before the next step
            d = next(steps, None)
            if d is None:
                break
            dot = float(torch.dot(reference, d))
            raised[project] += dot > 1e-6 * float(reference.norm() * d.norm())
    assert raised["update"] == 0
    assert raised["gradient"] > 5  # the paper's rule alone: the test can tell


def test_the_memory_loss_is_the_problems_own_loss():
    """With a squared-error ctx.loss_fn, the gradient A-GEM projects against is that loss's
    memory gradient, by hand, not the cross-entropy's."""
    import torch.nn.functional as F

    from engram.data.streams import TensorSet
    from tests.conftest import tiny_config
    from tests.test_methods import _context

    ctx = _context(tiny_config())
    ctx.loss_fn = lambda out, y: (out - F.one_hot(y, out.shape[1])).pow(2).sum(1).mean()  # noqa: E731
    params = list(ctx.model.parameters())
    first = ctx.stream.tasks[0].train
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(50):  # learn task 1 under this loss, so that task 2 pulls against it
        optimizer.zero_grad()
        ctx.loss_fn(ctx.model(first.x, first.task), first.y).backward()
        optimizer.step()
    method = _agem_after_task_one(ctx)
    data = ctx.stream.tasks[1].train
    reference = _memory_gradient(ctx, method)
    for start in range(0, len(data), 8):  # the first task-2 batch that conflicts
        batch = TensorSet(*(part[start:start + 8] for part in data))
        ctx.model.zero_grad()
        ctx.loss_fn(ctx.model(batch.x, batch.task), batch.y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        if torch.dot(grad, reference) < 0:
            break
    assert torch.dot(grad, reference) < 0  # a conflict, so the projection acts
    method.after_backward(ctx)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, project_agem(grad, reference, method.params.eps))
