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
    A worker's exception is raised here when its job is reached."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() if on_progress is not None else _no_manager() as manager:
        progress = manager.Queue() if manager is not None else None
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending = {pool.submit(_call, fn, job, progress): job for job in jobs}
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(progress, on_progress)
                for future in done:
                    yield pending.pop(future), future.result()
            _drain(progress, on_progress)


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
