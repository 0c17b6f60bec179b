"""The Ray backend of the harness: `run_plan(..., backend="ray")` hands jobs to Ray tasks.

It does the job of the harness's local worker pool (`_run_in_workers`) on Ray: at most
`workers` jobs in flight, each a Ray task asking for the plan's `threads` CPUs (and one GPU
when the plan runs on CUDA: Ray sets CUDA_VISIBLE_DEVICES per task, so a job's "cuda" is a
GPU of its own and N GPUs run N jobs at once). A task is a streaming generator: it runs the
job in a thread of the Ray worker and yields ("rows", rows) and ("progress", n) as they are
measured (what queued up meanwhile as one list), then ("done", error); only this process (the
driver) writes the table.

Failures:
- a job's exception (a diverging run, a bug) travels back as a value (harness.execute_job,
  harness.portable_error), exactly as in the local pool, and is recorded; it is not retried;
- a lost worker or node (killed, out of memory, a node gone) is retried here, up to
  LOST_WORKER_RETRIES times, as a new task told which of the job's rows the table holds by
  then (JobSink.recorded: a continual run resumes from its checkpoint). Ray's own retry
  (`max_retries`) is off on purpose: Ray replays a failed streaming generator from its start
  and drops the replay's first k items (the k the driver already consumed) by position, which
  is right only when the job re-yields the very same messages; a job resuming from a
  checkpoint yields fewer, and its new rows would be lost (newer Ray fails such a replay with
  StreamingGeneratorReplayInconsistentError). A new task's messages are all read; rows the
  table holds already are skipped by the writer, and progress already shown is not counted
  twice.

The Ray instance: one already initialised in this process is used as is (and left running);
otherwise `ray.init(address=address)` joins the cluster at `address`, or, with no address,
starts a local instance sized to the plan (workers x threads CPUs, so Ray starts no more
worker processes than there are jobs in flight), and shuts it down at the end. Jobs on other
nodes need engram installed there, and the output folder on a shared filesystem for their own
files (checkpoints, window records), and the plugin modules (`--import`, entry points)
importable there: by name, or at the same path for a .py file.
"""

from __future__ import annotations

import collections
import pickle
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from engram.errors import ConfigError, one_line
from engram.experiments.jobs import Job, JobSink, Plan, execute_job, portable_error, set_threads
from engram.plugins import add_search_path, load_plugins
from engram.results import row_key

LOST_WORKER_RETRIES = 3  # new tasks for a job whose worker or node was lost, then it fails
PROBE_SECONDS = 5.0      # how long a cluster address may take to accept a connection
WAIT_SECONDS = 1.0       # how long the driver waits for a message before checking again


