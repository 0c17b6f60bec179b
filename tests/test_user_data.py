"""engram.stream_from: streams from the user's own data (Datasets or tensor pairs)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import engram
from engram.config import DataConfig, ModelConfig, StreamConfig, parse_method
from engram.data import build_stream, user
from engram.data.sources import load_digits
from engram.data.streams import split_pools
from engram.errors import ConfigError, DataError
from engram.methods import METHODS, Context
from engram.models import build_model
from engram.training import evaluate, train_task
from tests.conftest import tiny_config


class PairDataset(Dataset):
    """A map-style Dataset as users write them: numpy x, int y."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i].numpy(), int(self.y[i])


@pytest.fixture(scope="module")
def digits():
    source = load_digits()
    pools = split_pools(source, DataConfig(val_fraction=0.1), torch.Generator().manual_seed(3))
    return source, pools


def assert_same_stream(a, b):
    assert (a.scenario, a.n_heads, a.head_dim, a.input_shape, a.class_names) == \
        (b.scenario, b.n_heads, b.head_dim, b.input_shape, b.class_names)
    assert len(a) == len(b)
    for ta, tb in zip(a.tasks, b.tasks):
        assert (ta.index, ta.name, ta.classes) == (tb.index, tb.name, tb.classes)
        for part_a, part_b in ((ta.train, tb.train), (ta.val, tb.val), (ta.test, tb.test)):
            assert (part_a is None) == (part_b is None)
            if part_a is not None:
                for tensor_a, tensor_b in zip(part_a, part_b):
                    assert tensor_a.dtype == tensor_b.dtype
                    assert torch.equal(tensor_a, tensor_b)


# ----------------------------------------------------------------------------- same tensors

@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_stream_from_equals_build_stream_on_digits(digits, scenario):
    source, pools = digits
    ours = engram.stream_from(pools.train, pools.test, val=pools.val, classes_per_task=2,
                              scenario=scenario)
    theirs = build_stream(source, DataConfig(val_fraction=0.1),
                          StreamConfig(kind="split", scenario=scenario, n_tasks=5,
                                       classes_per_task=2), seed=3)
    assert_same_stream(ours, theirs)


def test_dataset_gives_the_same_tensors_as_the_tensor_pair(digits, monkeypatch):
    _, pools = digits
    monkeypatch.setattr(user, "LOAD_BATCH", 97)  # several batches, a short last one
    as_datasets = engram.stream_from(PairDataset(*pools.train), PairDataset(*pools.test),
                                     val=PairDataset(*pools.val), classes_per_task=2)
    as_pairs = engram.stream_from(pools.train, pools.test, val=pools.val, classes_per_task=2)
    as_numpy = engram.stream_from(tuple(t.numpy() for t in pools.train),
                                  [t.numpy() for t in pools.test],
                                  val=tuple(t.numpy() for t in pools.val), classes_per_task=2)
    assert_same_stream(as_datasets, as_pairs)
    assert_same_stream(as_numpy, as_pairs)


# ----------------------------------------------------------------------------- labels

# Eight examples, x[i] = i, so every target can be traced back to its example.
TINY_Y = torch.tensor([5, 7, 2, 9, 7, 5, 9, 2])
TINY_X = torch.arange(8, dtype=torch.float32).reshape(8, 1)
TINY = (TINY_X, TINY_Y)


def targets_by_example(stream, split="train"):
    """{example index: (task, target)} over every task of the stream."""
    found = {}
    for task in stream.tasks:
        part = getattr(task, split)
        for x, y, t in zip(part.x[:, 0].tolist(), part.y.tolist(), part.task.tolist()):
            found[int(x)] = (t, y)
    return found


@pytest.mark.parametrize("scenario,expected,n_heads,head_dim", [
    # tasks=[[7, 5], [2, 9]]: 7 -> 0, 5 -> 1 in task 0; 2 -> 0, 9 -> 1 in task 1
    ("task", {7: (0, 0), 5: (0, 1), 2: (1, 0), 9: (1, 1)}, 2, 2),
    ("domain", {7: (0, 0), 5: (0, 1), 2: (1, 0), 9: (1, 1)}, 1, 2),
    ("class", {7: (0, 0), 5: (0, 1), 2: (1, 2), 9: (1, 3)}, 1, 4),
])
def test_scenario_targets_on_a_tiny_dataset(scenario, expected, n_heads, head_dim):
    stream = engram.stream_from(TINY, TINY, tasks=[[7, 5], [2, 9]], scenario=scenario)
    assert (stream.n_heads, stream.head_dim, stream.input_shape) == (n_heads, head_dim, (1,))
    assert [task.classes for task in stream.tasks] == [[7, 5], [2, 9]]
    assert stream.class_names == [str(c) for c in range(10)]
    for split in ("train", "test"):
        got = targets_by_example(stream, split)
        assert got == {i: expected[int(label)] for i, label in enumerate(TINY_Y)}


