"""Streamed inputs (engram.stream_from(..., in_memory=False)) against the same data in memory.

Trains naive fine-tuning through engram.fit on split digits read from a map-style Dataset
(5 class-incremental tasks, a 64-256-256 MLP, SGD, batch 32), once with the inputs in memory
and once streamed by a DataLoader with 0 and with 2 worker processes, alternating, and prints
the medians and the ratios to the in-memory run. The rows are the same in all three (tested
in tests/test_lazy_data.py); the difference is the cost of reading items one by one in Python.

    python benchmarks/streamed_data.py [--repeats 3] [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.data import Dataset

import engram
from engram.data.sources import load_digits


class Items(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    order = torch.randperm(len(digits.y_train), generator=torch.Generator().manual_seed(0))
    x, y = digits.x_train[order], digits.y_train[order]
    train, test = Items(x[:1400], y[:1400]), Items(x[1400:], y[1400:])
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
                        nn.ReLU(), nn.Linear(256, 10))
    variants = {"in memory": {"in_memory": True}, "streamed, workers=0": {"in_memory": False},
                "streamed, workers=2": {"in_memory": False, "workers": 2}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, options in variants.items():
            start = time.perf_counter()
            stream = engram.stream_from(train, test, classes_per_task=2, **options)
            engram.fit(net, stream, "naive", epochs=args.epochs, progress=False)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["in memory"])
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:<22} median {median:6.2f} s  ({median / base:.2f}x in memory, "
              f"{len(measured)} runs)")


if __name__ == "__main__":
    main()
