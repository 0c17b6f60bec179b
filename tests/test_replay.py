"""Reservoir replay: the fixed budget, uniform inclusion, an exact one-at-a-time oracle
(Vitter's Algorithm R fed the implementation's own random draws), the mixed mini-batch,
and the state a checkpoint carries."""

from __future__ import annotations

import io
import math

import pytest
import torch

from engram.config import TrainConfig
from engram.data.streams import TensorSet
from engram.methods.base import Context
from engram.methods.replay import Replay, ReplayParams, herding_selection


def make_ctx(seed: int = 0, batch_size: int = 32) -> Context:
    # Replay reads only the generator and train_cfg.batch_size
    return Context(model=None, stream=None, train_cfg=TrainConfig(batch_size=batch_size),
                   generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def items(start: int, stop: int) -> TensorSet:
    """Examples numbered start..stop-1; every part encodes the number (ids are >= 1 here)."""
    ids = torch.arange(start, stop)
    x = torch.stack([ids.float(), -ids.float()], dim=1).reshape(-1, 1, 1, 2)
    return TensorSet(x, ids, ids % 3)


def offer(replay: Replay, ctx: Context, sizes: list[int], first: int = 1) -> int:
    """Offer consecutive numbered examples in batches of `sizes`; return the next number."""
    for size in sizes:
        replay.after_step(items(first, first + size), ctx)
        first += size
    return first


def stored_ids(replay: Replay) -> list[int]:
    buffer = replay.buffer
    ids = buffer.y[: replay.n_filled]
    # the three parts of a slot always come from the same example
    assert torch.equal(buffer.x[: replay.n_filled].reshape(-1, 2)[:, 0].long(), ids)
    assert torch.equal(buffer.task[: replay.n_filled], ids % 3)
    return ids.tolist()


def test_buffer_never_exceeds_memory_and_counts_every_offered_example():
    replay, ctx = Replay(ReplayParams(memory=10)), make_ctx()
    total, first = 0, 1
    for size in [3, 4, 2, 1, 25, 7, 10, 1]:  # fills across batch boundaries; one batch > memory
        first = offer(replay, ctx, [size], first)
        total += size
        assert replay.n_seen == total
        assert replay.n_filled == min(total, 10)
        assert all(len(part) == 10 for part in replay.buffer)
        ids = stored_ids(replay)
        assert len(set(ids)) == len(ids)  # no example stored twice
        assert all(1 <= i < first for i in ids)


def test_while_filling_every_example_is_kept_in_arrival_order():
    replay, ctx = Replay(ReplayParams(memory=12)), make_ctx()
    offer(replay, ctx, [5, 4, 3])
    assert stored_ids(replay) == list(range(1, 13))


def test_reservoir_inclusion_is_uniform_over_the_stream():
    """Every example ends in memory with probability memory / N, early or late."""
    n, memory, batch, runs = 50, 10, 7, 1500  # batches of 7: the last one holds one example
    counts = torch.zeros(n + 1)
    for seed in range(runs):
        replay, ctx = Replay(ReplayParams(memory=memory)), make_ctx(seed)
        offer(replay, ctx, [batch] * (n // batch) + [n % batch])
        counts[stored_ids(replay)] += 1
    frequency = counts[1:] / runs
    expected = memory / n  # 0.2; one example's frequency has sd ~0.010 over 1500 runs
    assert (frequency - expected).abs().max() < 0.05, frequency
    assert abs(float(frequency[:batch].mean()) - expected) < 0.02  # first batch
    assert abs(float(frequency[-batch:].mean()) - expected) < 0.02  # last two batches
    assert abs(float(frequency[-1]) - expected) < 0.05  # the very last example


def algorithm_r(batches: list[TensorSet], memory: int, seed: int):
    """Vitter's Algorithm R, one example at a time, with the implementation's draws: one
    torch.rand(n, float64) per offered batch; example number p (0-based) goes to slot p
    while p < memory, else to slot floor(u * (p + 1)) if that is < memory."""
    g = torch.Generator().manual_seed(seed)
    slots: list[int | None] = [None] * memory
    p, collisions = 0, 0
    for batch in batches:
        uniforms = torch.rand(len(batch), generator=g, dtype=torch.float64).tolist()
        taken = set()
        for example, u in zip(batch.y.tolist(), uniforms):
            j = p if p < memory else math.floor(u * (p + 1))
            if j < memory:
                collisions += j in taken
                taken.add(j)
                slots[j] = example  # a later example of the batch overwrites an earlier one
            p += 1
    return slots, collisions


@pytest.mark.parametrize("memory, sizes", [
    (3, [2, 20, 20, 20]),          # tiny memory, big batches: slots are hit twice per batch
    (10, [4, 4, 4, 30, 1, 17]),    # the buffer fills in the middle of a batch
    (64, [32] * 12),
])
def test_batched_reservoir_equals_one_at_a_time_algorithm_r(memory, sizes):
    total_collisions = 0
    for seed in range(5):
        replay, ctx = Replay(ReplayParams(memory=memory)), make_ctx(seed)
        batches, first = [], 1
        for size in sizes:
            batches.append(items(first, first + size))
            first += size
        for batch in batches:
            replay.after_step(batch, ctx)
        expected, collisions = algorithm_r(batches, memory, seed)
        assert stored_ids(replay) == expected
        total_collisions += collisions
    if memory == 3:
        assert total_collisions > 0  # the "later one wins" rule was exercised


def test_slot_draws_stay_uniform_after_millions_of_examples():
    """float32 uniforms (2**24 values) would reach only even slots once 2**25 were seen."""
    memory = 2**16
    replay, ctx = Replay(ReplayParams(memory=memory)), make_ctx()
    offer(replay, ctx, [memory])  # fill the buffer with 1..memory
    replay.n_seen = 2**25  # pretend that many examples were offered
    offer(replay, ctx, [2**16], first=10**8)  # each kept with probability 2**16 / 2**25
    replaced = torch.nonzero(replay.buffer.y >= 10**8).squeeze(1)
    assert 64 < len(replaced) < 200  # ~128 expected
    odd = int((replaced % 2 == 1).sum())
    assert 0.3 < odd / len(replaced) < 0.7


def test_make_batch_returns_the_batch_unchanged_before_anything_is_stored():
    replay, ctx = Replay(ReplayParams(memory=5)), make_ctx()
    batch = items(1, 9)
    state = ctx.generator.get_state()
    assert replay.make_batch(batch, ctx) is batch
    assert torch.equal(ctx.generator.get_state(), state)  # and draws nothing


@pytest.mark.parametrize("replay_batch_size, train_batch_size, expected", [
    (None, 16, 16), (5, 16, 5), (40, 16, 40)])
def test_make_batch_appends_memory_examples_from_filled_slots(replay_batch_size,
                                                               train_batch_size, expected):
    replay = Replay(ReplayParams(memory=50, replay_batch_size=replay_batch_size))
    ctx = make_ctx(batch_size=train_batch_size)
    offer(replay, ctx, [7, 5])  # 12 of 50 slots filled; the rest hold zeros (id 0)
    batch = items(1000, 1008)
    for _ in range(20):
        mixed = replay.make_batch(batch, ctx)
        assert len(mixed) == len(batch) + expected
        for part, new in zip(mixed, batch):
            assert torch.equal(part[: len(batch)], new)
        replayed = TensorSet(*(part[len(batch):] for part in mixed))
        assert set(replayed.y.tolist()) <= set(range(1, 13))  # stored examples only
        assert torch.equal(replayed.x.reshape(-1, 2)[:, 0].long(), replayed.y)  # whole examples
        assert torch.equal(replayed.task, replayed.y % 3)


def test_make_batch_draws_memory_uniformly_with_replacement():
    replay, ctx = Replay(ReplayParams(memory=10, replay_batch_size=32)), make_ctx()
    offer(replay, ctx, [10])
    counts = torch.zeros(11)
    for _ in range(200):
        ids = replay.make_batch(items(100, 101), ctx).y[1:]
        counts += torch.bincount(ids, minlength=11)
    share = counts[1:] / counts.sum()
    assert (share - 0.1).abs().max() < 0.02  # 6400 draws: sd of a share ~0.004


def test_state_dict_round_trip_continues_identically():
    replay, ctx = Replay(ReplayParams(memory=8)), make_ctx(3)
    first = offer(replay, ctx, [5, 6, 9])
    saved = io.BytesIO()
    torch.save(replay.state_dict(), saved)
    saved.seek(0)
    copy = Replay(ReplayParams(memory=8))
    copy.load_state_dict(torch.load(saved, weights_only=True))
    assert copy.n_seen == replay.n_seen == 20
    for a, b in zip(copy.buffer, replay.buffer):
        assert torch.equal(a, b)
    state = ctx.generator.get_state()
    offer(replay, ctx, [7, 7], first)
    ctx.generator.set_state(state)
    offer(copy, ctx, [7, 7], first)
    assert stored_ids(copy) == stored_ids(replay)
    empty = Replay()
    empty.load_state_dict(Replay().state_dict())
    assert empty.buffer is None and empty.n_seen == 0


def test_extra_bytes_is_the_buffer():
    replay, ctx = Replay(ReplayParams(memory=8)), make_ctx()
    assert replay.extra_bytes() == 0
    offer(replay, ctx, [3])  # the whole budget is allocated at the first store
    per_example = 2 * 4 + 8 + 8  # x: 2 float32, y and task: int64
    assert replay.extra_bytes() == 8 * per_example
    assert replay.extra_bytes() == sum(p.numel() * p.element_size() for p in replay.buffer)
    offer(replay, ctx, [30])
    assert replay.extra_bytes() == 8 * per_example


# ----------------------------------------------------------------------------- policies

def test_herding_is_the_greedy_mean_matching_order_on_a_hand_made_example():
    # mean 3.25. k=1: 2 is closest (1.25). k=2: with 2 chosen, adding 1 gives mean 1.5 (1.75
    # away) vs 0 -> 1.0 (2.25), 10 -> 6.0 (2.75). k=3: adding 10 gives 4.33 (1.08) vs 0 -> 1.0.
    # Nearest-to-the-mean would pick 0 third; herding picks 10.
    features = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    assert herding_selection(features, 3).tolist() == [2, 1, 3]
    assert herding_selection(features, 10).tolist() == [2, 1, 3, 0]  # at most every row once


def test_class_balanced_memory_gives_every_class_an_equal_share():
    replay, ctx = Replay(ReplayParams(memory=20, policy="class_balanced")), make_ctx()
    zeros = TensorSet(torch.randn(100, 1, 1, 2), torch.zeros(100, dtype=torch.long),
                      torch.zeros(100, dtype=torch.long))
    ones = TensorSet(torch.randn(10, 1, 1, 2), torch.ones(10, dtype=torch.long),
                     torch.zeros(10, dtype=torch.long))
    for data in (zeros, ones):
        for start in range(0, len(data), 8):
            replay.after_step(TensorSet(*(part[start:start + 8] for part in data)), ctx)
    assert replay.n_filled == 20
    assert torch.bincount(replay.buffer.y).tolist() == [10, 10]  # reservoir would keep ~2 ones
    # every stored example is one that was offered, with its own input
    for x, y in zip(replay.buffer.x, replay.buffer.y):
        source = zeros if y == 0 else ones
        assert any(torch.equal(x, other) for other in source.x)


def test_herding_memory_is_chosen_at_task_end_and_old_classes_keep_a_prefix():
    from tests.conftest import tiny_config
    from tests.test_methods import _context

    ctx = _context(tiny_config(stream={"scenario": "class", "n_tasks": 2}))
    replay = Replay(ReplayParams(memory=30, policy="herding"))
    task1, task2 = ctx.stream.tasks[:2]
    ctx.task = task1
    replay.after_step(task1.train, ctx)  # per-step offers change nothing under herding
    assert replay.n_filled == 0
    replay.after_task(ctx)
    first = replay.buffer
    assert torch.bincount(first.y).tolist()[min(task1.train.y):] == [15, 15]
    for cls in task1.train.y.unique():  # each class's exemplars are its herding choice
        members = task1.train.x[task1.train.y == cls]
        with torch.no_grad():
            features = torch.nn.functional.normalize(ctx.model.features(members), dim=1)
        expected = members[herding_selection(features, 15)]
        assert torch.equal(first.x[first.y == cls], expected)
    ctx.task = task2
    replay.after_task(ctx)
    counts = torch.bincount(replay.buffer.y)
    assert sorted(counts[counts > 0].tolist()) == [7, 7, 7, 7]  # 30 // 4 classes
    for cls in task1.train.y.unique():  # the first 7 of the earlier ordered list stay
        assert torch.equal(replay.buffer.x[replay.buffer.y == cls], first.x[first.y == cls][:7])


@pytest.mark.parametrize("policy", ["class_balanced", "herding"])
@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_every_policy_trains_and_keeps_memory(policy, scenario, tmp_path):
    from engram.results import read_rows
    from engram.experiments.continual import run_experiment
    from tests.conftest import tiny_config

    cfg = tiny_config(stream={"scenario": scenario},
                      methods=[{"name": "replay", "memory": 24, "policy": policy}])
    rows = read_rows(run_experiment(cfg, tmp_path, show_progress=False).results)
    memory = [float(r["value"]) for r in rows if r["metric"] == "extra_bytes"]
    assert memory[-1] > 0 and any(r["metric"] == "run_complete" for r in rows)


def test_a_herding_memory_smaller_than_the_classes_seen_is_refused():
    """memory // classes would be 0: every exemplar would be dropped without a word."""
    from engram.errors import ConfigError
    from engram.methods.replay import herding_memory

    from engram.models.nets import ContinualNet

    net = ContinualNet(torch.nn.Flatten(), 4, 1, 5)  # features: the flattened pixels
    data = TensorSet(torch.rand(10, 1, 2, 2), torch.arange(10) % 5, torch.zeros(10, dtype=torch.long))
    assert len(herding_memory(None, data, net, 5)) == 5  # one exemplar per class
    with pytest.raises(ConfigError, match="memory of 4 examples cannot hold one exemplar for "
                                          "each of the 5 classes"):
        herding_memory(None, data, net, 4)
