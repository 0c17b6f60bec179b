"""Independent runs in spawned worker processes, results handed back to this process.

Used by `engram plasticity` and `engram window`: each job is one (method or variant, seed)
run; this process writes every result as it arrives, so the result table has one writer.
"""

from __future__ import annotations

import multiprocessing
import queue
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator


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
    cancelled."""
    context = multiprocessing.get_context("spawn")
    failures: list[BaseException] = []
    with context.Manager() if on_progress is not None else _no_manager() as manager:
        progress = manager.Queue() if manager is not None else None
        pool = ProcessPoolExecutor(workers, mp_context=context)
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


class _no_manager:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
