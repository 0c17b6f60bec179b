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
