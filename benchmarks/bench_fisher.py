"""Speed of EWC's Fisher estimators: engram vs the leanest hand-written loop, one process.

    python benchmarks/bench_fisher.py [--repeats 5] [--mnist PATH] [--mnist-repeats 3]

On the digits workload (configs/bench/naive_split_digits.yaml: 5 class-IL tasks, MLP
64-256-256-10, SGD, 20 epochs) it times, alternating engram and hand loop variant by
variant: naive, EWC with each Fisher estimator (exact, sample, empirical, batch; lambda 100,
the Fisher on each task's whole training split) and replay (reservoir, 200 examples); then
prints medians, engram / hand ratios, and EWC-exact / naive within engram (target 1.5x).
The hand loops are benchmarks/hand_loop.py (EWC's Fisher there: a closed form for the MLP).
It also times `fisher_diagonal` alone, hooked path vs torch.func (fast=False), on one task.

With --mnist PATH (a folder of MNIST IDX files, e.g. /work/shared/data/mnist-t10k) it also
times engram's EWC on configs/split_mnist_t10k.yaml (MLP 784-400-400, seed 0, EWC only)
with the exact Fisher vs the batch estimator (target: within 2x), with the config's
fisher_samples (500) and with all training examples.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
DIGITS = CONFIGS / "bench" / "naive_split_digits.yaml"
MNIST = CONFIGS / "split_mnist_t10k.yaml"
sys.path.insert(0, str(HERE))

ESTIMATORS = ("exact", "sample", "empirical", "batch")
# name: (engram overrides, hand_loop keyword arguments)
VARIANTS = {"naive": ([], {})}
VARIANTS.update({f"ewc_{e}": ([f"methods=[{{name: ewc, fisher: {e}, strength: 100}}]"],
                              {"ewc": e}) for e in ESTIMATORS})
VARIANTS["replay"] = (["methods=[{name: replay, memory: 200}]"], {"replay": 200})


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_hand_fisher() -> None:
    """The hand loop's closed-form Fisher equals engram's (so the race is between equals)."""
    from hand_loop import fisher, split_digits

    from engram.importance.fisher import fisher_diagonal

    tasks, g = split_digits(0)
    x, y = tasks[0][0], tasks[0][1]
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    task = torch.zeros(len(y), dtype=torch.long)
    net = _as_engram_net(model)
    for estimator in ("exact", "empirical", "batch"):
        ours = fisher_diagonal(net, x, y, task, estimator)
        hand = fisher(model, x, y, estimator, g)
        for value, (name, _) in zip(hand, net.named_parameters()):
            torch.testing.assert_close(value, ours[name], rtol=1e-4, atol=1e-9)


def _as_engram_net(model):
    from engram.models import adapt
    return adapt(model)


def digits(repeats: int) -> dict[str, tuple[float, float]]:
    from hand_loop import hand_loop

    from engram.config import load_config
    from engram.experiments.continual import run_experiment

    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (overrides, hand_kwargs) in VARIANTS.items():
            cfg = load_config(DIGITS, overrides)
            hand_loop(epochs=1, **hand_kwargs)  # warm-up both
            run_experiment(load_config(DIGITS, overrides + ["train.epochs=1"]),
                           Path(tmp) / f"warm_{name}", show_progress=False)
            engram_times, hand_times = [], []
            for i in range(repeats):
                hand_times.append(time_call(lambda: hand_loop(**hand_kwargs)))
                engram_times.append(time_call(lambda: run_experiment(
                    cfg, Path(tmp) / f"{name}_{i}", show_progress=False)))
            e, h = statistics.median(engram_times), statistics.median(hand_times)
            medians[name] = (e, h)
            print(f"{name:14s} engram {e:6.3f} s  hand loop {h:6.3f} s  ratio {e / h:5.2f}x  "
                  f"(min {min(engram_times):.3f} / {min(hand_times):.3f} s, {repeats} runs each)",
                  flush=True)
    naive = medians["naive"][0]
    for name in VARIANTS:
        if name != "naive":
            print(f"engram {name} / engram naive: {medians[name][0] / naive:.2f}x")
    return medians


def fisher_alone(repeats: int) -> None:
    """fisher_diagonal on one digits task (288 examples), hooked vs torch.func."""
    from hand_loop import split_digits

    from engram.importance.fisher import fisher_diagonal
    from engram.models import adapt

    torch.set_num_threads(1)
    tasks, _ = split_digits(0)
    x, y = tasks[0][0], tasks[0][1]
    task = torch.zeros(len(y), dtype=torch.long)
    torch.manual_seed(0)
    net = adapt(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 10)))
    for estimator in ESTIMATORS:
        fast = [time_call(lambda: fisher_diagonal(net, x, y, task, estimator))
                for _ in range(repeats)]
        line = f"fisher_diagonal {estimator:9s} ({len(y)} examples): {statistics.median(fast) * 1e3:7.1f} ms"
        if estimator != "batch":
            slow = [time_call(lambda: fisher_diagonal(net, x, y, task, estimator, fast=False))
                    for _ in range(max(1, repeats // 2))]
            line += f" (hooked), torch.func {statistics.median(slow) * 1e3:7.1f} ms"
        print(line, flush=True)


def mnist(path: str, repeats: int) -> None:
    from engram.config import load_config
    from engram.experiments.continual import run_experiment

    base = [f"data.path={path}", "seeds=[0]", "plots=false"]
    with tempfile.TemporaryDirectory() as tmp:
        for samples in ("500", "null"):
            times: dict[str, list[float]] = {"exact": [], "batch": []}
            configs = {e: load_config(MNIST, base + [
                f"methods=[{{name: ewc, strength: 100, fisher: {e}, fisher_samples: {samples}}}]"])
                for e in times}
            for i in range(repeats + 1):  # the first round warms up
                for estimator, cfg in configs.items():
                    elapsed = time_call(lambda: run_experiment(
                        cfg, Path(tmp) / f"{estimator}_{samples}_{i}", show_progress=False))
                    if i:
                        times[estimator].append(elapsed)
            e, b = statistics.median(times["exact"]), statistics.median(times["batch"])
            print(f"split MNIST EWC, fisher_samples {samples}: exact {e:.2f} s, batch {b:.2f} s, "
                  f"ratio {e / b:.2f}x ({repeats} runs each)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mnist", help="folder of MNIST IDX files: also time split MNIST")
    parser.add_argument("--mnist-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_hand_fisher()
    fisher_alone(args.repeats)
    digits(args.repeats)
    if args.mnist:
        mnist(args.mnist, args.mnist_repeats)
