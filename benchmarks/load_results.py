"""Speed: engram.load_results vs a plain pandas.read_csv of the same results table.

    python benchmarks/load_results.py [--runs 2000] [--repeats 3]

Writes a continual results table of `--runs` synthetic runs (5 tasks, 2 epochs per task,
test accuracy and loss after every epoch: about 100 rows a run) into a temporary folder,
then times, alternating, median of `--repeats`:

- pandas.read_csv: the leanest read, column types left to pandas' guessing (task_eval,
  empty on training rows, comes back as float64; no validation);
- engram.load_results on the CSV: every row checked by engram.results.read_rows, typed
  columns (see engram.frames);
- engram.load_results on the Parquet file `engram export --parquet` writes (timed once).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import engram
from engram.frames import export_parquet
from engram.results import ResultWriter


def synthetic_rows(run: int, tasks: int = 5, epochs: int = 2) -> list[dict]:
    """The rows a continual run of `tasks` tasks writes, with made-up values."""
    common = {"run_id": f"{run:012x}", "name": "bench", "seed": run % 10, "method": "naive",
              "label": "naive", "params": "{}", "dataset": "digits", "stream": "split",
              "scenario": "class"}
    rows, step = [], 0
    for trained in range(1, tasks + 1):
        for epoch in range(1, epochs + 1):
            step += 10
            rows.append({**common, "task_trained": trained, "epoch": epoch, "step": step,
                         "task_eval": "", "split": "train", "metric": "train_loss",
                         "value": 1.0 / step})
            for evaluated in range(1, tasks + 1):
                for metric in ("accuracy", "loss"):
                    rows.append({**common, "task_trained": trained, "epoch": epoch,
                                 "step": step, "task_eval": evaluated, "split": "test",
                                 "metric": metric, "value": (run + evaluated) % 7 / 7})
    rows.append({**common, "task_trained": tasks, "epoch": epochs, "step": step,
                 "task_eval": "", "split": "", "metric": "run_complete", "value": 1.0})
    return rows


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with ResultWriter(folder / "results.csv") as writer:
            for run in range(args.runs):
                writer.write(synthetic_rows(run))
        size = (folder / "results.csv").stat().st_size
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(timed(lambda: pd.read_csv(folder / "results.csv")))
            ours.append(timed(lambda: engram.load_results(folder)))
        frame = engram.load_results(folder)
        export_parquet([folder])
        parquet = timed(lambda: engram.load_results(folder / "results.parquet"))
        print(f"{len(frame):,} rows, CSV {size / 2**20:.1f} MiB, "
              f"Parquet {(folder / 'results.parquet').stat().st_size / 2**20:.2f} MiB")
        print(f"pandas.read_csv             {statistics.median(plain):7.3f} s")
        print(f"engram.load_results (CSV)   {statistics.median(ours):7.3f} s   "
              f"{statistics.median(ours) / statistics.median(plain):.2f}x read_csv")
        print(f"engram.load_results (.parquet) {parquet:7.3f} s")


if __name__ == "__main__":
    main()
