"""Peak memory of the exact Fisher with many classes on a big convolution: 100 classes, one
512->512 3x3 conv (2.36M parameters), 2 examples of 512x4x4, float32. One example's 100
per-example gradients of the conv are 236M floats (944 MB), over the 2**25-float (128 MiB)
budget, so the classes must be taken in groups.

    python benchmarks/fisher_memory.py

Prints the process's peak RSS (ru_maxrss, Linux: KiB) before and after, the time, and a
checksum (equal before and after a change of the chunking, up to float rounding)."""

from __future__ import annotations

import resource
import time

import torch
from torch import nn

from engram.importance.fisher import fisher_diagonal
from engram.models import ContinualNet


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    torch.manual_seed(0)
    net = ContinualNet(nn.Sequential(nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512, 1, 100)
    x, y = torch.randn(2, 512, 4, 4), torch.randint(100, (2,))
    task = torch.zeros(2, dtype=torch.long)
    before = peak_gib()
    start = time.perf_counter()
    fisher = fisher_diagonal(net, x, y, task, "exact")
    elapsed = time.perf_counter() - start
    print(f"peak RSS {peak_gib():.2f} GiB (before the Fisher {before:.2f} GiB, "
          f"+{peak_gib() - before:.2f}), {elapsed:.1f} s, "
          f"checksum {float(fisher['body.0.weight'].sum()):.6e}")
