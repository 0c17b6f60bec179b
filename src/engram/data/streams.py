"""Streams: pure functions of (dataset, stream config, seed) -> a sequence of tasks.

Scenarios (van de Ven & Tolias 2019, "Three scenarios for continual learning"):
- task-incremental: the task id is given; one output head per task, targets are the
  within-task label 0..K-1.
- domain-incremental: no task id; one shared head of K outputs, targets are the within-task
  label (split digits: "first or second class of the pair?").
- class-incremental: no task id; one head over every class of every task, targets are the
  class's position among all tasks' classes (split digits: the digit itself; permuted
  digits: 10 * task + digit).

Everything is a tensor on the run's device from the start, so a training step is indexing;
only a user's Dataset too large for memory keeps its inputs unread (engram.data.lazy).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from engram.config import DataConfig, StreamConfig
from engram.data.lazy import LazyInputs, select
from engram.data.sources import SourceData
from engram.errors import ConfigError


class TensorSet(NamedTuple):
    """Examples of one split: x (N, C, H, W) float, y (N,) scenario targets, task (N,) task ids.
    x is LazyInputs (engram.data.lazy) for a Dataset streamed from disk: read it by `batches`."""
    x: torch.Tensor  # or LazyInputs (see above)
    y: torch.Tensor
    task: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "TensorSet":
        return TensorSet(self.x.to(device), self.y.to(device), self.task.to(device))

    @staticmethod
    def concat(sets: list["TensorSet"]) -> "TensorSet":
        xs, ys, tasks = zip(*sets)
        lazy = isinstance(xs[0], LazyInputs)
        return TensorSet(LazyInputs.concat(xs) if lazy else torch.cat(xs), torch.cat(ys),
                         torch.cat(tasks))


def batches(data: TensorSet, order: torch.Tensor | None, size: int) -> Iterator[TensorSet]:
    """The examples of `data` in `order` (N positions; None: as stored), `size` at a time, on
    data's device: tensors are indexed (sliced in stored order); LazyInputs are read ahead by
    a DataLoader (engram.data.lazy)."""
    if order is None and not isinstance(data.x, LazyInputs):
        for start in range(0, len(data), size):
            yield TensorSet(*(part[start:start + size] for part in data))
        return
    if isinstance(data.x, LazyInputs):  # the reader wants positions on the CPU
        positions = list((torch.arange(len(data)) if order is None else order.cpu()).split(size))
        xs = data.x.read(positions)
    else:
        positions = list(order.to(data.y.device).split(size))
        xs = (data.x[index] for index in positions)
    for index, x in zip(positions, xs):
        yield TensorSet(x, data.y[index], data.task[index])


@dataclass
class Task:
    """One task of a stream: its classes and its train, val (None without a validation
    split) and test examples, each a TensorSet whose y holds the scenario's targets."""
    index: int            # 0-based position in the stream
    name: str             # e.g. "0/1" or "perm 2"
    classes: list[int]    # the source's class labels in this task
    train: TensorSet
    val: TensorSet | None
    test: TensorSet


@dataclass
class Stream:
    """A sequence of tasks to learn one after another (engram.stream_from builds one from
    your data). The scenario (van de Ven & Tolias 2019) says what a network must tell apart:
    "task" (task-incremental: one head per task, the task id given at test time),
    "domain" (domain-incremental: one shared head of a task's classes, no task id), or
    "class" (class-incremental: one head over every class seen, no task id)."""
    tasks: list[Task]
    scenario: str
    n_heads: int          # 1, or one per task in task-incremental learning
    head_dim: int         # outputs per head
    input_shape: tuple[int, ...]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.tasks)


class Pools(NamedTuple):
    """The source split once into train/val/test pools (x, source labels).

    `classes` holds every label of the source, taken before `data.limit` drops examples, so
    a small limit can neither shift the split groups nor leave val/test examples whose class
    has no target (permuted and rotated keep the val/test pools whole).
    """
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor]
    classes: list[int]


def split_pools(source: SourceData, cfg: DataConfig, generator: torch.Generator) -> Pools:
    """The source shuffled by `generator` and split into test (unless the source has one), val
    and train pools, train capped at data.limit."""
    x, y = source.x_train, source.y_train
    labels = y if source.y_test is None else torch.cat([y, source.y_test])
    classes = sorted(torch.unique(labels).tolist())
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    if source.x_test is None:
        n_test = round(len(y) * cfg.test_fraction)
        test = (x[:n_test], y[:n_test])
        x, y = x[n_test:], y[n_test:]
    else:
        test = (source.x_test, source.y_test)
    if cfg.limit is not None:
        x, y = x[: cfg.limit], y[: cfg.limit]
    n_val = round(len(y) * cfg.val_fraction)
    val = (x[:n_val], y[:n_val]) if n_val > 0 else None
    return Pools((x[n_val:], y[n_val:]), val, test, classes)


# A task builder turns the pools into per-task (x, source label) triples plus the task's
# classes; build_stream then attaches scenario targets. Signature:
#   builder(pools, cfg, generator) -> list[(name, classes, train, val, test)]

