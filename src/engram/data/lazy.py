"""Examples read from a map-style Dataset on demand: streams larger than memory.

engram normally keeps every split as tensors on the run's device, so a training step is
indexing (engram.data.streams.TensorSet). A Dataset too large for that (engram.stream_from
decides, see `memory_budget`) keeps its inputs as `LazyInputs` instead: the dataset, which
of its items, and the shape of one item. Labels and task ids stay tensors (one integer per
example is small), so everything that only reads targets works unchanged.

    x = LazyInputs(dataset, items, item_shape)   # items: (N,) indices into the dataset
    x[index]        -> float32 tensor (len(index), *item_shape): read now, in this process
    x.read(batches) -> one tensor per batch of positions, read ahead by a DataLoader with
                       `workers` processes and, for a CUDA device, pinned memory
    x.subset(index) -> LazyInputs of those positions (reads nothing)

The training loop and the evaluation read through `read` (engram.data.streams.batches); a
method that indexes x (a random subset for a Fisher, a replay buffer's exemplars) gets the
examples it picks as a tensor, so only what it asked for is in memory.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.errors import DataError

DEVICE_SHARE = 0.5  # keep a stream in memory when it takes at most this share of what is free


def item_tensor(value: Any, split: str, what: str) -> torch.Tensor:
    """A Dataset item's x (or label) as a tensor; a DataError naming `split` when it is not
    numeric."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise DataError(f"{split} has {what} that is not numeric ({type(value).__name__}): "
                        f"{error}") from None


def item_input(dataset: Any, i: int, split: str) -> torch.Tensor:
    """Item `i` of a Dataset of (x, y) pairs: x as a float32 tensor."""
    item = dataset[i]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{split} items must be (x, y) pairs; item {i} is a {type(item).__name__}")
    return item_tensor(item[0], split, "an x").to(torch.float32)


class _Inputs(torch.utils.data.Dataset):
    """The x of each (x, y) item, float32, checked against the expected shape: what the
    DataLoader's workers read."""

    def __init__(self, dataset: Any, item_shape: tuple[int, ...], split: str) -> None:
        self.dataset, self.item_shape, self.split = dataset, item_shape, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = item_input(self.dataset, i, self.split)
        if tuple(x.shape) != self.item_shape:
            raise DataError(f"{self.split} item {i} has shape {tuple(x.shape)} but the first "
                            f"has {self.item_shape}")
        return x


class _TensorItems(torch.utils.data.Dataset):
    """(x[i], 0) items of a tensor: in-memory examples joining streamed ones (concat)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], 0


class _BatchList:
    """A DataLoader batch sampler whose batches are set before each pass, so that one
    DataLoader (and its worker processes) serves every pass over a dataset."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


LIVE_POOLS = 2  # persistent worker pools kept at once: a training and an evaluation dataset
_live_readers: list[weakref.ref] = []  # readers whose pool is up, oldest first


class _Reader:
    """Reads the items of one dataset for every LazyInputs over it (a stream's tasks share
    their dataset): with workers, one DataLoader whose processes persist from pass to pass
    (starting them costs more than an epoch of a small task); without, in this process. At
    most LIVE_POOLS pools are up at once (per-task datasets would otherwise keep workers x
    tasks processes): starting another shuts the oldest idle one down."""

    def __init__(self, dataset: Any, item_shape: tuple[int, ...], split: str, workers: int):
        self.inputs = _Inputs(dataset, item_shape, split)
        self.workers = workers
        self.loader: Any = None
        self.sampler = _BatchList()
        self.pinned = False
        self.busy = False  # a pass is under way: another one gets a loader of its own

    def read(self, item_batches: list[list[int]], pin: bool) -> Iterator[torch.Tensor]:
        from torch.utils.data import DataLoader

        if self.workers == 0 or self.busy:
            yield from from_workers(DataLoader(self.inputs, batch_sampler=item_batches,
                                               num_workers=self.workers, pin_memory=pin))
            return
        if self.loader is None or self.pinned != pin:
            self.loader = DataLoader(self.inputs, batch_sampler=self.sampler,
                                     num_workers=self.workers, pin_memory=pin,
                                     persistent_workers=True)
            self.pinned = pin
            _start_pool(self)
        self.sampler.batches = item_batches
        self.busy = True
        try:
            yield from from_workers(self.loader)
        finally:
            self.busy = False


def _start_pool(reader: _Reader) -> None:
    """Count `reader`'s new pool among the live ones; shut the oldest idle ones down (their
    DataLoader dropped: its iterator stops the worker processes) beyond LIVE_POOLS."""
    _live_readers[:] = [ref for ref in _live_readers
                        if ref() is not None and ref() is not reader and ref().loader is not None]
    _live_readers.append(weakref.ref(reader))
    for ref in list(_live_readers[:-1]):
        if len(_live_readers) <= LIVE_POOLS:
            break
        older = ref()
        if older is not None and not older.busy:
            older.loader = None
            _live_readers.remove(ref)


