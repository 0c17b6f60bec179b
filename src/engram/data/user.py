"""Streams from the user's own data: `engram.stream_from(train, test, ...)` -> Stream.

The data arrive as map-style torch Datasets of (x, y) or as (x, y) pairs of tensors/arrays;
they are read once into tensors (engram trains with everything on the device, so a training
step is indexing) and cut into tasks by class groups, by a user function, or given per task.
The scenario targets come from the same `label_tasks` that build_stream uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, get_args, get_type_hints

import numpy as np
import torch

from engram.config import StreamConfig
from engram.data.lazy import (LazyInputs, from_workers, item_input, item_tensor, memory_budget,
                              select)
from engram.data.sources import PROGRESS_FROM
from engram.data.streams import Pools, Stream, TensorSet, batches, class_subset, label_tasks
from engram.errors import ConfigError, DataError

SCENARIOS = get_args(get_type_hints(StreamConfig)["scenario"])  # ("task", "domain", "class")
LOAD_BATCH = 512        # examples per DataLoader batch when a Dataset is read into tensors

Pair = tuple[torch.Tensor, torch.Tensor]


def stream_from(train: Any, test: Any, *, val: Any = None, scenario: str = "class",
                classes_per_task: int | None = None, tasks: Sequence[Sequence[int]] | None = None,
                task_of: Callable[[Any, Any], Any] | None = None,
                class_order: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                device: torch.device | str = "cpu", in_memory: bool | None = None,
                workers: int = 0) -> Stream:
    """A continual-learning Stream from your own data, ready for engram's training loop.

    Data (`train`, `test`, optional `val`), each one of:
      - a map-style torch Dataset whose items are (x, y): x a tensor or array-like, y an int
        or a 0-d tensor (torchvision datasets with a ToTensor transform work as they are);
      - an (x, y) pair of tensors or numpy arrays, x (N, ...) and y (N,) integer labels;
      - a list with one of the above per task (one Dataset or pair per task): the tasks are
        then given by the data, e.g. permuted or rotated copies where the classes repeat
        (domain-incremental). val, when given, is then a list of the same length.
    Datasets are read once into tensors (in batches of 512, with a progress bar for large
    ones) and kept on `device`, so a training step is indexing. x becomes float32 as given
    (scale images to [0, 1] yourself); labels are integers >= 0.

    Data larger than memory: with in_memory=None (the default) a Dataset whose inputs would
    take more than half the memory free now (host, and CUDA when `device` is one:
    engram.data.lazy.memory_budget) is streamed instead: one pass reads its labels (and
    checks every item), then its inputs are read batch by batch while training and
    evaluating, by a DataLoader with `workers` processes (pinned memory on CUDA). The batches,
    and so the results, are those of the in-memory path. in_memory=True or False forces
    the choice; (x, y) tensor pairs are in memory already and stay so.

    Task boundaries, exactly one of (unless the data are given per task):
      - classes_per_task=K: the sorted classes of train (or `class_order`) in groups of K;
      - tasks=[[0, 1], [2, 3], ...]: the classes of each task, in target order;
      - task_of=f: f(x, y) -> the task index (0, 1, ...) of an example. It is first called
        once on all of a split's tensors (a vectorised f returns N indices), and per example
        (x[i], int(y[i])) when that call fails or returns something else.
    `class_order` orders the classes (and so the targets) wherever engram chooses them: the
    groups of classes_per_task, and each task's classes under task_of or per-task data
    (default: sorted).

    Scenarios (as build_stream): "task" (one head per task, targets 0..K-1 within the task),
    "domain" (one shared head, targets 0..K-1 within the task; every task needs the same number
    of classes), "class" (one head over all tasks' classes, each task's targets shifted by the
    classes of the tasks before it).

    `class_names` (indexed by label) defaults to a Dataset's `classes` attribute, else "0", "1",
    .... Every bad input raises a one-line ConfigError (options) or DataError (data).
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario={scenario!r} is not one of {', '.join(SCENARIOS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an integer >= 0, got {workers!r}")
    boundaries = {name: value for name, value in (("classes_per_task", classes_per_task),
                                                  ("tasks", tasks), ("task_of", task_of))
                  if value is not None}
    order = None if class_order is None else _class_order(class_order)
    if _is_per_task(train):
        if boundaries:
            raise ConfigError(f"train and test are given per task (lists), which sets the tasks "
                              f"already: drop {', '.join(boundaries)}")
        lazy = _stream_lazily([*train, *test, *(val or [])], in_memory, device)
        raw_tasks = _per_task_data(train, test, val, order, lazy, workers)
        first = train[0]
    else:
        if len(boundaries) != 1:
            given = f"got {' and '.join(boundaries)}" if boundaries else "got none"
            raise ConfigError("give exactly one of classes_per_task=, tasks= or task_of= "
                              f"(or train and test as lists, one per task); {given}")
        if tasks is not None and order is not None:
            raise ConfigError("tasks= lists the classes in order already: drop class_order")
        given = {"train": train, "test": test, **({} if val is None else {"val": val})}
        lazy = _stream_lazily(list(given.values()), in_memory, device)
        splits = {split: as_tensors(data, split, lazy, workers) for split, data in given.items()}
        _check_shapes(splits)
        _check_known_classes(splits)
        if task_of is not None:
            raw_tasks = _tasks_by_function(splits, task_of, order)
        else:
            groups = (_class_groups(splits, classes_per_task, order) if tasks is None
                      else _check_groups(tasks))
            raw_tasks = _tasks_by_classes(splits, groups)
        first = train
    if scenario == "domain" and len({len(classes) for _, classes, *_ in raw_tasks}) > 1:
        counts = [len(classes) for _, classes, *_ in raw_tasks]
        raise ConfigError(f"scenario='domain' shares one head, so every task needs the same "
                          f"number of classes; the tasks have {counts}")
    labelled, n_heads, head_dim = label_tasks(raw_tasks, scenario, device,
                                              "every task needs training examples")
    input_shape = tuple(labelled[0].train.x.shape[1:])  # tensors and LazyInputs alike
    max_label = max(max(classes) for _, classes, *_ in raw_tasks)
    return Stream(labelled, scenario, n_heads, head_dim, input_shape,
                  _class_names(class_names, first, max_label))


# ----------------------------------------------------------------------------- reading data

def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _is_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(map(_is_array, data))


def _is_per_task(data: Any) -> bool:
    return isinstance(data, list) and not _is_pair(data)


def _is_dataset(data: Any) -> bool:
    return not isinstance(data, (tuple, list)) and hasattr(data, "__getitem__") \
        and hasattr(data, "__len__")


def _stream_lazily(datas: list[Any], in_memory: bool | None, device: torch.device | str
                   ) -> bool:
    """Whether the Datasets among `datas` are to be streamed (see stream_from): as asked, or,
    with in_memory=None, when their inputs as float32 would exceed memory_budget(device),
    estimated from each one's first item."""
    if in_memory is not None:
        if not isinstance(in_memory, bool):
            raise ConfigError(f"in_memory must be True, False or None (choose by size), got "
                              f"{in_memory!r}")
        return not in_memory
    needed = 0
    for data in datas:
        if _is_dataset(data) and len(data) > 0:
            try:
                needed += len(data) * 4 * item_input(data, 0, "a dataset").numel()
            except DataError:
                pass  # a malformed item: the read that follows names the problem
    return needed > memory_budget(device)


def as_tensors(data: Any, split: str, lazy: bool = False, workers: int = 0) -> Pair:
    """(x float32 (N, ...), y int64 (N,)) from an (x, y) pair of tensors/arrays or a map-style
    Dataset of (x, y) items; a DataError naming `split` for anything else. lazy: a Dataset's
    x stays unread (LazyInputs read by `workers` DataLoader processes), only y is kept."""
    if _is_pair(data):
        x, y = (torch.as_tensor(part) for part in data)
    elif isinstance(data, (tuple, list)):
        raise DataError(f"{split} is a {type(data).__name__} of {len(data)} but not an (x, y) "
                        "pair of tensors or arrays")
    elif _is_dataset(data):
        x, y = _read_dataset(data, split, lazy, workers)
    else:
        raise DataError(f"{split} is of type {type(data).__name__}: give a torch Dataset of (x, y) "
                        "or an (x, y) pair of tensors or arrays")
    if len(x) != len(y):
        raise DataError(f"{split} has {len(x)} examples in x but {len(y)} labels in y")
    if len(y) == 0:
        raise DataError(f"{split} has no examples")
    if y.ndim != 1:
        raise DataError(f"{split} labels have shape {tuple(y.shape)}: give one integer label "
                        "per example, shape (N,)")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{split} labels are {y.dtype}, not integers (cast them with .long() "
                        "if they are class indices)")
    if int(y.min()) < 0:
        raise DataError(f"{split} has the label {int(y.min())}: labels must be 0 or more")
    if len(x.shape) < 2:
        raise DataError(f"{split} x has shape {tuple(x.shape)}: each example needs at least "
                        "one dimension (reshape it to (N, 1))")
    if isinstance(x, LazyInputs):
        return x, y.to(torch.long)
    if x.dtype.is_complex:
        raise DataError(f"{split} x is {x.dtype}: engram trains on real numbers")
    return x.to(torch.float32), y.to(torch.long)


def _read_dataset(dataset: Any, split: str, lazy: bool = False, workers: int = 0
                  ) -> tuple[torch.Tensor | LazyInputs, torch.Tensor]:
    """Every (x, y) item of a map-style Dataset, stacked, read in order in batches; lazy: the
    labels only (every item is still read once, and checked), x left as LazyInputs."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    n = len(dataset)
    if n == 0:
        raise DataError(f"{split} has no examples")

    # A picklable collate (a module-level function bound by partial): worker processes
    # started by spawn or forkserver (macOS, Windows, Python 3.14's default) receive it.
    loader = DataLoader(dataset, batch_size=min(LOAD_BATCH, n), shuffle=False,
                        collate_fn=functools.partial(_collate_items, split=split, lazy=lazy),
                        num_workers=workers if lazy else 0)
    read = list(tqdm(from_workers(loader), total=len(loader), desc=f"reading {split}", unit="batch", leave=False,
                     disable=True if n < PROGRESS_FROM else None))
    shapes = sorted({tuple(shape) for *_, shape in read})
    if len(shapes) > 1:
        raise DataError(f"{split} examples differ in shape: {shapes[0]} and {shapes[1]}")
    y = torch.cat([y for _, y, _ in read])
    if lazy:
        return LazyInputs(dataset, torch.arange(n), shapes[0], split, workers=workers), y
    return torch.cat([x for x, _, _ in read]), y


def _collate_items(items: list, split: str, lazy: bool
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Size]:
    """A batch of (x, y) items of `split`, checked: (x stacked, or None when `lazy`, the
    labels, the shape of one x)."""
    xs, ys = [], []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"{split} items must be (x, y) pairs; one is a "
                            f"{type(item).__name__}")
        xs.append(item_tensor(item[0], split, "an x"))
        ys.append(_label(item[1], split))
    if len({x.shape for x in xs}) > 1:
        shapes = sorted({tuple(x.shape) for x in xs})
        raise DataError(f"{split} examples differ in shape: {shapes[0]} and {shapes[1]}")
    if any(x.dtype.is_complex for x in xs):
        raise DataError(f"{split} x is {xs[0].dtype}: engram trains on real numbers")
    return (None if lazy else torch.stack(xs)), torch.stack(ys), xs[0].shape


def _label(value: Any, split: str) -> torch.Tensor:
    label = item_tensor(value, split, "a label")
    if label.ndim != 0:
        raise DataError(f"{split} has a label of shape {tuple(label.shape)}: each label must be "
                        "one integer")
    return label


def _check_shapes(splits: dict[str, Pair]) -> None:
    """Every split's examples have the shape of the first split's (train's)."""
    first, (x_first, _) = next(iter(splits.items()))
    for split, (x, _) in splits.items():
        if x.shape[1:] != x_first.shape[1:]:
            raise DataError(f"{split} examples have shape {tuple(x.shape[1:])} but {first}'s "
                            f"have {tuple(x_first.shape[1:])}")


def _check_known_classes(splits: dict[str, Pair]) -> None:
    known = set(torch.unique(splits["train"][1]).tolist())
    for split, (_, y) in splits.items():
        absent = sorted(set(torch.unique(y).tolist()) - known)
        if absent:
            raise DataError(f"{split} has classes absent from train: {absent[:10]}")


# ----------------------------------------------------------------------------- task boundaries

def _class_order(class_order: Sequence[int]) -> list[int]:
    order = _int_list(class_order, "class_order")
    repeated = sorted({c for c in order if order.count(c) > 1})
    if repeated:
        raise ConfigError(f"class_order lists class {repeated[0]} more than once")
    return order


def _int_list(values: Any, what: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{what} must be a list of class labels, got {values!r}")
    values = list(values)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"{what} holds {value!r}: class labels are integers >= 0")
    return [int(value) for value in values]


def _ordered(classes: list[int], order: list[int] | None, where: str) -> list[int]:
    """`classes` in `order` (sorted without one); the order must name every class."""
    if order is None:
        return sorted(classes)
    missing = sorted(set(classes) - set(order))
    if missing:
        raise ConfigError(f"class_order lacks class {missing[0]} of {where}")
    present = set(classes)
    return [c for c in order if c in present]


def _class_groups(splits: dict[str, Pair], per_task: Any, order: list[int] | None) -> list:
    if isinstance(per_task, bool) or not isinstance(per_task, (int, np.integer)) or per_task < 1:
        raise ConfigError(f"classes_per_task must be an integer >= 1, got {per_task!r}")
    classes = torch.unique(splits["train"][1]).tolist()
    if order is not None:
        extra = sorted(set(order) - set(classes))
        if extra:
            raise DataError(f"class_order names class {extra[0]}, which train does not have")
    classes = _ordered(classes, order, "train")
    if len(classes) % per_task:
        raise ConfigError(f"the {len(classes)} classes of train do not split into groups of "
                          f"classes_per_task={per_task}; give the groups with tasks=[[...], ...]")
    return [classes[i:i + per_task] for i in range(0, len(classes), per_task)]


def _check_groups(tasks: Any) -> list[list[int]]:
    if isinstance(tasks, (str, bytes)) or not hasattr(tasks, "__iter__"):
        raise ConfigError("tasks must be a list of class lists, e.g. [[0, 1], [2, 3]]; "
                          f"got {tasks!r}")
    groups = [_int_list(group, f"task {i + 1} of tasks=") for i, group in enumerate(tasks)]
    if not groups:
        raise ConfigError("tasks= is empty: give at least one class list")
    home: dict[int, int] = {}
    for i, group in enumerate(groups):
        if not group:
            raise ConfigError(f"task {i + 1} of tasks= has no classes")
        for c in group:
            if c in home:
                where = (f"tasks {home[c] + 1} and {i + 1}" if home[c] != i
                         else f"task {i + 1} twice")
                raise ConfigError(f"class {c} is in {where} of tasks=; each class belongs to "
                                  "one task")
            home[c] = i
    return groups


def _tasks_by_classes(splits: dict[str, Pair], groups: list[list[int]]) -> list:
    grouped = {c for group in groups for c in group}
    for split, (_, y) in splits.items():
        loose = sorted(set(torch.unique(y).tolist()) - grouped)
        if loose:
            raise ConfigError(f"class {loose[0]} of {split} is in no task: add it to tasks=")
    train_classes = set(torch.unique(splits["train"][1]).tolist())
    for i, group in enumerate(groups):
        absent = [c for c in group if c not in train_classes]
        if absent:
            raise DataError(f"class {absent[0]} of task {i + 1} has no training examples")
    pools = Pools(splits["train"], splits.get("val"), splits["test"], sorted(grouped))
    return [class_subset(pools, group) for group in groups]


def _tasks_by_function(splits: dict[str, Pair], task_of: Callable, order: list[int] | None) -> list:
    if not callable(task_of):
        raise ConfigError(f"task_of must be a function (x, y) -> task index, got {task_of!r}")
    ids = {split: _split_task_ids(task_of, x, y, split) for split, (x, y) in splits.items()}
    n_tasks = int(ids["train"].max()) + 1
    counts = torch.bincount(ids["train"], minlength=n_tasks)
    if (counts == 0).any():
        empty = int(torch.nonzero(counts == 0)[0]) + 1
        raise DataError(f"task_of gives no training example to task {empty} of {n_tasks} "
                        "(task indices run 0, 1, ... with no gaps)")
    for split, task_ids in ids.items():
        if int(task_ids.max()) >= n_tasks:
            raise DataError(f"task_of puts a {split} example in task {int(task_ids.max()) + 1}, "
                            f"but train has {n_tasks} tasks")
    per_task = [{split: (select(x, ids[split] == t), y[ids[split] == t])
                 for split, (x, y) in splits.items()} for t in range(n_tasks)]
    return _raw_tasks(per_task, order)


def _split_task_ids(task_of: Callable, x: torch.Tensor | LazyInputs, y: torch.Tensor,
                    split: str) -> torch.Tensor:
    """The task index of every example of a split: of the whole split at once, or of each
    batch read from a streamed Dataset (one more pass over it)."""
    if not isinstance(x, LazyInputs):
        return _task_ids(task_of, x, y, split)
    data = TensorSet(x, y, y)
    return torch.cat([_task_ids(task_of, chunk.x, chunk.y, split)
                      for chunk in batches(data, None, LOAD_BATCH)])


def _task_ids(task_of: Callable, x: torch.Tensor, y: torch.Tensor, split: str) -> torch.Tensor:
    """task_of on all of a split at once when it gives N integers, else example by example."""
    try:  # a per-example function may fail on tensors in any way: then go example by example
        ids = torch.as_tensor(task_of(x, y))
        vectorised = ids.shape == (len(y),) and not ids.dtype.is_floating_point \
            and not ids.dtype.is_complex and ids.dtype != torch.bool
    except Exception:  # noqa: BLE001 - any failure means "not vectorised"
        vectorised = False
    if not vectorised:
        ids = torch.tensor([_one_task_id(task_of, x[i], int(y[i]), split, i)
                            for i in range(len(y))], dtype=torch.long)
    ids = ids.to(torch.long)
    if int(ids.min()) < 0:
        raise DataError(f"task_of gives the task index {int(ids.min())} on {split}: indices "
                        "are 0 or more")
    return ids


def _one_task_id(task_of: Callable, x: torch.Tensor, y: int, split: str, i: int) -> int:
    try:
        task = task_of(x, y)
    except Exception as error:  # noqa: BLE001 - the user's function: say where it failed
        raise DataError(f"task_of failed on {split} example {i}: "
                        f"{type(error).__name__}: {error}") from None
    if isinstance(task, torch.Tensor) and task.numel() == 1:
        task = task.item()
    if isinstance(task, bool) or not isinstance(task, (int, np.integer)):
        raise DataError(f"task_of returned {task!r} for {split} example {i}; it must return "
                        "a task index (an int)")
    return int(task)


def _per_task_data(train: list, test: Any, val: Any, order: list[int] | None, lazy: bool,
                   workers: int) -> list:
    n_tasks = len(train)
    if n_tasks == 0:
        raise DataError("train is an empty list: give one dataset or (x, y) pair per task")
    for name, data in (("test", test), ("val", val)):
        if data is None and name == "val":
            continue
        if not _is_per_task(data) or len(data) != n_tasks:
            raise DataError(f"train is a list of {n_tasks} tasks, so {name} must be a list of "
                            f"{n_tasks} too")
    per_task = []
    for t in range(n_tasks):
        given = {"train": train[t], "test": test[t], **({} if val is None else {"val": val[t]})}
        parts = {split: as_tensors(data, f"{split}[{t}]", lazy, workers)
                 for split, data in given.items()}
        per_task.append(parts)
    _check_shapes({f"{split}[{t}]": pair for t, parts in enumerate(per_task)
                   for split, pair in parts.items()})
    return _raw_tasks(per_task, order)


def _raw_tasks(per_task: list[dict[str, Pair]], order: list[int] | None) -> list:
    """label_tasks' (name, classes, train, val, test) from each task's splits; the task's
    classes are those of its train data, and its val/test may hold no other."""
    raw = []
    for t, parts in enumerate(per_task):
        classes = _ordered(torch.unique(parts["train"][1]).tolist(), order, f"task {t + 1}")
        for split, (_, y) in parts.items():
            absent = sorted(set(torch.unique(y).tolist()) - set(classes))
            if absent:
                raise DataError(f"{split} of task {t + 1} has classes absent from its "
                                f"training data: {absent[:10]}")
        raw.append((f"task {t + 1}", classes, parts["train"], parts.get("val"), parts["test"]))
    return raw


def _class_names(names: Sequence[str] | None, data: Any, max_label: int) -> list[str]:
    if names is None:
        names = getattr(data, "classes", None)
        if not (isinstance(names, (list, tuple)) and len(names) > max_label):
            return [str(c) for c in range(max_label + 1)]
    names = [str(name) for name in names]
    if len(names) <= max_label:
        raise ConfigError(f"class_names has {len(names)} names but the labels reach {max_label}")
    return names
