"""OGD: the basis is orthonormal and projected gradients are orthogonal to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram.methods.ogd import OGD, orthonormal_extend
from tests.conftest import tiny_config
from tests.test_methods import _context


def test_orthonormal_extend_gives_orthonormal_rows_and_drops_dependent_vectors():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(5, 20, generator=generator, dtype=torch.float64)
    dependent = (vectors[0] + 2 * vectors[1]).unsqueeze(0)
    basis = orthonormal_extend(torch.zeros(0, 20, dtype=torch.float64), torch.cat([vectors, dependent]))
    assert basis.shape == (5, 20)
    torch.testing.assert_close(basis @ basis.T, torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectors_in_the_span_of_an_earlier_basis_are_dropped(dtype):
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(4, 300, generator=generator, dtype=dtype)
    basis = orthonormal_extend(torch.zeros(0, 300, dtype=dtype), first)
    new = torch.randn(3, 300, generator=generator, dtype=dtype)
    in_span = (first[0] - 3 * first[2] + 0.5 * first[3]).unsqueeze(0)  # float32 leaves ~1e-7 of it
    grown = orthonormal_extend(basis, torch.cat([in_span, new, new[:1] + first[1]]))
    assert grown.shape == (7, 300)
    torch.testing.assert_close(grown[:4], basis)  # the old rows are kept as they were
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(grown @ grown.T, torch.eye(7, dtype=dtype), atol=tol, rtol=0)
    # every input lies in the span of the grown basis
    inputs = torch.cat([first, new])
    torch.testing.assert_close(inputs @ grown.T @ grown, inputs, atol=100 * tol, rtol=0)


def test_projected_gradient_is_orthogonal_to_stored_directions_and_changes_the_update():
    ctx = _context(tiny_config())
    method = OGD(OGD.Params(samples_per_task=20))
    ctx.task = ctx.stream.tasks[0]
    method.after_task(ctx)
    assert method.basis.shape[0] == 20
    task2 = ctx.stream.tasks[1].train
    loss = F.cross_entropy(ctx.model(task2.x[:16], task2.task[:16]), task2.y[:16])
    ctx.model.zero_grad()
    loss.backward()
    params = list(ctx.model.parameters())
    before = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    method.after_backward(ctx)
    after = torch.cat([p.grad.reshape(-1) for p in params])
    assert (method.basis @ after).abs().max() < 1e-5 * before.norm()
    assert (after - before).norm() > 1e-3 * before.norm()


def test_stored_directions_are_the_true_logit_gradients():
    """Each stored example's gradient of f_y(x) lies in the span of the basis."""
    ctx = _context(tiny_config())
    method = OGD(OGD.Params(samples_per_task=5))
    ctx.task = ctx.stream.tasks[0]
    generator_state = ctx.generator.get_state()
    method.after_task(ctx)
    ctx.generator.set_state(generator_state)
    data = ctx.task.train
    pick = torch.randperm(len(data), generator=ctx.generator)[:5]
    params = list(ctx.model.parameters())
    for i in pick:
        logit = ctx.model(data.x[i:i + 1], data.task[i:i + 1])[0, data.y[i]]
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(logit, params)])
        residual = g - method.basis.T @ (method.basis @ g)
        assert residual.norm() < 1e-4 * g.norm()


def test_frozen_parameters_give_a_clear_error_not_a_crash():
    import pytest

    from engram.config import parse_method
    from engram.errors import ConfigError
    from engram.methods import METHODS
    from engram.runner import train_task
    from tests.conftest import tiny_config
    from tests.test_methods import _context

    ctx = _context(tiny_config(stream={"scenario": "task"}))
    spec = parse_method("compose", {"methods": ["multihead", "ogd"]}, "test")
    method = METHODS.get("compose")(spec.params)
    with pytest.raises(ConfigError, match="does not compose with methods that freeze"):
        for task in ctx.stream.tasks[:2]:
            ctx.task = task
            ctx.seen_tasks.append(task)
            train_task(ctx, method, lambda epoch, loss: None)
