"""Sweeps: a config whose keys may hold lists of alternatives, run as a grid of runs.

A sweep file is an ordinary config (see `engram run --help-config`) in which any key may
list alternatives:

    stream: {scenario: [task, domain, class]}   # 3 alternatives
    train:  {lr: [0.01, 0.1]}                   # x 2
    model:  {hidden: [[64], [256, 256]]}        # a list-valued key: a list of lists, x 2
    methods: [naive, {name: ewc, strength: [10, 100]}]   # method parameters too: 3 methods
    seeds: [0, 1, 2, 3, 4]                      # every point runs every seed

The grid is the Cartesian product of the alternatives; each point runs every method with
every seed. Each (point, method, seed) is one run, keyed by the hash of its canonical
config (`engram.config.run_id`), so a run is measured once however often the sweep is
started: rerunning the same command resumes an interrupted sweep, and adding a seed or an
alternative runs only what is new. Runs go to `--workers` local processes; only the parent
process writes `results.csv`, one whole batch of rows at a time, so rows never interleave.
A run that fails is recorded in `failures.jsonl` (its point, method, seed and error) and
the others go on.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import os
import queue as queue_module
import traceback
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.config import MethodSpec, RunConfig, load_config_dict, run_id
from engram.errors import ConfigError, EngramError

# Keys whose alternatives would not change a run's numbers, so they cannot be grid axes.
NOT_AXES = ("name", "threads", "plots", "device", "checkpoint_seconds")


@dataclass
class Job:
    """One run of the sweep: a grid point's config, one method, one seed."""
    run_id: str
    point: dict[str, Any]  # the grid axes' values at this point, e.g. {"stream.scenario": "task"}
    cfg: RunConfig
    method: MethodSpec
    seed: int

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.point.items())
        return f"{self.method.label()} seed {self.seed}" + (f" [{where}]" if where else "")


# ----------------------------------------------------------------------------- the grid

def _is_alternatives(value: Any, annotation: Any) -> bool:
    """A list means alternatives, except for list-typed keys, where a list of lists does."""
    if not isinstance(value, list) or not value:
        return False
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. int | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return all(isinstance(v, list) for v in value)
    return True


def _find_axes(raw: dict, cls: type, prefix: str = "") -> list[tuple[str, list]]:
    """(dotted key, alternatives) for every key of `raw` that lists alternatives."""
    axes = []
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        if name not in hints or name == "methods":
            continue  # unknown keys: load_config_dict names them; methods: see _expand_methods
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            axes += _find_axes(value, hints[name], key + ".")
        elif _is_alternatives(value, hints[name]):
            if key == "seeds":
                continue  # the seed list, run at every point
            if key in NOT_AXES:
                raise ConfigError(f"{key}: a sweep cannot vary {key}: it does not change a run's "
                                  "numbers, so every alternative would be the same run; give "
                                  "one value")
            axes.append((key, value))
    return axes


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[last] = value


def _expand_methods(entries: Any) -> Any:
    """Method entries whose parameters list alternatives become one entry per combination."""
    from engram.methods import METHODS

    if not isinstance(entries, list):
        return entries  # load_config_dict reports the problem
    expanded = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("name") not in METHODS.names():
            expanded.append(entry)
            continue
        params_cls = METHODS.get(entry["name"]).Params
        hints = typing.get_type_hints(params_cls) if dataclasses.is_dataclass(params_cls) else {}
        axes = [(k, v) for k, v in entry.items()
                if k in hints and k != "methods" and _is_alternatives(v, hints[k])]
        for values in itertools.product(*(v for _, v in axes)):
            expanded.append({**entry, **dict(zip((k for k, _ in axes), values))})
    return expanded


