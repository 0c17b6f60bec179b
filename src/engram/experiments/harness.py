"""The one shell every experiment runs in: folder, config, device, jobs, rows, workers, resume.

An experiment (continual runs and sweeps, the profile, plasticity, the sliding window) turns
its validated config into a `Plan`: what identifies the folder's numbers, the config to keep,
the results table's columns and key, and a list of `Job`s (one run each: a method and a seed,
a grid point, a variant) with a module-level `execute(job, sink)` function that runs one job
and hands its rows to `sink.emit` as they are measured. `run_plan` does the rest, the same way
for every experiment:

- the output folder: locked for the whole call, one writer (engram.experiments.outdir); a
  folder holding another experiment, another command's results or another engram version's
  is refused; `experiment.json` records what determines the numbers, `provenance.jsonl` who
  wrote them;
- `config.yaml`: the config as run; a different earlier one (a folder extended by seeds or
  alternatives) is kept as `config.N.yaml`;
- device and CPU threads, set once;
- one results table (engram.results.ResultWriter): rows appended as measured, keyed, so a
  rerun resumes: finished jobs are skipped, an unfinished one reruns and its rows already
  written are skipped as duplicates;
- one worker pool: with `workers > 1`, jobs run in spawned processes that send their rows
  here, so only this process writes the table, one batch at a time;
- failure isolation: a job that fails (a diverging run, a bug) is recorded in
  `failures.jsonl` with its point and seed, and the others go on;
- progress: a tqdm bar on a terminal; in a log (stderr not a terminal: SLURM, CI, a pipe)
  one line per finished job instead;
- backends: `backend="local"` (the default) runs jobs here or in the local worker pool;
  `backend="ray"` hands them to Ray tasks (a local Ray instance, or the cluster at
  `address`; engram.experiments.ray_backend); either way only this process writes the table
  (`Job`, `JobSink`, `Plan` and the job-side helpers both backends share live in
  engram.experiments.jobs; import them from here);
- trackers (engram.reports.tracking: TensorBoard, MLflow) are told of the plan, of every
  batch of rows as it is written and of every finished job, in this process.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from engram.config import check_device
from engram.errors import ConfigError, EngramError
from engram.experiments.jobs import (Job, JobSink, Plan, RunsFailed, error_text, execute_job,
                                     portable_error, set_threads)
from engram.experiments.outdir import OutputFolder
from engram.plugins import load_plugins
from engram.results import ResultWriter


def run_id(canonical: dict[str, Any]) -> str:
    """The run id: a hash of everything that determines one job's numbers (its canonical,
    JSON-able description: config parts, method and parameters, seed), 12 hex digits. The one
    run-id function of every experiment: the same description gives the same id, so a rerun
    finds the job's rows and skips it."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def content_digest(parts: Iterable[Any]) -> str:
    """A sha256 hex digest of byte buffers (bytes, numpy arrays, memoryviews), in order: the
    contents behind a run id when they cannot be described in a few words (engram.fit's
    tensors and initial weights); run_id then hashes the digest with the rest."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; cpu, cuda, cuda:N and mps must exist here.
    Other torch devices (meta, xpu, ...) are refused by check_device: engram cannot train there."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for CUDA but torch sees no CUDA device; use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r}: torch sees only {torch.cuda.device_count()} CUDA "
                          f"devices (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r}: torch sees no MPS device; use auto or cpu")
    return device


# ----------------------------------------------------------------------------- reports

@dataclass
class Report:
    total: int           # jobs in the plan
    skipped: int         # finished before this call
    completed: int       # finished by this call
    failures: list[dict[str, Any]]
    seconds: float
    folder: Path
    rows_written: int = 0  # rows this call added to the table (duplicates of rows there skipped)
    runs: int = 0          # the runs of the plan's jobs (a group of batched seeds holds several)

    @classmethod
    def extending(cls, report: "Report", **extra: Any) -> "Report":
        """`report` as `cls`, a subclass with fields of an experiment's own (records, counts)."""
        return cls(**{f.name: getattr(report, f.name) for f in fields(report)}, **extra)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def results(self) -> Path:
        """The results table the plan wrote: OUT/results.csv."""
        return self.folder / "results.csv"


