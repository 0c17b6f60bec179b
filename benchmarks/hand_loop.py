"""The leanest hand-written PyTorch loops for the split-digits benchmarks.

Same work as configs/bench/naive_split_digits.yaml: load_digits scaled to [0, 1], 80/20
train/test split, five class-incremental tasks (0/1, 2/3, ...), MLP 64-256-256-10 (ReLU),
plain SGD lr 0.05, batch 32, 20 epochs per task, test accuracy on every task after each
task. `hand_loop()` is naive fine-tuning; `hand_loop(ewc="exact")` adds offline EWC
(lambda 100, the Fisher on each task's whole training split, merged into one quadratic
whose gradient lambda A (theta - mu) is added in closed form after the backward pass, as
engram does) with the named estimator; `hand_loop(replay=200)` adds reservoir replay (200
examples, 32 replayed per step). Run as a script for the whole-process comparison:

    python benchmarks/hand_loop.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


def fisher(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, estimator: str,
           g: torch.Generator) -> list[torch.Tensor]:
    """Diagonal Fisher of a Linear/ReLU Sequential, one tensor per parameter, in closed form
    per example: forward keeping each Linear's input a and output z, backward from the
    logits with seeds e_c - p (d log p_c / d logits), then sum_b p_bc g_bc^2 outer a_b^2."""
    if estimator == "batch":  # squared batch-mean gradient, mean over batches of 32
        total = [torch.zeros_like(p) for p in model.parameters()]
        starts = range(0, len(y), 32)
        for i in starts:
            grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 32]), y[i:i + 32]),
                                        list(model.parameters()))
            total = [t + gr.pow(2) for t, gr in zip(total, grads)]
        return [t / len(starts) for t in total]
    inputs, outputs, h = [], [], x
    for layer in model:
        if isinstance(layer, nn.Linear):
            inputs.append(h.detach())
            h = layer(h)
            outputs.append(h)
        else:
            h = layer(h)
    p = F.softmax(h.detach(), dim=1)  # (B, C)
    if estimator == "exact":
        seeds, weights = torch.eye(p.shape[1]).unsqueeze(1) - p, p.T  # (C, B, C), (C, B)
    else:
        labels = torch.multinomial(p, 1, generator=g).squeeze(1) if estimator == "sample" else y
        seeds, weights = (F.one_hot(labels, p.shape[1]) - p).unsqueeze(0), torch.ones(1, len(y))
    per_unit = [torch.zeros_like(z) for z in outputs]  # sum_c w_c g_c^2, (B, out)
    for seed, w in zip(seeds, weights):
        grads = torch.autograd.grad(h, outputs, seed, retain_graph=True)
        per_unit = [s + w[:, None] * gr.pow(2) for s, gr in zip(per_unit, grads)]
    result = []
    for a, s in zip(inputs, per_unit):
        result += [s.T @ a.pow(2) / len(y), s.sum(0) / len(y)]
    return result


def split_digits(seed: int):
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
    return tasks, g


def hand_loop(seed: int = 0, epochs: int = 20, ewc: str | None = None, strength: float = 100.0,
              replay: int | None = None, threads: int = 1) -> list[list[float]]:
    torch.set_num_threads(threads)  # 1: the benchmark config's; the fastest for one seed here
    tasks, g = split_digits(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    precision, anchor = None, None  # EWC: A = sum_k F_k, mu = sum_k F_k theta_k / A
    memory_x, memory_y, n_seen = torch.zeros(replay or 0, 64), torch.zeros(replay or 0, dtype=torch.long), 0
    accuracy = []
    for xt, yt, _, _ in tasks:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(epochs):
            perm = torch.randperm(len(yt), generator=g)
            for i in range(0, len(yt), 32):
                idx = perm[i:i + 32]
                xb, yb = xt[idx], yt[idx]
                if replay and n_seen:
                    pick = torch.randint(min(n_seen, replay), (32,), generator=g)
                    xb, yb = torch.cat([xb, memory_x[pick]]), torch.cat([yb, memory_y[pick]])
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                if precision is not None:  # + the gradient of (lambda/2) sum A (p - m)^2
                    params = list(model.parameters())
                    with torch.no_grad():
                        pull = torch._foreach_sub(params, anchor)
                        torch._foreach_mul_(pull, precision)
                        torch._foreach_add_([p.grad for p in params], pull, alpha=strength)
                opt.step()
                if replay:  # reservoir sampling of the step's own examples
                    position = n_seen + torch.arange(len(idx))
                    slot = torch.where(position < replay, position,
                                       (torch.rand(len(idx), generator=g) * (position + 1)).long())
                    keep = slot < replay
                    memory_x[slot[keep]], memory_y[slot[keep]] = xt[idx][keep], yt[idx][keep]
                    n_seen += len(idx)
        if ewc:
            f = fisher(model, xt, yt, ewc, g)
            theta = [p.detach().clone() for p in model.parameters()]
            if precision is None:
                precision, anchor = f, theta
            else:
                merged = [a + fi for a, fi in zip(precision, f)]
                anchor = [torch.where(s > 0, (a * m + fi * t) / s.clamp_min(1e-30), t)
                          for a, m, fi, t, s in zip(precision, anchor, f, theta, merged)]
                precision = merged
        with torch.no_grad():
            accuracy.append([float((model(xe).argmax(1) == ye).float().mean())
                             for _, _, xe, ye in tasks])
    return accuracy


def hand_stacked_loop(seeds: list[int], epochs: int = 20, threads: int = 1
                      ) -> list[list[list[float]]]:
    """Naive fine-tuning of len(seeds) networks at once, the leanest way: each layer's
    weights stacked (S, in, out) and one baddbmm per layer, each seed on its own split
    (split_digits(seed)) in its own order. The seeds' tasks differ in size, so a step pads
    the shorter mini-batches and weights each seed's cross-entropy by its own rows (a seed
    whose epoch has ended contributes nothing: with plain SGD its weights stay put).
    Returns each seed's accuracy matrix."""
    torch.set_num_threads(threads)
    splits = [split_digits(seed) for seed in seeds]
    weights, biases = [], []
    for seed in seeds:  # each seed's own initial weights, as hand_loop draws them
        torch.manual_seed(seed)
        net = [nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)]
        weights.append([layer.weight.detach().t() for layer in net])  # (in, out)
        biases.append([layer.bias.detach() for layer in net])
    stacked_w = [torch.stack(ws).requires_grad_() for ws in zip(*weights)]  # (S, in, out)
    stacked_b = [torch.stack(bs).unsqueeze(1).requires_grad_() for bs in zip(*biases)]  # (S, 1, out)

    def forward(x: torch.Tensor) -> torch.Tensor:  # (S, B, 64) -> (S, B, 10)
        for i, (w, b) in enumerate(zip(stacked_w, stacked_b)):
            x = torch.baddbmm(b, x, w)
            x = x.relu() if i < 2 else x
        return x

    accuracy: list[list[list[float]]] = [[] for _ in seeds]
    for t in range(5):
        opt = torch.optim.SGD(stacked_w + stacked_b, lr=0.05)
        tasks = [tasks_[t] for tasks_, _ in splits]
        for _ in range(epochs):
            perms = [torch.randperm(len(yt), generator=g) for (_, yt, _, _), (_, g) in
                     zip(tasks, splits)]
            for i in range(0, max(len(perm) for perm in perms), 32):
                xb = torch.zeros(len(seeds), 32, 64)
                yb = torch.zeros(len(seeds), 32, dtype=torch.long)
                weight = torch.zeros(len(seeds), 32)  # 1 / (seed's rows) on its own rows
                for s, ((xt, yt, _, _), perm) in enumerate(zip(tasks, perms)):
                    idx = perm[i:i + 32]
                    xb[s, :len(idx)], yb[s, :len(idx)] = xt[idx], yt[idx]
                    weight[s, :len(idx)] = 1.0 / max(1, len(idx))
                per_example = F.cross_entropy(forward(xb).flatten(0, 1), yb.flatten(),
                                              reduction="none").view(len(seeds), 32)
                opt.zero_grad()
                (per_example * weight).sum().backward()
                opt.step()
        with torch.no_grad():
            for s, (tasks_, _) in enumerate(splits):
                accuracy[s].append([
                    float((forward(xe.expand(len(seeds), *xe.shape))[s].argmax(1) == ye)
                          .float().mean()) for _, _, xe, ye in tasks_])
    return accuracy


if __name__ == "__main__":
    for row in hand_loop():
        print(" ".join(f"{a:.3f}" for a in row))
