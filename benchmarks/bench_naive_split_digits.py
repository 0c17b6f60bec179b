"""Speed: engram vs the leanest hand-written PyTorch loop on the same work, one process.

    python benchmarks/bench_naive_split_digits.py [--repeats 5] [--processes]

Times `engram.experiments.continual.run_experiment` on configs/bench/naive_split_digits.yaml (which also
writes every result row to a CSV, as a real run does) against `hand_loop.hand_loop` (no
bookkeeping at all), alternating the two, and prints the median of each and the ratio.
With --processes it also times the two as whole processes (`engram run ...` vs
`python benchmarks/hand_loop.py`), start-up and imports included.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "bench" / "naive_split_digits.yaml"
sys.path.insert(0, str(HERE))


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(name: str, engram_times: list[float], hand_times: list[float]) -> None:
    e, h = statistics.median(engram_times), statistics.median(hand_times)
    print(f"{name}: engram median {e:.3f} s, hand loop median {h:.3f} s, ratio {e / h:.2f}x "
          f"(min {min(engram_times):.3f} / {min(hand_times):.3f} s, {len(hand_times)} runs each)")


def in_process(repeats: int) -> None:
    from hand_loop import hand_loop

    from engram.config import load_config
    from engram.experiments.continual import run_experiment

    cfg = load_config(CONFIG)
    engram_times, hand_times = [], []
    hand_loop(epochs=1)  # warm-up both (first-call allocations, lazy imports)
    with tempfile.TemporaryDirectory() as tmp:
        run_experiment(load_config(CONFIG, ["train.epochs=1"]), Path(tmp) / "warm",
                       show_progress=False)
        for i in range(repeats):
            hand_times.append(time_call(hand_loop))
            engram_times.append(time_call(lambda: run_experiment(
                cfg, Path(tmp) / f"run{i}", show_progress=False)))
    report("in one process", engram_times, hand_times)


def processes(repeats: int) -> None:
    engram_times, hand_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            hand_times.append(time_call(lambda: subprocess.run(
                [sys.executable, str(HERE / "hand_loop.py")], check=True, capture_output=True)))
            engram_times.append(time_call(lambda: subprocess.run(
                [sys.executable, "-m", "engram", "run", str(CONFIG), "--out", f"{tmp}/p{i}", "-q"],
                check=True, capture_output=True)))
    report("whole processes", engram_times, hand_times)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", action="store_true", help="also time whole processes")
    args = parser.parse_args()
    in_process(args.repeats)
    if args.processes:
        processes(args.repeats)