class Tracker(Protocol):
    """Something that watches a plan run, in the process that writes the table (an
    experiment tracker: engram.reports.tracking). `rows` gets each job's rows as they are
    written (not the duplicates a resumed job re-measures); `finished` each job's outcome
    (None, or the error's text); `close` the report, after the last job."""
    def start(self, plan: Plan, folder: Path) -> None: ...

    def rows(self, job: Job, rows: list[dict[str, Any]]) -> None: ...

    def finished(self, job: Job, error: str | None) -> None: ...

    def close(self, report: "Report") -> None: ...


BACKENDS = ("local", "ray")


class JobsFailed(EngramError):
    """Some jobs failed; the others' rows were kept. The first failure's error is the cause."""


def keep_config(out: Path, dump: dict[str, Any], name: str = "config.yaml") -> None:
    """Write the config as run to OUT/<name>; an earlier, different one (a folder extended by
    seeds or alternatives, or an older run of it) is kept as <stem>.N<suffix>."""
    import yaml

    text = yaml.safe_dump(dump, sort_keys=False)
    current = out / name
    if current.exists() and current.read_text() != text:
        stem, suffix = current.stem, current.suffix
        n = 1
        while (out / f"{stem}.{n}{suffix}").exists():
            n += 1
        current.rename(out / f"{stem}.{n}{suffix}")
    current.write_text(text)


