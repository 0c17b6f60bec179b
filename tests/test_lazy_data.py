"""Streams larger than memory: a Dataset whose inputs stay unread (engram.data.lazy) trains
and evaluates to the same rows as the same data held in memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

import engram
import engram.data.user as user
from engram.data.lazy import LazyInputs
from engram.data.streams import TensorSet, batches
from engram.errors import ConfigError, DataError
from engram.registry import METHODS


class Pairs(Dataset):
    """A map-style Dataset of (x, int label) that counts how many items were read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.reads = x, y, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], int(self.y[i])


def data(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


X, Y = data()
NET = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                          torch.nn.Linear(32, 4))


def stream(**options) -> engram.data.Stream:
    return engram.stream_from(Pairs(X[:200], Y[:200]), Pairs(X[200:], Y[200:]),
                              classes_per_task=2, **options)


def measured_rows(result) -> list[tuple]:
    """The result's rows without the wall-clock ones (which differ from run to run)."""
    rows = result.rows[result.rows.metric != "train_seconds"]
    return list(rows[["task_trained", "epoch", "task_eval", "metric", "value"]]
                .itertuples(index=False))


def test_streamed_inputs_stay_unread_until_trained():
    streamed = stream(in_memory=False)
    x = streamed.tasks[0].train.x
    assert isinstance(x, LazyInputs) and x.shape == (len(x), 1, 8, 8)
    assert isinstance(stream(in_memory=True).tasks[0].train.x, torch.Tensor)
    # the labels are tensors, each task's inputs the dataset items of its classes
    task = streamed.tasks[1]
    assert torch.equal(Y[:200][task.train.x.items], task.train.y)  # class-IL: target = class
    assert torch.equal(x[torch.tensor([3, 0])], X[:200][x.items[[3, 0]]])


# Every method reads the task's data somehow (mini-batches, random subsets for a Fisher or a
# memory, a whole task for sleep, the joint set): streamed, the rows must not change.
@pytest.mark.parametrize("method", [m for m in METHODS.names()
                                    if m not in ("mcsgd", "sleep", "ewc", "online_ewc")]
                         + [pytest.param(m, marks=pytest.mark.slow)
                            for m in ("mcsgd", "sleep", "ewc", "online_ewc")])
def test_every_method_gives_the_in_memory_rows_on_a_streamed_dataset(method):
    in_memory = engram.fit(NET, stream(in_memory=True), method, epochs=1, progress=False)
    streamed = engram.fit(NET, stream(in_memory=False), method, epochs=1, progress=False)
    assert measured_rows(streamed) == measured_rows(in_memory)


def test_worker_processes_read_the_same_batches():
    in_memory = engram.fit(NET, stream(in_memory=True), "replay", epochs=2, progress=False)
    workers = engram.fit(NET, stream(in_memory=False, workers=1), "replay", epochs=2,
                         progress=False)
    assert measured_rows(workers) == measured_rows(in_memory)


def test_moved_inputs_are_read_onto_the_new_device():
    x = stream(in_memory=False).tasks[0].train.x
    moved = x.to("meta")
    assert moved.device == torch.device("meta") and x.device == torch.device("cpu")
    assert moved[torch.tensor([0, 1])].device == torch.device("meta")


def test_the_size_decides_when_not_told(monkeypatch):
    needed = 300 * 64 * 4  # every split's inputs as float32
    monkeypatch.setattr(user, "memory_budget", lambda device: needed - 1)
    assert isinstance(stream().tasks[0].train.x, LazyInputs)
    monkeypatch.setattr(user, "memory_budget", lambda device: needed)
    assert isinstance(stream().tasks[0].train.x, torch.Tensor)


def test_per_task_datasets_and_task_of_stream_too():
    first, second = Pairs(X[:100], Y[:100]), Pairs(X[100:200], Y[100:200])
    per_task = engram.stream_from([first, second], [first, second], scenario="domain",
                                  in_memory=False)
    assert [len(t.train) for t in per_task.tasks] == [100, 100]
    assert per_task.tasks[1].train.x.dataset is second
    by_function = {in_memory: engram.stream_from(
        Pairs(X, Y), Pairs(X, Y), task_of=lambda x, y: (x.mean(dim=(1, 2, 3)) > 0.5).long(),
        in_memory=in_memory) for in_memory in (True, False)}
    for lazy, kept in zip(by_function[False].tasks, by_function[True].tasks):
        assert torch.equal(lazy.train.x[:], kept.train.x) and torch.equal(lazy.train.y, kept.train.y)


