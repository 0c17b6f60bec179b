"""MC-SGD: the line objective's gradient (with the chain-rule factor a) against a per-point
oracle and finite differences, the initial interpolation point, the merge lowering the
objective and the memory loss, the per-task episodic memory, the memory bill and resuming."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from engram.data.streams import TensorSet
from engram.methods.mcsgd import (MCSGD, MCSGDParams, connectivity_objective, line_loss,
                                  line_points)
from engram.models.nets import ContinualNet
from engram.training import train_task
from tests.conftest import tiny_config
from tests.test_methods import _context


def tiny_net(n_heads: int = 2, dtype=torch.float64) -> ContinualNet:
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 4), torch.nn.Tanh())
    return ContinualNet(body, 4, n_heads, 2).to(dtype)


def random_weights(net, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in net.named_parameters()}


def tiny_data(n: int = 10, seed: int = 1) -> TensorSet:
    g = torch.Generator().manual_seed(seed)
    return TensorSet(torch.randn(n, 1, 1, 3, generator=g, dtype=torch.float64),
                     torch.randint(2, (n,), generator=g), torch.randint(2, (n,), generator=g))


def per_point_gradient(net, w, start, points, data, with_factor: bool = True):
    """The obviously-correct loop: load each point into a copy of the net, backprop its loss
    alone, and add a * grad (or the reimplementations' raw grad)."""
    total = {n: torch.zeros_like(t) for n, t in w.items()}
    for a in points:
        point = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in point.named_parameters():
                p.copy_(start[n] + a * (w[n] - start[n]))
        F.cross_entropy(point(data.x, data.task), data.y).backward()
        for n, p in point.named_parameters():
            total[n] += (a if with_factor else 1.0) * p.grad
    return total


def autograd_gradient(net, w, start, points, data):
    leaves = {n: t.clone().requires_grad_(True) for n, t in w.items()}
    loss = line_loss(net, leaves, start, points, data, F.cross_entropy)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def test_line_points_are_evenly_spaced_and_include_both_ends():
    assert line_points(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(line_points(10)) == 11  # as arange(0, 1.01, 0.1) in CL-Gym and sequel


def test_line_gradient_is_the_sum_of_a_times_each_points_gradient():
    net, data, points = tiny_net(), tiny_data(), line_points(5)
    w, start = random_weights(net, 1), random_weights(net, 2)
    ours = autograd_gradient(net, w, start, points, data)
    oracle = per_point_gradient(net, w, start, points, data)
    raw = per_point_gradient(net, w, start, points, data, with_factor=False)
    for n in w:
        torch.testing.assert_close(ours[n], oracle[n], rtol=1e-10, atol=1e-12)
    # the reimplementations' gradient (no factor a) is a different vector: the test can fail
    difference = sum(float((ours[n] - raw[n]).norm()) for n in w)
    assert difference > 0.1 * sum(float(raw[n].norm()) for n in w)


def test_line_gradient_matches_finite_differences():
    net, data, points = tiny_net(), tiny_data(), line_points(3)
    w, start = random_weights(net, 3), random_weights(net, 4)
    ours = autograd_gradient(net, w, start, points, data)
    g = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(3):
        direction = {n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in w.items()}
        shifted = lambda s: {n: w[n] + s * eps * direction[n] for n in w}  # noqa: E731
        with torch.no_grad():
            numeric = (line_loss(net, shifted(1), start, points, data, F.cross_entropy)
                       - line_loss(net, shifted(-1), start, points, data, F.cross_entropy)
                       ) / (2 * eps)
        analytic = sum((ours[n] * direction[n]).sum() for n in w)
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_line_loss_uses_each_examples_own_head():
    net, data = tiny_net(), tiny_data()
    w = {n: p.detach() for n, p in net.named_parameters()}
    # the single point w is the net itself
    loss = line_loss(net, w, w, [1.0], data, F.cross_entropy)
    expected = F.cross_entropy(net(data.x, data.task), data.y)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, F.cross_entropy(net(data.x, 1 - data.task), data.y))


def _two_tasks(params: MCSGDParams, scenario: str = "task", spy: bool = False):
    """Train MC-SGD on tasks 1 and 2 of a tiny stream; with spy, keep ŵ_2 and w̄_1."""
    ctx = _context(tiny_config(stream={"scenario": scenario}))

    class Spy(MCSGD):
        def after_task(self, ctx):
            self.w_hat = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
            self.w_bar_prev = self.w_bar
            self.memory_before = self.memory
            super().after_task(ctx)

    method = (Spy if spy else MCSGD)(params)
    for task in ctx.stream.tasks[:2]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda *_: None)
    return ctx, method


def test_with_no_steps_the_result_is_the_initial_interpolation_point():
    ctx, method = _two_tasks(MCSGDParams(lmc_steps=0, init_position=0.3), spy=True)
    for n, p in ctx.model.named_parameters():
        start, end = method.w_bar_prev[n], method.w_hat[n]
        assert torch.equal(p.detach(), start + 0.3 * (end - start))
        assert torch.equal(method.w_bar[n], p.detach())  # w̄_2 is what the next task starts from