def test_classes_per_task_sorts_or_follows_class_order():
    stream = engram.stream_from(TINY, TINY, classes_per_task=2)
    assert [task.classes for task in stream.tasks] == [[2, 5], [7, 9]]
    ordered = engram.stream_from(TINY, TINY, classes_per_task=2, class_order=[9, 7, 5, 2])
    assert [task.classes for task in ordered.tasks] == [[9, 7], [5, 2]]
    assert targets_by_example(ordered)[3] == (0, 0)  # example 3 is a 9: first class of task 0


def test_task_of_vectorised_and_per_example_agree():
    def per_example(x, y):
        return 0 if y in (5, 7) else 1  # fails on tensors ("ambiguous"): called per example

    def vectorised(x, y):
        return (~torch.isin(y, torch.tensor([5, 7]))).long()

    one, other = (engram.stream_from(TINY, TINY, task_of=f, scenario="class")
                  for f in (per_example, vectorised))
    assert_same_stream(one, other)
    assert [task.classes for task in one.tasks] == [[5, 7], [2, 9]]
    assert [task.name for task in one.tasks] == ["task 1", "task 2"]


def test_task_of_can_repeat_classes_across_tasks():
    """Domain-incremental by a feature of x: both tasks hold classes 5 and 7."""
    y = torch.tensor([5, 7, 5, 7])
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    stream = engram.stream_from((x, y), (x, y), task_of=lambda x, y: int(x[0] >= 10),
                                scenario="class")
    assert [task.classes for task in stream.tasks] == [[5, 7], [5, 7]]
    assert stream.head_dim == 4
    assert [task.train.y.tolist() for task in stream.tasks] == [[0, 1], [2, 3]]


def test_per_task_datasets_give_the_tasks():
    """Train/test as lists, one dataset per task: permuted-style domain-IL, classes repeat."""
    x, y = TINY
    shifted = (x + 100, y)
    stream = engram.stream_from([PairDataset(x, y), shifted], [TINY, PairDataset(*shifted)],
                                scenario="domain")
    assert (len(stream), stream.n_heads, stream.head_dim) == (2, 1, 4)
    assert [task.classes for task in stream.tasks] == [[2, 5, 7, 9], [2, 5, 7, 9]]
    assert torch.equal(stream.tasks[1].train.x, x + 100)
    assert torch.equal(stream.tasks[0].test.y, stream.tasks[1].test.y)
    assert stream.tasks[1].val is None
    class_il = engram.stream_from([TINY, shifted], [TINY, shifted], scenario="class")
    assert torch.equal(class_il.tasks[1].train.y, class_il.tasks[0].train.y + 4)


# ----------------------------------------------------------------------------- bad inputs