def split_tasks(pools: Pools, cfg: StreamConfig, generator: torch.Generator) -> list:
    classes = pools.classes
    needed = cfg.n_tasks * cfg.classes_per_task
    if needed > len(classes):
        raise ConfigError(
            f"stream.n_tasks={cfg.n_tasks} x stream.classes_per_task={cfg.classes_per_task} "
            f"needs {needed} classes but the dataset has {len(classes)}")
    groups = [classes[i * cfg.classes_per_task:(i + 1) * cfg.classes_per_task]
              for i in range(cfg.n_tasks)]
    return [class_subset(pools, group) for group in groups]


def ab_tasks(pools: Pools, cfg: StreamConfig, generator: torch.Generator) -> list:
    classes = pools.classes
    half = len(classes) // 2
    return [class_subset(pools, classes[:half]), class_subset(pools, classes[half:])]


def class_subset(pools: Pools, group: list[int]) -> tuple:
    """(name, classes, train, val, test) of the pools' examples whose label is in `group`."""
    def keep(pair):
        if pair is None:
            return None
        x, y = pair
        mask = torch.isin(y, torch.tensor(group, dtype=torch.long))
        return select(x, mask), y[mask]
    name = "/".join(str(c) for c in group)
    return name, group, keep(pools.train), keep(pools.val), keep(pools.test)


def permuted_tasks(pools: Pools, cfg: StreamConfig, generator: torch.Generator) -> list:
    classes = pools.classes
    n_pixels = math.prod(pools.train[0].shape[2:])  # H * W, even for an empty pool
    tasks = []
    for t in range(cfg.n_tasks):
        # Task 1 keeps the original images, so its accuracy is comparable with split runs.
        perm = torch.arange(n_pixels) if t == 0 else torch.randperm(n_pixels, generator=generator)

        def permute(pair, perm=perm):
            if pair is None:
                return None
            x, y = pair
            flat = x.flatten(2)[:, :, perm]  # same permutation per channel
            return flat.reshape(x.shape), y
        tasks.append((f"perm {t + 1}", classes, permute(pools.train), permute(pools.val),
                      permute(pools.test)))
    return tasks


def rotate_images(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (N, C, H, W) images about their centre (bilinear, zeros outside)."""
    if degrees % 360 == 0 or len(x) == 0:  # grid_sample refuses an empty batch
        return x.clone()
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotated_tasks(pools: Pools, cfg: StreamConfig, generator: torch.Generator) -> list:
    classes = pools.classes
    tasks = []
    for t in range(cfg.n_tasks):
        degrees = t * cfg.rotation_step

        def rotate(pair, degrees=degrees):
            return None if pair is None else (rotate_images(pair[0], degrees), pair[1])
        tasks.append((f"rot {degrees:g}", classes, rotate(pools.train), rotate(pools.val),
                      rotate(pools.test)))
    return tasks


def label_tasks(raw_tasks: list, scenario: str, device: torch.device | str = "cpu",
                empty_hint: str = "raise data.limit or lower stream.n_tasks"
                ) -> tuple[list[Task], int, int]:
    """Attach scenario targets to per-task (x, source label) pairs: (tasks, n_heads, head_dim).

    `raw_tasks` is a list of (name, classes, train, val, test) with each split an (x, y) pair of
    source labels (val may be None) and `classes` the task's labels in target order. Targets are
    each label's position in its task's `classes` (task/domain), shifted by the classes of the
    tasks before it (class). Used by build_stream and engram.stream_from alike.
    """
    head_dim = max(len(classes) for _, classes, *_ in raw_tasks)
    tasks, offset = [], 0
    for index, (name, classes, train, val, test) in enumerate(raw_tasks):
        # Checked first: a task with no classes would break the label lookup table below.
        if len(train[1]) == 0:
            raise ConfigError(f"task {index + 1} ({name}) has no training examples; {empty_hint}")
        # source label -> within-task label 0..K-1 via a lookup table
        local = torch.full((int(max(classes)) + 1,), -1, dtype=torch.long)
        local[torch.tensor(classes)] = torch.arange(len(classes))

        def targets(pair, index=index, local=local, offset=offset):
            if pair is None:
                return None
            x, y = pair
            label = local[y]
            if scenario == "class":
                label = label + offset
            return TensorSet(x, label, torch.full_like(label, index)).to(device)
        tasks.append(Task(index, name, list(classes), targets(train), targets(val), targets(test)))
        offset += len(classes)
    n_heads = len(tasks) if scenario == "task" else 1
    out_dim = offset if scenario == "class" else head_dim
    return tasks, n_heads, out_dim


def build_stream(source: SourceData, data_cfg: DataConfig, cfg: StreamConfig, seed: int,
                 device: torch.device | str = "cpu") -> Stream:
    """The task sequence for one seed: same arguments, same tensors."""
    from engram.registry import STREAMS

    generator = torch.Generator().manual_seed(seed)
    pools = split_pools(source, data_cfg, generator)
    raw_tasks = STREAMS.get(cfg.kind)(pools, cfg, generator)
    tasks, n_heads, head_dim = label_tasks(raw_tasks, cfg.scenario, device)
    return Stream(tasks, cfg.scenario, n_heads, head_dim, tuple(source.x_train.shape[1:]),
                  source.class_names)
