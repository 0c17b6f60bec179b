"""Independent runs in spawned worker processes, results handed back to this process.

Used by `engram plasticity` and `engram window`: each job is one (method or variant, seed)
run; this process writes every result as it arrives, so the result table has one writer.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing.managers import SyncManager
from typing import Any, Callable, Iterator


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


def _call(fn: Callable, args: tuple, progress: Any) -> Any:
    report = None if progress is None else progress.put
    return fn(*args, report)


def run_in_processes(fn: Callable[..., Any], jobs: list[tuple], workers: int,
                     on_progress: Callable[[int], None] | None = None
                     ) -> Iterator[tuple[tuple, Any]]:
    """Yield (job, fn(*job, report)) as each job finishes, running `workers` at a time in
    spawned processes. `report(n)` called in a worker reaches `on_progress(n)` here (report
    is None when on_progress is). `fn` must be importable (a module-level function).

    A job that raises does not stop the others: every successful job is still yielded, and
    the first failure's exception is raised at the end (its message says how many failed).
    If the consumer stops early (an exception of its own), jobs not yet started are
    cancelled. Workers exit when this process dies (`exit_with_parent`)."""
    context = multiprocessing.get_context("spawn")
    failures: list[BaseException] = []
    watch = dict(initializer=exit_with_parent, initargs=(os.getpid(),))
    with _manager(context, watch) if on_progress is not None else _no_manager() as manager:
        progress = manager.Queue() if manager is not None else None
        pool = ProcessPoolExecutor(workers, mp_context=context, **watch)
        try:
            pending = {pool.submit(_call, fn, job, progress): job for job in jobs}
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(progress, on_progress)
                for future in done:
                    job = pending.pop(future)
                    error = future.exception()
                    if error is not None:
                        failures.append(error)
                        continue
                    yield job, future.result()
            _drain(progress, on_progress)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        first = failures[0]
        if len(failures) > 1:
            first.add_note(f"({len(failures)} of {len(jobs)} jobs failed; the others' results "
                           "were kept)")
        raise first


def _drain(progress: Any, on_progress: Callable[[int], None] | None) -> None:
    if progress is None or on_progress is None:
        return
    while True:
        try:
            on_progress(progress.get_nowait())
        except queue.Empty:
            return


def _manager(context: Any, watch: dict) -> SyncManager:
    """A started manager process (it serves the progress queue) that exits with us too."""
    manager = SyncManager(ctx=context)
    manager.start(**watch)
    return manager


class _no_manager:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
