"""What an experiment hands the harness and what runs one job, wherever it runs: `Job`,
`JobSink`, `Plan`, and the job-side helpers every backend shares (`set_threads`,
`execute_job`, `portable_error`, `error_text`). The harness (engram.experiments.harness)
and its Ray backend (engram.experiments.ray_backend) both import them from here, so the
backend, which the harness imports, needs nothing from the harness. Experiments import these
names from the harness, as before.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from engram.errors import EngramError
from engram.results import ResultWriter


def set_threads(threads: int) -> None:
    """torch's CPU threads for this process (0: leave torch's default). Small models are
    fastest on one thread; a worker process sets its own."""
    if threads:
        torch.set_num_threads(threads)


@dataclass
class Job:
    """One unit of work of an experiment: one run, written under one run id."""
    run_id: str
    seed: int
    label: str                 # what it runs, e.g. "ewc(strength=100)" or a variant's name
    payload: Any               # what `execute` needs (picklable: it may go to a worker)
    point: dict[str, Any] = field(default_factory=dict)  # a sweep's grid values at this job
    size: int = 1              # progress units (epochs, tasks, steps) the job reports
    key_prefix: tuple[str, ...] = ()  # the leading key columns of its rows; default (run_id,)
    # the runs whose rows it writes, when not its own run id's (a group of batched seeds)
    run_ids: tuple[str, ...] = ()

    @property
    def runs(self) -> int:
        """How many runs it writes: 1, or a seed group's seeds."""
        return len(self.run_ids) or 1

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.point.items())
        return f"{self.label} seed {self.seed}" + (f" [{where}]" if where else "")

    def prefix(self) -> tuple[str, ...]:
        return self.key_prefix or (self.run_id,)

    def row_prefixes(self) -> list[tuple[str, ...]]:
        """The leading key columns of every row it writes: prefix(), or one per run of a
        seed group (whose rows are under its seeds' run ids)."""
        return [(run,) for run in self.run_ids] or [self.prefix()]


@dataclass
class JobSink:
    """What a running job talks to: `emit(rows)` hands rows to the one writer (directly, or
    through the worker's pipe), `report(n)` advances the progress bar by n units, `recorded`
    holds the keys of this job's rows already in the table (a resumed run reads them to
    decide whether its checkpoint may be used), and `folder` is the output folder (for the
    job's own files: checkpoints, records)."""
    emit: Callable[[list[dict[str, Any]]], None]
    report: Callable[[int], None]
    recorded: set[tuple[str, ...]]
    folder: Path


@dataclass
class Plan:
    """Everything `run_plan` needs from an experiment."""
    command: str                       # the CLI command, recorded in the folder
    identity: dict[str, Any]           # what determines the folder's numbers (experiment.json)
    growable: tuple[str, ...]          # identity keys a rerun may extend (seeds, grid axes)
    config: dict[str, Any]             # config.yaml as run
    columns: list[str]                 # the results table's columns
    key: tuple[str, ...]               # and the columns that identify a row
    jobs: list[Job]
    execute: Callable[[Job, JobSink], None]  # module level: worker processes import it
    device: str = "cpu"
    threads: int = 1
    unit: str = "run"                  # the progress bar's unit (what Job.size counts)
    finished: Callable[[Job, ResultWriter, Path], bool] | None = None  # default: run_complete
    config_name: str = "config.yaml"


class RunsFailed(EngramError):
    """Some of the runs one job writes (a group of batched seeds) failed and the others
    finished. `failures` holds (run_id, seed, label, error) per failed run, the error as
    portable_error gives it; the harness records each as the failure of a job of its own
    would be recorded (failures.jsonl, the report), so a run fails the same way whether it
    ran alone or in a group."""

    def __init__(self, message: str,
                 failures: list[tuple[str, int, str, BaseException | str]] = ()) -> None:
        super().__init__(message)
        # set as an attribute, not an argument: an exception unpickles as cls(*args), then
        # gets its __dict__ back (a worker process or Ray task sends it to the parent)
        self.failures = [(run_id, seed, label, portable_error(error))
                         for run_id, seed, label, error in failures]


def error_text(error: BaseException) -> str:
    """One line for an engram error; the traceback for anything else (a bug)."""
    if isinstance(error, EngramError):
        return f"{type(error).__name__}: {error}"
    return "".join(traceback.format_exception(error)).rstrip()


def execute_job(execute: Callable[[Job, JobSink], None], job: Job,
                sink: JobSink) -> BaseException | None:
    """Run one job (here, in a worker process or a Ray task); its exception (not
    KeyboardInterrupt) is returned, not raised."""
    try:
        execute(job, sink)
        return None
    except Exception as error:  # noqa: BLE001 - one failed job must not stop the others
        return error


def portable_error(error: BaseException) -> BaseException | str:
    """The exception itself if it survives pickling (engram's errors do), else its text: what
    a worker process or a Ray task sends back."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an unpicklable exception travels as text
        return error_text(error)