class NotPairs(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.zeros(2)


BAD = {
    "scenario": (dict(scenario="online", classes_per_task=2), ConfigError, "scenario='online'"),
    "two boundaries": (dict(classes_per_task=2, tasks=[[2, 5], [7, 9]]), ConfigError,
                       "classes_per_task and tasks"),
    "no boundary": (dict(), ConfigError, "got none"),
    "overlap": (dict(tasks=[[2, 5], [5, 7, 9]]), ConfigError, "class 5 is in tasks 1 and 2"),
    "class in no task": (dict(tasks=[[2, 5], [7]]), ConfigError, "class 9 of train is in no task"),
    "empty task": (dict(tasks=[[2, 5], [], [7, 9]]), ConfigError,
                   "task 2 of tasks= has no classes"),
    "class without examples": (dict(tasks=[[2, 5], [7, 9, 4]]), DataError,
                               "class 4 of task 2 has no training examples"),
    "uneven groups": (dict(classes_per_task=3), ConfigError, "do not split into groups of"),
    "non-integer class": (dict(tasks=[[2, 5.0], [7, 9]]), ConfigError, "holds 5.0"),
    "domain uneven": (dict(tasks=[[2], [5, 7, 9]], scenario="domain"), ConfigError,
                      "same number of classes"),
    "order and tasks": (dict(tasks=[[2, 5], [7, 9]], class_order=[2, 5, 7, 9]), ConfigError,
                        "drop class_order"),
    "order lacks a class": (dict(classes_per_task=2, class_order=[2, 5, 7]), ConfigError,
                            "class_order lacks class 9"),
    "task_of gap": (dict(task_of=lambda x, y: (y > 5).long() * 2), DataError,
                    "no training example to task 2"),
    "task_of fails": (dict(task_of=lambda x, y: 1 // 0), DataError,
                      "task_of failed on train example 0: ZeroDivisionError"),
    "task_of not an index": (dict(task_of=lambda x, y: "first"), DataError, "returned 'first'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_option_gives_one_line(case):
    options, error, words = BAD[case]
    with pytest.raises(error) as raised:
        engram.stream_from(TINY, TINY, **options)
    message = str(raised.value)
    assert words in message and "\n" not in message


BAD_DATA = {
    "lengths": ((TINY_X, TINY_Y[:7]), TINY, "8 examples in x but 7 labels"),
    "float labels": ((TINY_X, TINY_Y.float()), TINY, "labels are torch.float32, not integers"),
    "negative label": ((TINY_X, TINY_Y - 3), TINY, "label -1"),
    "label shape": ((TINY_X, TINY_Y[:, None]), TINY, "labels have shape (8, 1)"),
    "test class absent": (TINY, (TINY_X, TINY_Y.clamp(max=8)),
                          "test has classes absent from train: [8]"),
    "test shape": (TINY, (TINY_X.reshape(8, 1, 1), TINY_Y), "test examples have shape (1, 1)"),
    "not pairs": (NotPairs(), TINY, "train items must be (x, y) pairs; one is a Tensor"),
    "not data": (42, TINY, "train is of type int"),
    "triple": ((TINY_X, TINY_Y, TINY_Y), TINY, "train is a tuple of 3 but not an (x, y) pair"),
    "per-task lengths": ([TINY, TINY], [TINY], "test must be a list of 2"),
}


class StringLabels(PairDataset):
    def __getitem__(self, i):
        return self.x[i], "cat"


BAD_DATA["string labels"] = (StringLabels(TINY_X, TINY_Y), TINY,
                             "train has a label that is not numeric")


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_each_bad_dataset_gives_one_line(case):
    train, test, words = BAD_DATA[case]
    with pytest.raises(DataError) as raised:
        boundary = {} if isinstance(train, list) else {"classes_per_task": 1}
        engram.stream_from(train, test, **boundary)
    message = str(raised.value)
    assert words in message and "\n" not in message


def test_per_task_data_refuses_a_boundary_option():
    with pytest.raises(ConfigError, match="given per task"):
        engram.stream_from([TINY, TINY], [TINY, TINY], classes_per_task=2)


# ----------------------------------------------------------------------------- package root

def test_stream_from_is_a_lazy_export_of_the_package_root():
    code = ("import sys, engram; assert 'torch' not in sys.modules, 'torch at import'; "
            "assert 'stream_from' in dir(engram); f = engram.stream_from; "
            "assert 'torch' in sys.modules and f.__module__ == 'engram.data.user'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- training

def test_naive_trains_one_epoch_on_a_user_stream(digits):
    _, pools = digits
    stream = engram.stream_from(PairDataset(*pools.train), pools.test, classes_per_task=2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=[32]), stream.input_shape, stream.n_heads,
                        stream.head_dim)
    ctx = Context(model=model, stream=stream, train_cfg=tiny_config(train={"epochs": 1}).train,
                  generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    method = METHODS.get("naive")(parse_method("naive", {}, "test").params)
    ctx.model = method.prepare_model(ctx.model, ctx)
    before, _ = evaluate(ctx.model, stream.tasks[0].test)
    losses = []
    ctx.task = stream.tasks[0]
    ctx.seen_tasks.append(ctx.task)
    train_task(ctx, method, lambda epoch, loss: losses.append(loss))
    after, _ = evaluate(ctx.model, stream.tasks[0].test)
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert after > 0.8 > before  # two digits of ten classes: chance is far below
