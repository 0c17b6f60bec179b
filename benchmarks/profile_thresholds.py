"""Speed: the vectorised threshold profile vs the straightforward loop, in one process.

    python benchmarks/profile_thresholds.py [--repeats 5] [--threads 1] [--epochs 2]

The digits MLP 64-256-256-10 (engram's ContinualNet, default model config) is trained for a
few epochs on all ten digits (80/20 train/validation split of scikit-learn's 1797 digits).
Four importance measures (random, magnitude, inverse magnitude, squared gradient x weight)
x three aggregations (weight, unit, layer) x two directions give 24 replacement orders
(mean reducer, layer scope, normal replacement values drawn once), each profiled at the 21
thresholds 0, 0.05, ..., 1: 504 evaluations of validation loss and accuracy. All three
paths start from the same importances, groups and replacement values:

- vectorised: engram.importance.aggregate; per order: group scores and ranking once, then
  thresholded_parameters builds the 21 parameter sets at once and evaluate_stacked
  evaluates them with vmap(functional_call) (a set equal to the previous one is reused).
- straightforward (the issue's baseline): per order AND threshold: deepcopy the model,
  threshold it in place (score the groups, rank them, overwrite the first round(t * n)
  groups of each layer), evaluate.
- straightforward, shared ranking: the same loop, but the groups are scored and ranked once
  per order, so only the deepcopy, the in-place replacement and the evaluation repeat per
  threshold: the strongest loop baseline.

The paths are alternated; medians, ratios and the largest loss difference between the
vectorised path and the loops (float rounding only: the same sets are evaluated) printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from engram.config import ModelConfig
from engram.data.sources import load_digits
from engram.importance.aggregate import (
    evaluate_stacked,
    group_scores,
    make_groups,
    replacement_order,
    replacement_values,
    thresholded_parameters,
)
from engram.models import build_model

THRESHOLDS = torch.linspace(0, 1, 21)
AGGREGATIONS = ("weight", "unit", "layer")
DIRECTIONS = ("least_first", "most_first")
SCOPE, REDUCER = "layer", "mean"


def trained_model(epochs: int, seed: int = 0):
    """Digits MLP trained with Adam (lr 1e-3, batch 32): (model, x_val, y_val, x_train, y_train)."""
    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits.y_train), generator=g)
    x, y = digits.x_train[order], digits.y_train[order]
    n_val = round(0.2 * len(y))
    x_val, y_val, x_train, y_train = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    torch.manual_seed(seed)
    model = build_model(ModelConfig(), (1, 8, 8), n_heads=1, head_dim=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(perm), 32):
            idx = perm[i:i + 32]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, x_val, y_val, x_train, y_train


def importances(model, x_train, y_train) -> dict[str, dict[str, torch.Tensor]]:
    """Four simple stand-in measures, {measure: {param name: tensor like the param}}."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x_train), y_train).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    return {
        "random": {n: torch.rand(p.shape, generator=g) for n, p in params.items()},
        "magnitude": {n: p.abs() for n, p in params.items()},
        "inverse_magnitude": {n: 1 / (p.abs() + 1e-8) for n, p in params.items()},
        "taylor": {n: (grads[n] * p) ** 2 for n, p in params.items()},
    }


def setup(model, imps):
    """Shared by all paths: params, replacement values, groups of each aggregation, combos."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    values = replacement_values(params, make_groups(model, "weight"), "normal", 0.1,
                                torch.Generator().manual_seed(2))
    groups = {aggregation: make_groups(model, aggregation) for aggregation in AGGREGATIONS}
    combos = [(aggregation, imp, direction) for aggregation in AGGREGATIONS
              for imp in imps.values() for direction in DIRECTIONS]
    return params, values, groups, combos


def ranking(imp, groups, direction):
    """Group scores, then each group's rank in its layer (ties: a fixed-seed generator)."""
    scores = group_scores(imp, groups, REDUCER)
    return replacement_order(scores, groups, SCOPE, direction, torch.Generator().manual_seed(3))


def vectorised(model, params, values, groups, combos, x, y) -> torch.Tensor:
    losses = []
    for aggregation, imp, direction in combos:
        order = ranking(imp, groups[aggregation], direction)
        stacked, _ = thresholded_parameters(params, groups[aggregation], order, SCOPE,
                                            THRESHOLDS, values)
        losses.append(evaluate_stacked(model, stacked, x, y)[0])
    return torch.cat(losses)


def threshold_and_evaluate(model, groups, order, values, t, x, y) -> float:
    """Copy the model, overwrite its first round(t * n) groups of each layer, evaluate."""
    n_in_layer = torch.bincount(groups.layer).double()
    k = torch.round(t * n_in_layer).long()  # groups to replace in each layer
    thresholded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in thresholded.named_parameters():
            ids = groups.index[name]
            mask = order[ids] < k[groups.layer[ids]]
            p[mask] = values[name][mask]
        logits = thresholded(x)
        float((logits.argmax(1) == y).float().mean())  # accuracy, as the profile needs
        return float(F.cross_entropy(logits, y))


def straightforward(model, params, values, groups, combos, x, y) -> torch.Tensor:
    losses = []
    for aggregation, imp, direction in combos:
        for t in THRESHOLDS.tolist():
            order = ranking(imp, groups[aggregation], direction)  # thresholding ranks anew
            losses.append(threshold_and_evaluate(model, groups[aggregation], order, values, t,
                                                 x, y))
    return torch.tensor(losses, dtype=torch.float64)


def shared_ranking(model, params, values, groups, combos, x, y) -> torch.Tensor:
    losses = []
    for aggregation, imp, direction in combos:
        order = ranking(imp, groups[aggregation], direction)
        for t in THRESHOLDS.tolist():
            losses.append(threshold_and_evaluate(model, groups[aggregation], order, values, t,
                                                 x, y))
    return torch.tensor(losses, dtype=torch.float64)


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (engram's default: 1)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs before profiling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x_val, y_val, x_train, y_train = trained_model(args.epochs)
    params, values, groups, combos = setup(model, importances(model, x_train, y_train))
    work = (model, params, values, groups, combos, x_val, y_val)
    paths = {"vectorised": vectorised, "straightforward": straightforward,
             "straightforward, shared ranking": shared_ranking}
    times = {name: [] for name in paths}
    for fn in paths.values():
        fn(*work)  # warm-up: first-call allocations, lazy imports
    for _ in range(args.repeats):
        losses = {}
        for name, fn in paths.items():
            elapsed, losses[name] = timed(fn, *work)
            times[name].append(elapsed)
    n_evals = len(combos) * len(THRESHOLDS)
    gap = max(float((losses["vectorised"] - losses[name]).abs().max()) for name in paths)
    print(f"{len(combos)} orders x {len(THRESHOLDS)} thresholds = {n_evals} evaluations on "
          f"{len(y_val)} validation digits, {args.threads} thread(s), {args.repeats} runs each, "
          f"max |loss difference| {gap:.1e}")
    vec = statistics.median(times["vectorised"])
    for name, ts in times.items():
        median = statistics.median(ts)
        ratio = "" if name == "vectorised" else f", vectorised is {median / vec:.2f}x faster"
        print(f"{name}: median {median:.3f} s ({1e3 * median / n_evals:.2f} ms/evaluation, "
              f"min {min(ts):.3f} s){ratio}")


if __name__ == "__main__":
    main()