class LazyInputs:
    """The inputs x of a split, read from a map-style Dataset when needed (see the module
    docstring). Behaves like the (N, *item_shape) float32 tensor it stands for where engram
    reads x: len, shape, indexing (which reads), numel/element_size (memory accounting)."""

    def __init__(self, dataset: Any, items: torch.Tensor, item_shape: Sequence[int],
                 split: str = "data", device: torch.device | str = "cpu",
                 workers: int = 0, reader: _Reader | None = None) -> None:
        self.dataset = dataset
        self.items = torch.as_tensor(items, dtype=torch.long).cpu()  # (N,) dataset indices
        self.item_shape = tuple(int(d) for d in item_shape)
        self.split = split
        self.device = torch.device(device)
        self.workers = workers
        # shared by the LazyInputs made from this one over the same dataset (subset, to)
        self.reader = reader or _Reader(dataset, self.item_shape, split, workers)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (f"LazyInputs({type(self.dataset).__name__}, {len(self)} items of "
                f"{self.item_shape}, device={self.device}, workers={self.workers})")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self),) + self.item_shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def numel(self) -> int:
        return len(self) * math.prod(self.item_shape)

    def element_size(self) -> int:
        return 4  # float32

    def _like(self, items: torch.Tensor, dataset: Any = None,
              device: torch.device | str | None = None) -> "LazyInputs":
        return LazyInputs(self.dataset if dataset is None else dataset, items, self.item_shape,
                          self.split, self.device if device is None else device, self.workers,
                          self.reader if dataset is None else None)

    def to(self, device: torch.device | str) -> "LazyInputs":
        """The same inputs, read onto `device`."""
        return self._like(self.items, device=device) if torch.device(device) != self.device \
            else self

    def subset(self, index: torch.Tensor | slice) -> "LazyInputs":
        """The inputs at `index` (positions, or a boolean mask), still unread."""
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        return self._like(self.items[index])

    def __getitem__(self, index: int | slice | torch.Tensor) -> torch.Tensor:
        """Read the inputs at `index` now, in this process: (n, *item_shape) on the device
        (an int gives one item without the leading dimension)."""
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        items = self.items[index.cpu() if isinstance(index, torch.Tensor) else index]
        reader = _Inputs(self.dataset, self.item_shape, self.split)
        if len(items) == 0:
            return torch.zeros((0,) + self.item_shape, device=self.device)
        return torch.stack([reader[int(i)] for i in items]).to(self.device)

    def read(self, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The inputs of each batch of positions, in order, on the device: a DataLoader reads
        ahead with `workers` processes (0: in this process; the processes are started once
        per dataset and kept), into pinned memory when the device is CUDA, and each batch is
        copied without blocking."""
        item_batches = [self.items[positions.cpu()].tolist() for positions in batches]
        cuda = self.device.type == "cuda"
        for x in self.reader.read(item_batches, pin=cuda):
            yield x.to(self.device, non_blocking=cuda)

    def identity(self) -> bytes:
        """What identifies these inputs without reading them (a run id's stream digest): the
        dataset's type and length, the item shape and the chosen items."""
        described = f"{type(self.dataset).__qualname__}:{len(self.dataset)}:{self.item_shape}"
        return described.encode() + self.items.numpy().tobytes()

    @staticmethod
    def concat(parts: Sequence["LazyInputs | torch.Tensor"]) -> "LazyInputs":
        """The inputs of `parts` one after another (the joint method's growing training set,
        a task's data and iCaRL's exemplars): parts of one dataset share it; parts of several
        read from their ConcatDataset; tensors among them (a memory) are read from a copy on
        the CPU."""
        first = next(part for part in parts if isinstance(part, LazyInputs))
        parts = [part if isinstance(part, LazyInputs) else
                 first._like(torch.arange(len(part)), _TensorItems(part.detach().cpu()))
                 for part in parts]
        datasets: list[Any] = []
        for part in parts:
            if not any(part.dataset is known for known in datasets):
                datasets.append(part.dataset)
        if len(datasets) == 1:
            return parts[0]._like(torch.cat([part.items for part in parts]))
        offsets = np.cumsum([0] + [len(d) for d in datasets])
        where = {id(d): int(offset) for d, offset in zip(datasets, offsets)}
        items = torch.cat([part.items + where[id(part.dataset)] for part in parts])
        return parts[0]._like(items, torch.utils.data.ConcatDataset(datasets))


def from_workers(loader: Iterable[Any]) -> Iterator[Any]:
    """The DataLoader's batches; a DataError raised in a worker process comes back with the
    worker's traceback in its message: re-raised here with its own one line only."""
    try:
        yield from loader
    except DataError as error:
        lines = str(error).strip().splitlines()
        if len(lines) == 1:
            raise
        message = lines[-1].split("DataError: ", 1)[-1]
        raise DataError(message) from None


def select(x: torch.Tensor | LazyInputs, index: torch.Tensor) -> torch.Tensor | LazyInputs:
    """x at `index` (positions or a mask): indexed tensors, or unread LazyInputs."""
    return x.subset(index) if isinstance(x, LazyInputs) else x[index]


def loaded(x: torch.Tensor | LazyInputs) -> torch.Tensor:
    """All of x as a tensor (LazyInputs are read: for methods that need a whole task at once)."""
    return x[:] if isinstance(x, LazyInputs) else x


def memory_budget(device: torch.device | str) -> int:
    """Bytes a stream's inputs may take in memory before engram.stream_from streams them:
    DEVICE_SHARE of the host memory available now, and of the free CUDA memory on a CUDA
    device (the data are read into host memory first, then moved)."""
    budget = DEVICE_SHARE * _available_host_bytes()
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, DEVICE_SHARE * free)
    return int(budget)


def _available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the free physical pages."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63 - 1  # unknown: keep the data in memory, as before