def run_plan(plan: Plan, out: str | Path, *, workers: int = 1, show_progress: bool = True,
             raise_failures: bool = True, backend: str = "local", address: str | None = None,
             trackers: Sequence[Tracker] = (), imports: Sequence[str] = ()) -> Report:
    """Run (or resume) every job of `plan` into `out`; see the module docstring.

    workers: jobs at once (local processes, or Ray tasks in flight); backend: "local" or
    "ray"; address: the Ray cluster to join (default: start a local Ray instance);
    trackers: told of rows and jobs as they finish (engram.reports.tracking); imports:
    plugin modules (engram.plugins.load_plugins: dotted names, .py paths) that every worker
    process or Ray task imports before it unpickles a job, as the plan's jobs may hold their
    objects (a plugin method's Params); loaded here too. Run ids do not depend on them.
    With raise_failures (the library default) a failed job's exception is raised at the end,
    after every other job ran (its note says how many failed); otherwise the failures are in
    the report and `failures.jsonl`, for the CLI to list."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise ConfigError("--address names a Ray cluster: it needs --backend ray")
    imports = tuple(load_plugins(imports))  # as the workers will name them (absolute paths)
    with OutputFolder(out, plan.command) as folder:
        folder.claim(plan.identity, plan.growable, plan.device)
        return _run_plan_in(plan, folder.path, workers, show_progress, raise_failures,
                            backend, address, trackers, imports)


def _run_plan_in(plan: Plan, out: Path, workers: int, show_progress: bool,
                 raise_failures: bool, backend: str, address: str | None,
                 trackers: Sequence[Tracker], imports: tuple[str, ...]) -> Report:
    started = time.perf_counter()
    for tracker in trackers:
        tracker.start(plan, out)
    keep_config(out, plan.config, plan.config_name)
    set_threads(plan.threads)
    failures_file = out / "failures.jsonl"
    failures: list[dict[str, Any]] = []
    errors: list[BaseException | str] = []
    failed_jobs: list[str] = []  # the run id of each failure's job
    progress = _progress_bar(sum(job.size for job in plan.jobs), plan.unit, show_progress,
                             workers)
    try:
        with ResultWriter(out / "results.csv", plan.columns, plan.key) as writer:
            finished = plan.finished or _run_complete
            todo = [job for job in plan.jobs if not finished(job, writer, out)]
            progress.update(sum(job.size for job in plan.jobs) - sum(job.size for job in todo))
            failures_file.unlink(missing_ok=True)  # this call's failures; earlier ones rerun now

            finished_now = [0]
            log_lines = show_progress and not _stderr_is_terminal()

            def record(job: Job, error: BaseException | str | None) -> None:
                finished_now[0] += 1
                text = None if error is None else (
                    error if isinstance(error, str) else error_text(error))
                for tracker in trackers:
                    tracker.finished(job, text)
                if log_lines:  # no bar in a log (SLURM, CI): a line per finished job instead
                    outcome = "done" if error is None else "FAILED (see failures.jsonl)"
                    print(f"engram {plan.command}: [{finished_now[0]}/{len(todo)}] "
                          f"{job.describe()} {outcome}", file=sys.stderr, flush=True)
                if error is None:
                    return
                # a job of several runs (batched seeds) records each failed run as its own
                runs = (error.failures if isinstance(error, RunsFailed) else
                        [(job.run_id, job.seed, job.label, error)])
                for run, seed, label, run_error in runs:
                    failure = {"run_id": run, "point": job.point, "label": label,
                               "seed": seed, "error": run_error if isinstance(run_error, str)
                               else error_text(run_error)}
                    failures.append(failure)
                    errors.append(run_error)
                    failed_jobs.append(job.run_id)
                    with open(failures_file, "a") as f:
                        f.write(json.dumps(failure) + "\n")

            rows_written = [0]
            recorded = _recorded_by_prefix(writer.keys, todo)  # before any job adds rows

            def write(job: Job, rows: list[dict[str, Any]]) -> None:  # the one place rows are written
                written = writer.write(rows)
                rows_written[0] += len(written)
                for tracker in trackers:
                    tracker.rows(job, written)

            if backend == "ray":
                from engram.experiments.ray_backend import run_in_ray

                run_in_ray(plan, todo, workers, address, recorded, write, out, record, progress,
                           imports)
            elif workers == 1 or len(todo) <= 1:
                for job in todo:
                    progress.set_postfix_str(job.describe(), refresh=False)
                    sink = JobSink(functools.partial(write, job), progress.update,
                                   recorded[job.prefix()], out)
                    record(job, execute_job(plan.execute, job, sink))
            else:
                _run_in_workers(plan, todo, workers, recorded, write, out, record, progress,
                                imports)
    finally:
        progress.close()
    checkpoints = out / "checkpoints"  # jobs keep resume checkpoints there (continual runs)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    completed = len(todo) - len(set(failed_jobs))  # jobs; a group fails when any seed does
    report = Report(len(plan.jobs), len(plan.jobs) - len(todo), completed, failures,
                    time.perf_counter() - started, out, rows_written[0],
                    sum(job.runs for job in plan.jobs))
    for tracker in trackers:
        tracker.close(report)
    # in the plan's order, whichever worker finished first: the same report on every rerun
    # (a job's failed runs in the order it listed them: sorted is stable)
    order = {job.run_id: i for i, job in enumerate(plan.jobs)}
    ranked = sorted(range(len(failures)), key=lambda i: order[failed_jobs[i]])
    failures[:], errors[:] = [failures[i] for i in ranked], [errors[i] for i in ranked]
    if failures and raise_failures:
        first, which = errors[0], f"{failures[0]['label']} seed {failures[0]['seed']}"
        if isinstance(first, str):  # from a worker, as text
            first = JobsFailed(f"{which}: {first}")
        elif isinstance(first, EngramError):  # same type, message naming the run
            first = type(first)(f"{which}: {first}")  # engram's errors take one message
        if len(failures) > 1:
            first.add_note(f"({len(failures)} of {sum(job.runs for job in todo)} runs failed; "
                           f"the others' results were kept; see {failures_file})")
        raise first
    return report


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def _run_complete(job: Job, writer: ResultWriter, out: Path) -> bool:
    return job.run_id in writer.completed_runs


def _recorded_by_prefix(keys: set[tuple[str, ...]], todo: list[Job]
                        ) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """Each job's rows already in the table (JobSink.recorded), by its prefix() (a seed
    group's: its seeds' rows), in one pass over the keys: scanning every key once per job
    would cost runs x rows on a large sweep."""
    found: dict[tuple[str, ...], set[tuple[str, ...]]] = {
        prefix: set() for job in todo for prefix in job.row_prefixes()}
    lengths = {len(prefix) for prefix in found}
    for key in keys:
        for n in lengths:
            if (bucket := found.get(key[:n])) is not None:
                bucket.add(key)
    return {job.prefix(): set().union(*(found[prefix] for prefix in job.row_prefixes()))
            for job in todo}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, unit: str, show: bool, workers: int) -> Any:
    """A tqdm bar on a terminal; nothing when not shown or stderr is not a terminal."""
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, disable=None, unit_scale=True,
                desc=f"{workers} worker{'s' * (workers > 1)}")


# ----------------------------------------------------------------------------- the worker pool

def exit_with_parent(parent: int, every: float = 0.5) -> None:
    """In a worker process: exit as soon as `parent` (the process that started this one)
    has died, checked every `every` seconds by a daemon thread. A parent killed with SIGKILL
    cannot stop its workers, and nobody would read what they compute: without this they
    would compute, or wait on a queue, forever."""
    def watch() -> None:
        while os.getppid() == parent:  # an orphan is re-parented to init or a subreaper
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _worker(conn: Connection, parent: int, execute: Callable, threads: int, out: Path,
            imports: tuple[str, ...] = ()) -> None:
    """A worker process: receive (job, recorded) on its own pipe until None; send back rows,
    progress and each job's outcome, in that order. `parent` is the parent's pid, passed in:
    a parent killed while this process still imported torch has already left it to init, and
    os.getppid() here would name init instead. The plugin modules `imports` are loaded first:
    a job is unpickled on receipt, and may hold their classes; a job that cannot be (a plugin
    this process cannot import) fails with that error, and the worker goes on."""
    exit_with_parent(parent)  # also while waiting for a job or inside a long epoch
    set_threads(threads)
    plugin_error: EngramError | None = None
    try:
        load_plugins(imports)
    except EngramError as error:
        plugin_error = error

    def emit(rows: Iterable[dict[str, Any]]) -> None:
        conn.send(("rows", list(rows)))

    def report(n: int) -> None:
        conn.send(("progress", n))

    try:
        while True:
            try:
                item = conn.recv()
            except (EOFError, OSError):  # the parent has gone: stop (below)
                raise
            except Exception as unpickling:  # noqa: BLE001 - the job, not the pipe, is bad
                conn.send(("done", portable_error(plugin_error or unpickling)))
                continue
            if item is None:
                break
            if plugin_error is not None:
                conn.send(("done", plugin_error))
                continue
            job, recorded = item
            error = execute_job(execute, job, JobSink(emit, report, recorded, out))
            conn.send(("done", None if error is None else portable_error(error)))
    except (KeyboardInterrupt, EOFError):
        pass  # the parent reports the interruption, or has gone


def _run_in_workers(plan: Plan, todo: list[Job], workers: int,
                    recorded: dict[tuple[str, ...], set[tuple[str, ...]]],
                    write: Callable[[Job, list[dict[str, Any]]], None], out: Path,
                    record: Callable[[Job, Any], None], progress: Any,
                    imports: tuple[str, ...] = ()) -> None:
    """Hand `todo` to `workers` spawned processes (each imports the plugin modules `imports`
    first), one job at a time each, over a pipe of its
    own; write their rows here, one batch at a time. Nothing is shared between workers, so a
    worker that dies (killed, out of memory) cannot block the others (a queue shared by all
    would stay locked if one died inside a write): its job fails, and a new worker takes over."""
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    pending = collections.deque(range(len(todo)))  # indices of jobs not yet handed out
    busy: dict[Connection, tuple[Any, int]] = {}   # a working worker's pipe -> (process, job)
    processes: list[Any] = []

    def hand_out(conn: Connection, process: Any) -> None:
        """The next job to an idle worker, or None (it exits) when there are no more."""
        if not pending:
            conn.send(None)
            conn.close()
            return
        index = pending.popleft()
        conn.send((todo[index], recorded[todo[index].prefix()]))
        busy[conn] = (process, index)
        progress.set_postfix_str(todo[index].describe(), refresh=False)

    def start() -> None:
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(target=_worker, daemon=True, args=(
            theirs, os.getpid(), plan.execute, plan.threads, out, imports))
        process.start()
        theirs.close()  # only the worker holds its end now: its death is an EOF here
        processes.append(process)
        hand_out(ours, process)

    for _ in range(min(workers, len(todo))):
        start()
    remaining = len(todo)
    try:
        while remaining:
            if not busy:
                raise EngramError(f"every worker process exited with {remaining} runs left; "
                                  "rerun the command to resume them")
            for conn in wait(list(busy), timeout=1.0):
                process, index = busy[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # the worker died
                    del busy[conn]
                    conn.close()
                    process.join(timeout=5)
                    record(todo[index], f"the worker process died (exit code {process.exitcode}) "
                                        "while running this job")
                    remaining -= 1
                    if pending:
                        start()
                    continue
                kind = message[0]
                if kind == "rows":
                    write(todo[index], message[1])
                elif kind == "progress":
                    progress.update(message[1])
                elif kind == "done":
                    del busy[conn]
                    record(todo[index], message[1])
                    remaining -= 1
                    hand_out(conn, process)
    finally:
        for conn in busy:
            conn.close()
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)