def test_joint_reads_the_concatenation_of_several_datasets():
    first, second = Pairs(*data(10, 1)), Pairs(*data(7, 2))
    a = LazyInputs(first, torch.tensor([9, 0]), (1, 8, 8))
    b = LazyInputs(second, torch.tensor([6, 1, 2]), (1, 8, 8))
    joined = TensorSet.concat([TensorSet(a, torch.zeros(2), torch.zeros(2)),
                               TensorSet(b, torch.ones(3), torch.ones(3))])
    expected = torch.cat([first.x[[9, 0]], second.x[[6, 1, 2]]])
    assert torch.equal(joined.x[:], expected)
    read = torch.cat([chunk.x for chunk in batches(joined, torch.tensor([4, 0, 2, 1, 3]), 2)])
    assert torch.equal(read, expected[[4, 0, 2, 1, 3]])


class OddShape(Pairs):
    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return (x[:, :4] if i == 150 else x), y


@pytest.mark.parametrize("workers", [0, 1])
def test_an_odd_item_is_one_line_naming_it(workers):
    with pytest.raises(DataError) as raised:
        engram.stream_from(OddShape(X, Y), Pairs(X, Y), classes_per_task=2, in_memory=False,
                           workers=workers)
    message = str(raised.value)
    assert "differ in shape" in message and "\n" not in message
    # an item that changes shape after the labels were read is named when it is read
    data = Pairs(X, Y)
    lazy = LazyInputs(OddShape(X, Y), torch.arange(300), (1, 8, 8), "train", workers=workers)
    with pytest.raises(DataError) as raised:
        list(batches(TensorSet(lazy, data.y, data.y), None, 64))
    assert str(raised.value) == "train item 150 has shape (1, 4, 8) but the first has (1, 8, 8)"


@pytest.mark.parametrize("bad", ["yes", 1, -1, 1.5])
def test_bad_streaming_options_are_one_line(bad):
    option = "workers" if bad in (-1, 1.5) else "in_memory"
    with pytest.raises(ConfigError) as raised:
        stream(**{option: bad})
    assert option in str(raised.value) and "\n" not in str(raised.value)


def test_a_streamed_run_resumes_under_its_own_id(tmp_path):
    lazy = stream(in_memory=False)
    first = engram.fit(NET, lazy, "naive", epochs=1, out=tmp_path, progress=False)
    again = engram.fit(NET, stream(in_memory=False), "naive", epochs=1, out=tmp_path,
                       progress=False)
    assert again.run_id == first.run_id
    assert len(again.rows) == len(first.rows)


def test_in_memory_examples_join_streamed_ones():
    streamed = Pairs(*data(10, 3))
    lazy = LazyInputs(streamed, torch.tensor([4, 2]), (1, 8, 8))
    memory = torch.rand(3, 1, 8, 8)
    joined = LazyInputs.concat([lazy, memory])
    assert torch.equal(joined[:], torch.cat([streamed.x[[4, 2]], memory]))


def test_at_most_two_worker_pools_stay_up():
    """Per-task datasets each get a reader; their persistent worker pools are capped (20
    processes stayed up for 5 tasks x 2 splits x 2 workers before)."""
    import gc

    import engram.data.lazy as lazy

    sets = [Pairs(*data(20, seed)) for seed in range(5)]
    streamed = engram.stream_from(sets, sets, scenario="domain", in_memory=False, workers=1)
    in_memory = engram.stream_from(sets, sets, scenario="domain", in_memory=True)
    kept = engram.fit(NET, in_memory, "naive", epochs=2, progress=False)
    read = engram.fit(NET, streamed, "naive", epochs=2, progress=False)
    assert measured_rows(read) == measured_rows(kept)
    readers = {id(task.train.x.reader): task.train.x.reader for task in streamed.tasks}
    gc.collect()
    assert sum(reader.loader is not None for reader in readers.values()) <= lazy.LIVE_POOLS
