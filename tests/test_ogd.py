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
    from engram.training import train_task
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


# ----------------------------------------------------------------------------- the update


def _double(ctx):
    """ctx in float64: the model and every task's inputs (rounding then stays ~1e-16)."""
    import dataclasses

    from engram.data.streams import TensorSet

    ctx.model.double()
    as64 = lambda s: TensorSet(s.x.double(), s.y, s.task)  # noqa: E731
    ctx.stream.tasks = [dataclasses.replace(t, train=as64(t.train), test=as64(t.test))
                        for t in ctx.stream.tasks]
    return ctx


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _steps(ctx, method, optimizer, n_steps):
    """n_steps runner updates (engram.training.apply_update) on task 2's first batches; yields
    the update each made, w_after - w_before (P,)."""
    from engram.data.streams import TensorSet
    from engram.training import apply_update

    data = ctx.stream.tasks[1].train
    ctx.task = ctx.stream.tasks[1]
    for i in range(n_steps):
        batch = TensorSet(*(part[8 * i:8 * i + 8] for part in data))
        before = _flat(ctx.model)
        loss = ctx.loss_fn(ctx.model(batch.x, batch.task), batch.y)
        apply_update(ctx, method, optimizer, loss, batch, batch)
        yield _flat(ctx.model) - before


def _after_task_one(ctx, **params):
    method = OGD(OGD.Params(samples_per_task=20, **params))
    ctx.task = ctx.stream.tasks[0]
    method.after_task(ctx)
    return method


def test_under_plain_sgd_projecting_the_update_equals_projecting_the_gradient():
    updates = {}
    for project in ("update", "gradient"):
        ctx = _double(_context(tiny_config()))
        method = _after_task_one(ctx, project=project)
        optimizer = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
        updates[project] = torch.stack(list(_steps(ctx, method, optimizer, 3)))
    torch.testing.assert_close(updates["update"], updates["gradient"], rtol=1e-12, atol=1e-15)
    # and the projection did act: plain SGD's first step would differ
    ctx = _double(_context(tiny_config()))
    sgd = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
    plain = next(_steps(ctx, OGD(), sgd, 1))  # no basis yet: the plain gradient step
    assert (plain - updates["update"][0]).norm() > 0.1 * plain.norm()


@pytest.mark.parametrize("optimizer", ["adam", "sgd_weight_decay"])
def test_the_step_the_optimizer_makes_is_orthogonal_to_the_stored_span(optimizer):
    """Adam rescales each coordinate (26% of its step inside span(S) here) and weight decay
    adds -lr * wd * w, so projecting the gradient alone leaves the step partly inside span(S);
    projecting the update leaves float rounding (~1e-7)."""
    inside = {}
    for project in ("update", "gradient"):
        ctx = _context(tiny_config())
        method = _after_task_one(ctx, project=project)
        params = ctx.model.parameters()
        opt = (torch.optim.Adam(params, lr=0.01) if optimizer == "adam"
               else torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01))
        inside[project] = max(float((method.basis @ d).norm() / d.norm())
                              for d in _steps(ctx, method, opt, 5))
    assert inside["update"] < 1e-6
    assert inside["gradient"] > 1e-3  # the paper's rule alone: the test can tell


def test_on_a_regression_every_outputs_gradient_joins_the_basis():
    """Real-valued targets have no true logit: OGD-ALL, the gradient of each output (two
    here) of each stored example lies in the span (this crashed before: gather by a float)."""
    import dataclasses

    from engram.config import ModelConfig
    from engram.data.streams import TensorSet
    from engram.models import build_model

    ctx = _context(tiny_config())
    ctx.model = build_model(ModelConfig(kind="mlp", hidden=[8]), ctx.stream.input_shape, 1, 2)
    task = ctx.stream.tasks[0]
    real = TensorSet(task.train.x, task.train.y.float(), task.train.task)  # regression targets
    ctx.task = dataclasses.replace(task, train=real)
    method = OGD(OGD.Params(samples_per_task=5))
    state = ctx.generator.get_state()
    method.after_task(ctx)
    assert method.basis.shape[0] == 10  # 5 examples x 2 outputs
    ctx.generator.set_state(state)
    pick = torch.randperm(len(real), generator=ctx.generator)[:5]
    params = list(ctx.model.parameters())
    for i in pick:
        outputs = ctx.model(real.x[i:i + 1], real.task[i:i + 1])[0]
        for k in range(2):
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(outputs[k], params,
                                                                      retain_graph=True)])
            assert (g - method.basis.T @ (method.basis @ g)).norm() < 1e-4 * g.norm()