def expand_sweep(raw: Any, source: str = "sweep") -> list[tuple[dict[str, Any], RunConfig]]:
    """Every grid point of a raw sweep dict: (axis values, validated RunConfig).

    Every point is validated before anything runs, so a typo in the last alternative stops
    the sweep at once, naming the point.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    raw = copy.deepcopy(raw)
    if "methods" in raw:
        raw["methods"] = _expand_methods(raw["methods"])
    axes = _find_axes(raw, RunConfig)
    base_name = raw.get("name", source)
    points = []
    for values in itertools.product(*(alternatives for _, alternatives in axes)):
        point = dict(zip((key for key, _ in axes), values))
        tree = copy.deepcopy(raw)
        for key, value in point.items():
            _set_dotted(tree, key, value)
        try:
            cfg = load_config_dict(tree, source=source)
        except ConfigError as err:
            where = ", ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"{source}, grid point [{where}]: {err}" if where else str(err)) from None
        # The name tells grid points apart in tables; the scenario is a column of its own.
        # Set after validation: the plain-name rule is for the name the user wrote.
        shown = {k: v for k, v in point.items() if k != "stream.scenario"}
        if shown:
            cfg.name = f"{base_name}[" + ",".join(f"{k}={v}" for k, v in shown.items()) + "]"
        points.append((point, cfg))
    return points


def sweep_jobs(points: list[tuple[dict[str, Any], RunConfig]]) -> list[Job]:
    """The runs of the grid, each once (two points that differ only in name share runs)."""
    jobs, seen = [], set()
    for point, cfg in points:
        for seed in cfg.seeds:
            for spec in cfg.methods:
                key = run_id(cfg, spec, seed)
                if key not in seen:
                    seen.add(key)
                    jobs.append(Job(key, point, cfg, spec, seed))
    return jobs


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[dict, list[Job]]:
    """Read a sweep file (safe YAML), apply `dotted.key=value` overrides (a value may be a
    list of alternatives too) and return (the resulting raw sweep, its jobs)."""
    from engram.config import apply_override, read_yaml_file

    raw = read_yaml_file(path, "sweep file")
    if isinstance(raw, dict):
        for override in overrides:
            apply_override(raw, override)
    return raw, sweep_jobs(expand_sweep(raw, str(path)))


# ----------------------------------------------------------------------------- running one

@functools.lru_cache(maxsize=4)
def _source(name: str, path: str | None):
    from engram.data import DATASETS
    return DATASETS.get(name)(path)


def _execute(job: Job, writer: Any, checkpoint_dir: Path) -> str | None:
    """Run one job; return None on success or the error text (the traceback for bugs)."""
    import torch

    from engram.data import build_stream
    from engram.runner import resolve_device, run_one

    try:
        if job.cfg.threads:
            torch.set_num_threads(job.cfg.threads)
        device = resolve_device(job.cfg.device)
        stream = build_stream(_source(job.cfg.data.source, job.cfg.data.path), job.cfg.data,
                              job.cfg.stream, job.seed, device)
        run_one(job.cfg, job.method, job.seed, stream, writer, checkpoint_dir, device)
        return None
    except EngramError as err:
        return f"{type(err).__name__}: {err}"
    except Exception:  # noqa: BLE001 - a bug in one run must not stop the sweep
        return traceback.format_exc().rstrip()


class _QueueWriter:
    """Stands in for ResultWriter inside a worker: sends each batch of rows to the parent."""

    def __init__(self, messages: Any) -> None:
        self.messages = messages
        self.parent = os.getppid()
        self.completed_runs: set[str] = set()  # the parent only hands out unfinished runs
        self.keys: set[tuple[str, ...]] = set()  # the job's task-end markers, from the parent

    def write(self, rows: Any) -> None:
        if os.getppid() != self.parent:
            os._exit(1)  # the parent died: nobody would write these rows, so stop computing
        self.messages.put(("rows", list(rows)))


def _worker(worker_id: int, jobs: Any, messages: Any, checkpoint_dir: Path) -> None:
    """A worker process: take jobs until the sentinel None; report rows and outcomes."""
    from engram.parallel import exit_with_parent

    writer = _QueueWriter(messages)
    exit_with_parent(writer.parent)  # also while waiting for a job or inside a long epoch
    try:
        while (item := jobs.get()) is not None:
            index, job, writer.keys = item
            messages.put(("start", worker_id, index))
            # Sent through the same queue after the job's rows, so the parent sees them first.
            messages.put(("done", worker_id, index, _execute(job, writer, checkpoint_dir)))
    except KeyboardInterrupt:
        pass  # the parent reports the interruption


# ----------------------------------------------------------------------------- the sweep

@dataclass
class SweepReport:
    total: int           # runs in the grid
    skipped: int         # already complete before this invocation
    completed: int       # finished by this invocation
    failures: list[dict[str, Any]]


def _keep_sweep_file(out: Path, raw: dict) -> None:
    """Store the sweep (after overrides); an earlier, different one is kept as sweep.N.yaml."""
    import yaml

    text = yaml.safe_dump(raw, sort_keys=False)
    current = out / "sweep.yaml"
    if current.exists() and current.read_text() != text:
        n = 1
        while (out / f"sweep.{n}.yaml").exists():
            n += 1
        current.rename(out / f"sweep.{n}.yaml")
    current.write_text(text)


def run_sweep(path: str | Path, out: str | Path, *, overrides: list[str] = (), workers: int = 1,
              show_progress: bool = True) -> SweepReport:
    """Run (or resume) every run of the sweep file `path` into `out/results.csv`. The
    folder is locked and must hold this sweep (or one it extends): engram.outdir."""
    from engram.outdir import OutputFolder
    from engram.runner import resolve_device

    raw, jobs = load_sweep(path, overrides)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    identity, extensible = sweep_identity(raw, str(path))
    device = str(resolve_device(jobs[0].cfg.device)) if jobs else ""
    # Locked for the whole sweep: only this process (not its workers) writes the folder.
    with OutputFolder(out, "sweep") as folder:
        folder.claim(identity, extensible, device)
        return _run_sweep_in(folder.path, raw, jobs, workers, show_progress)


def sweep_identity(raw: dict, source: str = "sweep") -> tuple[dict[str, Any], list[str]]:
    """What determines a sweep folder's numbers, for engram.outdir: the first grid point's
    resolved config (defaults filled in) without the keys that are not axes, each axis
    replaced by its list of alternatives, and the sweep's own name. Returns (identity, the
    keys that may grow): the axes, the method list and the seeds, so adding an alternative
    or a seed extends a folder while changing a single-valued setting is refused."""
    from engram.config import config_to_dict
    from engram.outdir import flatten

    points = expand_sweep(raw, source)
    axes = list(points[0][0])
    identity = flatten({k: v for k, v in config_to_dict(points[0][1]).items()
                        if k not in NOT_AXES})
    flat_points = [flatten(config_to_dict(cfg)) for _, cfg in points]
    for key in axes:
        identity[key] = list({json.dumps(p[key]): p[key] for p in flat_points}.values())
    identity["name"] = raw.get("name", source)
    return identity, ["seeds", "methods", *axes]


def _run_sweep_in(out: Path, raw: dict, jobs: list[Job], workers: int,
                  show_progress: bool) -> SweepReport:
    from engram.results import ResultWriter

    _keep_sweep_file(out, raw)
    checkpoint_dir = out / "checkpoints"
    checkpoint_dir.mkdir(exist_ok=True)
    failures_file = out / "failures.jsonl"
    failures_file.write_text("")  # this invocation's failures; earlier ones are retried now
    failures: list[dict[str, Any]] = []

    with ResultWriter(out / "results.csv") as writer:
        todo = [job for job in jobs if job.run_id not in writer.completed_runs]
        runs_with_rows = {key[0] for key in writer.keys}  # KEY starts with run_id
        for job in todo:
            checkpoint = checkpoint_dir / f"{job.run_id}.pt"
            if checkpoint.exists() and job.run_id not in runs_with_rows:
                checkpoint.unlink()  # its earlier rows are gone: start that run afresh

        def record(job: Job, error: str | None) -> None:
            if error is None:
                return
            failure = {"run_id": job.run_id, "point": job.point, "method": job.method.label(),
                       "seed": job.seed, "error": error}
            failures.append(failure)
            with open(failures_file, "a") as f:
                f.write(json.dumps(failure) + "\n")

        progress = None
        if show_progress:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(todo), unit="run", dynamic_ncols=True, disable=None,
                            desc=f"sweep ({workers} worker{'s' * (workers > 1)})")
        try:
            if workers == 1 or len(todo) <= 1:
                for job in todo:
                    if progress is not None:
                        progress.set_postfix_str(job.describe(), refresh=True)
                    record(job, _execute(job, writer, checkpoint_dir))
                    if progress is not None:
                        progress.update(1)
            else:
                _run_in_workers(todo, workers, writer, checkpoint_dir, record, progress)
        finally:
            if progress is not None:
                progress.close()
    if checkpoint_dir.exists() and not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()
    return SweepReport(total=len(jobs), skipped=len(jobs) - len(todo),
                       completed=len(todo) - len(failures), failures=failures)


def _run_in_workers(todo: list[Job], workers: int, writer: Any, checkpoint_dir: Path,
                    record: Any, progress: Any) -> None:
    """Hand `todo` to `workers` processes; write their rows here, one batch at a time."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    jobs, messages = context.Queue(), context.Queue()
    for index, job in enumerate(todo):
        # The rows the parent holds that say which tasks of this run are fully recorded: a
        # worker resumes a checkpoint only if its rows are there (runner.task_end_recorded).
        markers = {key for key in writer.keys if key[0] == job.run_id and key[-1] == "extra_bytes"}
        jobs.put((index, job, markers))
    processes: dict[int, Any] = {}
    running: dict[int, int] = {}  # worker id -> index of the job it holds
    worker_ids = itertools.count()

    def start() -> None:
        jobs.put(None)  # one sentinel per started worker ends it when the jobs run out
        worker_id = next(worker_ids)
        process = context.Process(target=_worker, args=(worker_id, jobs, messages, checkpoint_dir),
                                  daemon=True)
        process.start()
        processes[worker_id] = process

    for _ in range(min(workers, len(todo))):
        start()
    remaining = len(todo)
    try:
        while remaining:
            try:
                message = messages.get(timeout=1.0)
            except queue_module.Empty:
                # A worker that died (killed, out of memory) loses its job: report it, replace it.
                for worker_id, process in list(processes.items()):
                    if process.is_alive() or worker_id not in running:
                        continue
                    index = running.pop(worker_id)
                    record(todo[index], f"the worker process died (exit code {process.exitcode}) "
                                        "while running this job")
                    remaining -= 1
                    if progress is not None:
                        progress.update(1)
                    del processes[worker_id]
                    if remaining:
                        start()
                if remaining and not any(process.is_alive() for process in processes.values()):
                    raise EngramError(f"every sweep worker process exited with {remaining} runs "
                                      "left; rerun the sweep to resume them")
                continue
            kind = message[0]
            if kind == "rows":
                writer.write(message[1])
            elif kind == "start":
                running[message[1]] = message[2]
                if progress is not None:
                    progress.set_postfix_str(todo[message[2]].describe(), refresh=True)
            elif kind == "done":
                _, worker_id, index, error = message
                running.pop(worker_id, None)
                record(todo[index], error)
                remaining -= 1
                if progress is not None:
                    progress.update(1)
    finally:
        jobs.cancel_join_thread()  # unstarted jobs left in the queue must not block our exit
        for process in processes.values():
            if process.is_alive():
                process.terminate()
        for process in processes.values():
            process.join(timeout=5)
