"""GDumb: the greedy class-balanced memory against a hand-run of the rule, and the network
after a task equals one trained from scratch on the memory alone by a hand-written loop."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram.config import TrainConfig
from engram.data.streams import TensorSet
from engram.errors import ConfigError
from engram.methods.base import Context, ProblemInfo
from engram.methods.gdumb import GDumb, reinitialise
from engram.models.nets import ContinualNet
from engram.training import train_task


def stream_examples(labels: list[int], task: int, first_id: int) -> TensorSet:
    """Examples numbered first_id.. whose x is (id, label): each stored row names its source."""
    ids = torch.arange(first_id, first_id + len(labels), dtype=torch.float32)
    y = torch.tensor(labels)
    return TensorSet(torch.stack([ids, y.float()], dim=1), y, torch.full_like(y, task))


def hand_counts(offered: list[tuple[int, int]], budget: int) -> dict[tuple[int, int], int]:
    """The class counts the greedy rule leaves: store when the class is new or below
    budget // classes stored; when full, first drop one of the largest class (ties: the
    smallest (task, label)). Counts only: which example goes is random, how many is not."""
    counts: dict[tuple[int, int], int] = {}
    for key in offered:
        if key in counts and counts[key] >= budget // len(counts):
            continue
        if sum(counts.values()) == budget:
            largest = max(sorted(counts), key=lambda k: counts[k])  # first max: smallest key
            counts[largest] -= 1
            if counts[largest] == 0:
                del counts[largest]
        counts[key] = counts.get(key, 0) + 1
    return counts


def memory_counts(memory: TensorSet) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for t, y in zip(memory.task.tolist(), memory.y.tolist()):
        counts[(t, y)] = counts.get((t, y), 0) + 1
    return counts


def test_memory_stays_class_balanced_on_an_unbalanced_stream():
    method, generator = GDumb(GDumb.Params(memory=9)), torch.Generator().manual_seed(0)
    tasks = [[0] * 14 + [1] * 3 + [0] * 2, [2] * 1 + [3] * 11 + [2] * 5 + [4] * 2,
             [0] * 30 + [1] * 30]  # task 2 reuses labels 0, 1: new (task, label) classes
    offered, first = [], 0
    for t, labels in enumerate(tasks):
        data = stream_examples(labels, t, first)
        first += len(labels)
        offered += [(t, y) for y in labels]
        memory = method.greedy_fill(data, generator)
        method.memory = memory
        expected = hand_counts(offered, 9)
        assert memory_counts(memory) == expected
        assert len(memory) == min(9, len(offered))
        # every row is a real stream example, none twice, with its own label and task
        ids = memory.x[:, 0].long().tolist()
        assert len(set(ids)) == len(ids)
        assert torch.equal(memory.x[:, 1].long(), memory.y)
    # the last task had 30 of each: the 7 classes end within one slot of equal shares
    counts = list(memory_counts(memory).values())
    assert len(counts) == 7 and max(counts) - min(counts) <= 1
    assert sorted(counts) == [1, 1, 1, 1, 1, 2, 2]


def test_a_memory_smaller_than_the_classes_drops_a_class_that_loses_its_last_slot():
    # 2 slots, 3 classes: class 2 evicts class 0's only example; 0 then counts as new again
    method, generator = GDumb(GDumb.Params(memory=2)), torch.Generator().manual_seed(0)
    labels = [0, 1, 2, 0]
    memory = method.greedy_fill(stream_examples(labels, 0, 0), generator)
    assert memory_counts(memory) == hand_counts([(0, y) for y in labels], 2) == {(0, 2): 1, (0, 0): 1}


def tiny_net() -> ContinualNet:
    body = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.BatchNorm1d(6))
    return ContinualNet(body, 6, 1, 5)


def context(model: nn.Module, seed: int, data: TensorSet) -> Context:
    cfg = TrainConfig(batch_size=4, epochs=3, lr=0.1)
    ctx = Context(model=model, stream=None, train_cfg=cfg,
                  generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))
    ctx.task = type("T", (), {"train": data, "index": 0, "name": "t"})()
    return ctx


def test_network_after_a_task_is_trained_from_scratch_on_the_memory_alone():
    labels = [0] * 12 + [1] * 3 + [2] * 7 + [3] * 2
    data = stream_examples(labels, 0, 0)
    data = TensorSet(torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(5)),
                     data.y, data.task)
    torch.manual_seed(0)
    trained_before = tiny_net()  # a network that has learned something else already
    other = tiny_net()  # other weights altogether
    with torch.no_grad():
        for p in trained_before.parameters():
            p.mul_(3.0).add_(1.0)
    results = []
    for start in (trained_before, other):
        ctx = context(copy.deepcopy(start), seed=1, data=data)
        method = GDumb(GDumb.Params(memory=8))
        train_task(ctx, method, lambda epoch, loss: None)
        results.append((ctx.model, method.memory))
    # by hand: re-initialise a copy as GDumb does, fill the memory, then plain SGD epochs on
    # the memory alone, the runner's shuffling drawn from the same generator
    reference = copy.deepcopy(other)
    ref_ctx = context(reference, seed=1, data=data)
    ref_method = GDumb(GDumb.Params(memory=8))
    ref_method.before_task(ref_ctx)
    memory = ref_method.training_data(data, ref_ctx)
    assert len(memory) == 8 and memory_counts(memory) == hand_counts([(0, y) for y in labels], 8)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference.train()
    for _ in range(3):
        order = torch.randperm(len(memory), generator=ref_ctx.generator)
        for start in range(0, len(memory), 4):
            index = order[start:start + 4]
            loss = F.cross_entropy(reference(memory.x[index], memory.task[index]), memory.y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for model, stored in results:
        assert torch.equal(stored.x, memory.x)
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)


def test_reinitialise_draws_from_the_generator_and_refuses_bare_parameters():
    a, b = tiny_net(), tiny_net()
    reinitialise(a, torch.Generator().manual_seed(3))
    reinitialise(b, torch.Generator().manual_seed(3))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    c = tiny_net()
    reinitialise(c, torch.Generator().manual_seed(4))
    assert not torch.equal(a.head.weight, c.head.weight)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

    with pytest.raises(ConfigError, match="parameter 1.scale belongs to no module"):
        reinitialise(nn.Sequential(nn.Linear(2, 2), Scaled()), torch.Generator())


def test_state_round_trips_and_regression_is_refused():
    method, generator = GDumb(GDumb.Params(memory=5)), torch.Generator().manual_seed(0)
    method.memory = method.greedy_fill(stream_examples([0, 0, 1, 0, 2, 2, 2], 0, 0), generator)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = GDumb(method.params)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(method.memory, restored.memory):
        assert torch.equal(a, b)
    more = stream_examples([3] * 4 + [1] * 3, 1, 100)
    state = generator.get_state()
    after = method.greedy_fill(more, generator)
    generator.set_state(state)
    assert torch.equal(restored.greedy_fill(more, generator).x, after.x)
    assert "regression" in method.unusable_reason(ProblemInfo("p", 1, classification=False))
    assert method.unusable_reason(ProblemInfo("p", 3, classification=True)) is None
