"""Speed: the same sweep on the local worker pool and on Ray, as whole processes.

    python benchmarks/bench_ray_backend.py [--repeats 3] [--workers 2]

Runs `engram sweep configs/bench/ray_grid_digits.yaml` (40 runs: 2 methods x 5 seeds x 4
learning rates of a small MLP on split digits) with `--workers N`, once with the local pool
and once with `--backend ray` (a local Ray instance of N CPUs, started and stopped by the
command), alternating the two, each into a fresh temporary folder. Whole processes are timed,
so interpreter start-up, imports and Ray's start-up and shutdown count. Prints the median of
each and the ratio Ray / local, and checks that both wrote the same rows.
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
CONFIG = HERE.parent / "configs" / "bench" / "ray_grid_digits.yaml"


def sweep(backend: str, out: Path, workers: int) -> float:
    """Seconds for one `engram sweep` process into `out`."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engram", "sweep", str(CONFIG), "--out", str(out),
                    "--workers", str(workers), "--backend", backend, "-q"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def measured(out: Path) -> list[tuple[str, ...]]:
    """The rows' identity and value, without wall times (they differ between runs)."""
    from engram.results import read_rows

    return sorted((r["run_id"], r["task_trained"], r["epoch"], r["task_eval"], r["split"],
                   r["metric"], r["value"]) for r in read_rows(out / "results.csv")
                  if r["metric"] != "train_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for backend in times:
                times[backend].append(sweep(backend, Path(tmp) / f"{backend}{i}", args.workers))
        same = measured(Path(tmp) / "local0") == measured(Path(tmp) / "ray0")
    local, ray = statistics.median(times["local"]), statistics.median(times["ray"])
    print(f"40-run sweep, --workers {args.workers}, whole processes: local pool median "
          f"{local:.1f} s, Ray median {ray:.1f} s, ratio {ray / local:.2f}x "
          f"(min {min(times['local']):.1f} / {min(times['ray']):.1f} s, {args.repeats} runs "
          f"each); same rows: {same}")


if __name__ == "__main__":
    main()