def test_the_first_task_keeps_its_solution():
    ctx = _context(tiny_config(stream={"scenario": "task"}))
    method = MCSGD()
    ctx.task = ctx.stream.tasks[0]
    ctx.seen_tasks.append(ctx.task)
    train_task(ctx, method, lambda *_: None)
    # nothing to merge with: w̄_1 = ŵ_1, the model as trained
    for n, p in ctx.model.named_parameters():
        assert torch.equal(method.w_bar[n], p.detach())


def test_the_merge_lowers_the_objective_and_the_memory_loss():
    ctx, method = _two_tasks(MCSGDParams(lmc_steps=60), spy=True)
    model, memory, current = ctx.model, method.memory_before, ctx.stream.tasks[1].train
    points = line_points(method.params.line_samples)
    merged = {n: p.detach() for n, p in model.named_parameters()}
    start = {n: method.w_bar_prev[n] + 0.1 * (method.w_hat[n] - method.w_bar_prev[n])
             for n in merged}
    with torch.no_grad():
        objective = lambda w: float(connectivity_objective(  # noqa: E731
            model, w, method.w_bar_prev, method.w_hat, points, memory, current, F.cross_entropy))
        memory_loss = lambda w: float(  # noqa: E731
            line_loss(model, w, w, [1.0], memory, F.cross_entropy))
        assert objective(merged) < 0.8 * objective(start)
        assert memory_loss(merged) < 0.5 * memory_loss(method.w_hat)  # ŵ_2 forgot task 1


def test_memory_holds_memory_per_task_examples_of_each_finished_task():
    ctx = _context(tiny_config(stream={"scenario": "class"}))
    method = MCSGD(MCSGDParams(memory_per_task=7, lmc_steps=2))
    for number, task in enumerate(ctx.stream.tasks, start=1):
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda *_: None)
        assert len(method.memory) == 7 * number
        assert torch.bincount(method.memory.task).tolist() == [7] * number
        for x, y, t in zip(*method.memory):  # stored examples are whole examples of their task
            source = ctx.stream.tasks[int(t)].train
            match = (source.x == x).flatten(1).all(1)
            assert match.any() and bool((source.y[match] == y).all())
    parameters = sum(p.numel() for p in ctx.model.parameters())
    stored = sum(part.numel() * part.element_size() for part in method.memory)
    assert method.extra_bytes() == stored + 4 * parameters


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_resuming_from_the_state_dict_gives_the_same_merge(scenario):
    params = MCSGDParams(lmc_steps=5)
    ctx, method = _two_tasks(params, scenario)
    buffer = io.BytesIO()
    torch.save({"model": ctx.model.state_dict(), "method": method.state_dict(),
                "generator": ctx.generator.get_state()}, buffer)
    task3 = ctx.stream.tasks[2]
    ctx.task = task3
    ctx.seen_tasks.append(task3)
    train_task(ctx, method, lambda *_: None)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    ctx.model.load_state_dict(state["model"])
    ctx.generator.set_state(state["generator"])
    resumed = MCSGD(params)
    resumed.load_state_dict(state["method"])
    train_task(ctx, resumed, lambda *_: None)
    for a, b in zip(method.state_dict()["w_bar"].values(), resumed.state_dict()["w_bar"].values()):
        assert torch.equal(a, b)
    for a, b in zip(method.memory, resumed.memory):
        assert torch.equal(a, b)


def test_the_search_descends_the_problems_own_loss():
    """One search step with a squared-error ctx.loss_fn moves w by -lmc_lr times the
    gradient of the objective built from that loss (by hand, on the same drawn batches);
    before, the search always took cross-entropy."""
    from engram.methods.mcsgd import _draw

    def squared_error(outputs, targets):
        return (outputs - F.one_hot(targets, outputs.shape[1])).pow(2).sum(1).mean()

    class Spy(MCSGD):
        def after_task(self, ctx):
            self.w_hat = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
            self.w_bar_prev, self.memory_before = self.w_bar, self.memory
            self.generator_state = ctx.generator.get_state()
            super().after_task(ctx)

    ctx = _context(tiny_config(stream={"scenario": "class"}))
    ctx.loss_fn = squared_error
    method = Spy(MCSGDParams(lmc_steps=1, lmc_lr=0.01))
    for task in ctx.stream.tasks[:2]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda *_: None)
    p = method.params
    generator = torch.Generator().manual_seed(0)
    generator.set_state(method.generator_state)
    memory = _draw(method.memory_before, p.lmc_batch_size, generator)
    current = _draw(ctx.stream.tasks[1].train, p.lmc_batch_size, generator)
    start = {n: (method.w_bar_prev[n] + p.init_position * (method.w_hat[n] - method.w_bar_prev[n]))
             .requires_grad_(True) for n in method.w_hat}
    objective = connectivity_objective(ctx.model, start, method.w_bar_prev, method.w_hat,
                                       line_points(p.line_samples), memory, current, squared_error)
    grads = dict(zip(start, torch.autograd.grad(objective, list(start.values()))))
    for n, weight in ctx.model.named_parameters():
        torch.testing.assert_close(weight.detach(), start[n].detach() - p.lmc_lr * grads[n])