def import_ray() -> Any:
    """The ray module, or a one-line ConfigError naming the pip extra."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--backend ray needs Ray: pip install -e ".[ray]"') from None
    return ray


def job_messages(execute: Callable[[Job, JobSink], None], pickled_job: bytes,
                 recorded: set[tuple[str, ...]], folder: Path, threads: int,
                 imports: tuple[str, ...] = (), search_path: tuple[str, ...] = ()
                 ) -> Iterator[list[tuple[str, Any]]]:
    """The body of a job's Ray task (a streaming generator): run `execute(job, sink)` in a
    thread of this worker and yield what its sink is handed, as it is handed: lists of
    messages ("rows", rows) and ("progress", n), the last one ("done", error or None). A
    generator cannot yield from inside the job's callbacks, hence the thread and the queue
    between them; what queued up meanwhile travels as one list.

    The job travels pickled, and is unpickled here only after the plugin modules `imports`
    are loaded (Ray unpickles a task's arguments before it runs the task, and a job may hold
    a plugin's classes); the driver's `search_path` (its sys.path) lets a worker on its
    machine find the modules it imported by name. A plugin that cannot be loaded here fails
    the job with that error."""
    try:
        add_search_path(search_path)
        load_plugins(imports)
        job: Job = pickle.loads(pickled_job)
    except Exception as error:  # noqa: BLE001 - reported as the job's failure
        yield [("done", portable_error(error))]
        return
    messages: queue.Queue = queue.Queue()

    def run() -> None:
        set_threads(threads)  # torch's thread count is set per thread, this one runs the job
        error: Any = None
        try:
            error = execute_job(execute, job, JobSink(
                lambda rows: messages.put(("rows", list(rows))),
                lambda n: messages.put(("progress", n)), recorded, folder))
        except BaseException as interrupted:  # noqa: BLE001 - the driver must hear "done"
            error = interrupted
        finally:
            messages.put(("done", None if error is None else portable_error(error)))

    set_threads(threads)
    try:  # a node without the driver's folder: the job's own files stay on this node
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    threading.Thread(target=run, daemon=True, name=f"engram-job-{job.run_id}").start()
    while True:  # what the job handed over since the last yield, as one batch (fewer objects)
        batch = [messages.get()]
        while not messages.empty():
            batch.append(messages.get())
        yield batch
        if batch[-1][0] == "done":
            return


def run_in_ray(plan: Plan, todo: list[Job], workers: int, address: str | None,
               recorded: dict[tuple[str, ...], set[tuple[str, ...]]],
               write: Callable[[Job, list[dict[str, Any]]], None], out: Path,
               record: Callable[[Job, Any], None], progress: Any,
               imports: tuple[str, ...] = ()) -> None:
    """Run `todo` as Ray tasks, at most `workers` at once, writing their rows here (the
    harness's `write`), advancing `progress` and recording each job's outcome (`record`); the
    same contract as the harness's local pool, every task loading the plugin modules
    `imports` first. See the module docstring."""
    if not todo:
        return
    ray = import_ray()
    device = torch.device(plan.device)
    if device.type == "cuda" and device.index:
        raise ConfigError(f"device: {plan.device!r}: with --backend ray each job gets a GPU "
                          "of its own from Ray; use device cuda")
    started = connect(ray, address, workers * max(plan.threads, 1))
    try:
        if device.type == "cuda" and ray.cluster_resources().get("GPU", 0) < 1:
            raise ConfigError(f"device: {plan.device!r}, but the Ray cluster has no GPU")
        _drive(ray, plan, todo, workers, recorded, write, out, record, progress,
               num_gpus=1 if device.type == "cuda" else 0, imports=imports)
    finally:
        if started:
            ray.shutdown()


def connect(ray: Any, address: str | None, cpus: int) -> bool:
    """Use this process's Ray instance, or join the cluster at `address` (also RAY_ADDRESS),
    or start a local instance of `cpus` CPUs. True when this call initialised Ray (and the
    caller shuts it down)."""
    import logging
    import os

    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
             "configure_logging": True}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        options, where = {"num_cpus": cpus, **quiet}, None  # a local instance
    else:
        where = address or os.environ["RAY_ADDRESS"]
        _probe(where)  # Ray itself retries an unreachable address for minutes
        options = {"address": address, **({} if where.startswith("ray://") else quiet)}
    try:
        ray.init(**options)
    except BaseException as error:
        ray.shutdown()  # what a failed or interrupted start left running (daemons, agents)
        if where is None or not isinstance(error, Exception):
            raise
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ConfigError(f"--address {where}: cannot join this Ray cluster ({reason})") from None
    return True


def _probe(address: str) -> None:
    """A one-line ConfigError when nothing answers at a HOST:PORT (or ray://HOST:PORT)
    address within PROBE_SECONDS; other forms (auto, local) are left to ray.init."""
    import socket

    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or "://" in host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({reason})") from None


def _drive(ray: Any, plan: Plan, todo: list[Job], workers: int,
           recorded: dict[tuple[str, ...], set[tuple[str, ...]]],
           write: Callable[[Job, list[dict[str, Any]]], None], out: Path,
           record: Callable[[Job, Any], None], progress: Any, num_gpus: int,
           imports: tuple[str, ...] = ()) -> None:
    """Submit, read and retry the tasks; cancel those in flight if this process stops."""
    from ray.exceptions import (NodeDiedError, ObjectLostError, OutOfMemoryError, RayError,
                                WorkerCrashedError)

    lost_worker = (WorkerCrashedError, NodeDiedError, ObjectLostError, OutOfMemoryError)
    task = ray.remote(job_messages).options(
        num_returns="streaming", num_cpus=max(plan.threads, 1), num_gpus=num_gpus,
        max_retries=0,  # lost workers are retried here, as new tasks: see the module docstring
        retry_exceptions=False)  # a job's own failure is final, as in the local pool
    pending = collections.deque(range(len(todo)))  # jobs not yet submitted
    in_flight: dict[Any, int] = {}                 # a task's generator -> its job
    held = {i: set(recorded[job.prefix()]) for i, job in enumerate(todo)}  # rows in the table
    attempts = collections.Counter()               # tasks started per job
    shown = collections.Counter()                  # progress units shown per job
    counted = collections.Counter()                # ... and reported by its current task
    search_path = tuple(sys.path) if imports else ()  # where the plugins were found here

    def submit(index: int) -> None:
        job = todo[index]
        attempts[index] += 1
        counted[index] = 0
        in_flight[task.remote(plan.execute, pickle.dumps(job), held[index], out, plan.threads,
                              imports, search_path)] = index
        progress.set_postfix_str(job.describe(), refresh=False)

    def finish(generator: Any, outcome: Any) -> None:
        record(todo[in_flight.pop(generator)], outcome)
        if pending:
            submit(pending.popleft())

    try:
        while pending and len(in_flight) < workers:
            submit(pending.popleft())
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_SECONDS)
            for generator in ready:
                index = in_flight[generator]
                job = todo[index]
                try:
                    batch = ray.get(next(generator))
                except StopIteration:  # ended without "done": cannot happen, but never hang
                    finish(generator, "the Ray task ended without reporting its outcome")
                    continue
                except lost_worker as error:
                    if attempts[index] <= LOST_WORKER_RETRIES:
                        del in_flight[generator]
                        submit(index)  # a new task, told which rows the table holds now
                        continue
                    lost = attempts[index]
                    finish(generator, f"the Ray worker running this job was lost {lost} "
                                      f"time{'s' * (lost > 1)}; last: {one_line(error)}")
                    continue
                except RayError as error:  # the task itself could not run (e.g. an import)
                    finish(generator, f"Ray could not run this job: {one_line(error)}")
                    continue
                for kind, value in batch:
                    if kind == "rows":
                        write(job, value)
                        held[index].update(row_key(row, plan.key) for row in value)
                    elif kind == "progress":  # a retried job re-reports units already shown
                        counted[index] += value
                        if counted[index] > shown[index]:
                            progress.update(counted[index] - shown[index])
                            shown[index] = counted[index]
                    elif kind == "done":
                        finish(generator, value)
    finally:
        for generator in in_flight:  # interrupted (Ctrl-C) or failed here: stop the rest
            try:
                ray.cancel(generator, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass

