"""The leanest hand-written PyTorch loop for the naive split-digits benchmark.

Same work as configs/bench/naive_split_digits.yaml: load_digits scaled to [0, 1], 80/20
train/test split, five class-incremental tasks (0/1, 2/3, ...), MLP 64-256-256-10 (ReLU),
plain SGD lr 0.05, batch 32, 20 epochs per task, test accuracy on every task after each
task. Run as a script for the whole-process comparison:

    python benchmarks/hand_loop.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


def hand_loop(seed: int = 0, epochs: int = 20) -> list[list[float]]:
    torch.set_num_threads(1)  # same setting as engram's default; 1 thread is fastest here
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    n_test = round(0.2 * len(y))
    x_test, y_test = x[order[:n_test]], y[order[:n_test]]
    x_train, y_train = x[order[n_test:]], y[order[n_test:]]
    tasks = []
    for t in range(5):
        train_mask = (y_train // 2) == t
        test_mask = (y_test // 2) == t
        tasks.append((x_train[train_mask], y_train[train_mask], x_test[test_mask], y_test[test_mask]))

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    accuracy = []
    for xt, yt, _, _ in tasks:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(epochs):
            perm = torch.randperm(len(yt), generator=g)
            for i in range(0, len(yt), 32):
                idx = perm[i:i + 32]
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            accuracy.append([float((model(xe).argmax(1) == ye).float().mean())
                             for _, _, xe, ye in tasks])
    return accuracy


if __name__ == "__main__":
    for row in hand_loop():
        print(" ".join(f"{a:.3f}" for a in row))
