"""Speed: S seeds trained as one stacked network (batch_seeds) vs one after another vs 1 seed.

    python benchmarks/bench_batched_seeds.py [--seeds 8] [--repeats 3] [--device cpu|cuda]
                                             [--threads 1] [--method naive|ewc|replay|...]

Times `engram.experiments.continual.run_experiment` on configs/bench/naive_split_digits.yaml
(rows written to a CSV, as a real run does) three ways, alternated in one process: seed 0
alone; seeds 0..S-1 one after another (the default path); the same seeds with
batch_seeds: true, for naive fine-tuning or --method (with its defaults). For naive on the
CPU it also times the leanest hand-written loops doing the same work (benchmarks/hand_loop.py): one seed, and the S seeds stacked by hand (one baddbmm per
layer), which is how far apart 1 and S seeds can be on this machine at best. Prints each
variant's median and the ratios to one seed, and checks that the batched rows equal the
one-after-another rows (largest difference per metric: float rounding, amplified over 100
epochs of training; the one-seed path differs from itself as much between threads: 1 and
threads: 2). --threads sets torch's threads for every variant (the config says 1).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "bench" / "naive_split_digits.yaml"


def largest_differences(a: Path, b: Path) -> tuple[bool, dict[str, float]]:
    """(whether the two tables hold the same row keys, the largest |value| difference per
    metric, train_seconds left out: a wall time)."""
    from engram.results import KEY, read_rows, row_key

    first = {row_key(r, KEY): (r["metric"], float(r["value"])) for r in read_rows(a)
             if r["metric"] != "train_seconds"}
    second = {row_key(r, KEY): float(r["value"]) for r in read_rows(b)
              if r["metric"] != "train_seconds"}
    if first.keys() != second.keys():
        return False, {}
    worst: dict[str, float] = {}
    for key, (metric, value) in first.items():
        worst[metric] = max(worst.get(metric, 0.0), abs(value - second[key]))
    return True, worst


def main(seeds: int, repeats: int, device: str, threads: int, method: str) -> None:
    from engram.config import load_config
    from engram.experiments.continual import run_experiment
    from hand_loop import hand_loop, hand_stacked_loop

    many = f"seeds={list(range(seeds))}"
    common = [f"device={device}", f"threads={threads}", f"methods=[{method}]"]
    variants = {"1 seed": ["seeds=[0]"], f"{seeds} seeds one by one": [many],
                f"{seeds} seeds batched": [many, "batch_seeds=true"]}
    hand = {} if device != "cpu" or method != "naive" else {
        "hand loop, 1 seed": lambda epochs: hand_loop(0, epochs, threads=threads),
        f"hand loop, {seeds} seeds stacked": lambda epochs: hand_stacked_loop(
            list(range(seeds)), epochs, threads=threads)}
    times: dict[str, list[float]] = {name: [] for name in [*variants, *hand]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants.items():  # warm-up: first-call allocations, imports
            run_experiment(load_config(CONFIG, overrides + common + ["train.epochs=1"]),
                           Path(tmp) / f"warm {name}", show_progress=False)
        for loop in hand.values():
            loop(1)
        for i in range(repeats):
            for name, overrides in variants.items():
                cfg = load_config(CONFIG, overrides + common)
                started = time.perf_counter()
                run_experiment(cfg, Path(tmp) / f"{name} {i}", show_progress=False)
                times[name].append(time.perf_counter() - started)
            for name, loop in hand.items():
                started = time.perf_counter()
                loop(20)
                times[name].append(time.perf_counter() - started)
        same_keys, worst = largest_differences(
            Path(tmp) / f"{seeds} seeds one by one 0" / "results.csv",
            Path(tmp) / f"{seeds} seeds batched 0" / "results.csv")
    print(f"configs/bench/naive_split_digits.yaml, {method}, on {device}, {threads} thread(s), "
          f"{repeats} runs each, alternated:")
    for name, found in times.items():
        one = statistics.median(times["hand loop, 1 seed" if name.startswith("hand") else "1 seed"])
        median = statistics.median(found)
        print(f"  {name:>30}: median {median:.3f} s (min {min(found):.3f}), "
              f"{median / one:.2f}x one seed")
    print(f"batched rows vs one by one: same row keys {same_keys}; largest difference per "
          f"metric: " + ", ".join(f"{metric} {value:.1e}" for metric, value in worst.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--method", default="naive",
                        help="the method trained (default naive; e.g. ewc, replay)")
    args = parser.parse_args()
    main(args.seeds, args.repeats, args.device, args.threads, args.method)
