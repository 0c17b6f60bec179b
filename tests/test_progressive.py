"""Progressive nets: the column and lateral arithmetic, column 1's forward pass by hand,
frozen earlier columns (bit-identical, same task-IL accuracy) and the memory bill."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram.methods.progressive import Progressive, ProgressiveNet
from engram.training import evaluate, train_task
from tests.conftest import tiny_config
from tests.test_methods import _context

HIDDEN = [8, 6]  # body Linear(64, 8), ReLU, Linear(8, 6), ReLU; head Linear(6, H*K)


def prepared(scenario="task", n_tasks=3, model=None, train=None):
    sections = {"stream": {"scenario": scenario, "n_tasks": n_tasks},
                "model": model or {"kind": "mlp", "hidden": HIDDEN}}
    if train:
        sections["train"] = train
    ctx = _context(tiny_config(**sections))
    base = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    method = Progressive()
    ctx.model = method.prepare_model(ctx.model, ctx)
    return ctx, method, base


def test_columns_and_laterals_follow_the_parameter_arithmetic():
    ctx, method, base = prepared(n_tasks=3)
    net, outputs = ctx.model, 3 * 2  # task-IL: 3 heads of 2 classes
    assert isinstance(net, ProgressiveNet) and len(net.columns) == 3
    P = sum(p.numel() for p in base.values())
    assert P == 64 * 8 + 8 + 8 * 6 + 6 + 6 * outputs + outputs
    L = 8 * 6 + 6 * outputs  # laterals into the second Linear and into the head
    for k, column in enumerate(net.columns):
        assert sum(p.numel() for p in column.parameters()) == P + k * L
        assert sum(len(group) for group in column.laterals.values()) == 2 * k
    # O(T^2): laterals for every pair j < k at 2 layers
    assert sum(len(g) for c in net.columns for g in c.laterals.values()) == 2 * 3 * 2 // 2
    # column 0 is the given model; later columns are freshly initialised
    for name, value in base.items():
        assert torch.equal(net.columns[0].get_parameter(name), value)
        assert not torch.equal(net.columns[1].get_parameter(name), value)
        assert not torch.equal(net.columns[2].get_parameter(name), net.columns[1].get_parameter(name))
    # the memory bill after task t (1-based): columns 1..t-1 with their laterals, float32
    for t in range(1, 4):
        ctx.task = ctx.stream.tasks[t - 1]
        method.before_task(ctx)
        assert method.extra_bytes() == 4 * ((t - 1) * P + L * t * (t - 1) // 2)


def test_same_generator_gives_the_same_columns():
    nets = [prepared()[0].model for _ in range(2)]
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_column_one_matches_the_equation_by_hand(scenario):
    ctx, method, _ = prepared(scenario)
    net = ctx.model
    c0, c1 = net.columns[:2]
    x = ctx.stream.tasks[1].test.x[:5]
    v = x.flatten(1)
    lin = lambda layer, h: F.linear(h, layer.weight, layer.bias)  # noqa: E731
    h1 = [torch.relu(lin(c.body[1], v)) for c in (c0, c1)]       # first layer: no laterals
    h2_0 = torch.relu(lin(c0.body[3], h1[0]))
    h2_1 = torch.relu(lin(c1.body[3], h1[1]) + h1[0] @ c1.laterals["3"][0].weight.T)
    logits = lin(c1.head, h2_1) + h2_0 @ c1.laterals["head"][0].weight.T
    if scenario == "task":
        expected = logits.view(5, 3, 2)[:, 1]  # column 2, head of task 2
        task = torch.ones(5, dtype=torch.long)
    else:
        expected = logits
        ctx.task = ctx.stream.tasks[1]
        method.before_task(ctx)  # the most recent column answers, whatever the task ids
        task = torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(net(x, task), expected)
    torch.testing.assert_close(net.features(x, task if scenario == "task" else None), h2_1)
    if scenario == "task":  # a mixed batch: each example uses its own column
        mixed = torch.tensor([0, 1, 0, 1, 1])
        expected_mixed = torch.stack([net(x[i:i + 1], mixed[i:i + 1])[0] for i in range(5)])
        torch.testing.assert_close(net(x, mixed), expected_mixed)


def test_conv_columns_use_one_by_one_laterals():
    ctx, _, base = prepared(model={"kind": "cnn", "channels": [3, 4]})
    net = ctx.model
    lateral = net.columns[2].laterals["3"][1]  # body: conv, relu, pool, conv, ...
    assert isinstance(lateral, nn.Conv2d) and lateral.kernel_size == (1, 1)
    assert lateral.weight.shape == (4, 3, 1, 1) and lateral.bias is None
    x, task = ctx.stream.tasks[2].test.x[:4], torch.full((4,), 2)
    assert net(x, task).shape == (4, 2)


@pytest.mark.parametrize("optimizer", [
    {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01},
    {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.01}])
def test_training_freezes_earlier_columns_and_keeps_their_accuracy(optimizer):
    # momentum, Adam's moments and weight decay: frozen columns must still not move
    ctx, method, _ = prepared(train={"epochs": 12, **optimizer})
    net, tasks = ctx.model, ctx.stream.tasks
    snapshots, accuracies = [], []
    for task in tasks:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: None)
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith(f"columns.{task.index}.") for n in trainable)
        snapshots.append([p.detach().clone() for p in net.columns[task.index].parameters()])
        accuracies.append([evaluate(net, t.test)[0] for t in tasks[:task.index + 1]])
    for k, snapshot in enumerate(snapshots):  # bit-identical after every later task
        for before, after in zip(snapshot, net.columns[k].parameters(), strict=True):
            assert torch.equal(before, after)
    for k in range(len(tasks)):
        assert accuracies[-1][k] == accuracies[k][k] > 0.9


def test_the_net_round_trips_through_a_weights_only_checkpoint():
    ctx, method, _ = prepared("domain")
    ctx.task = ctx.stream.tasks[2]
    method.before_task(ctx)  # the active column (2) is part of the model's state
    buffer = io.BytesIO()
    torch.save(ctx.model.state_dict(), buffer)
    buffer.seek(0)
    fresh, _, _ = prepared("domain")
    fresh.model.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.model.active_column == 2
    x, task = ctx.stream.tasks[0].test.x[:4], torch.zeros(4, dtype=torch.long)
    assert torch.equal(fresh.model(x, task), ctx.model(x, task))
    with pytest.raises(TypeError, match="laterals"):
        ctx.model.output(ctx.model.features(x), task)
