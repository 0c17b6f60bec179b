"""`batch_seeds: true`: the seeds of one method run as one job, trained as one stacked network.

The harness job of a continual run is one (method, seed); with batch_seeds the seeds of one
method (at one sweep point) become one job (`seed_group_jobs`), which builds every seed's
run exactly as run_one does (engram.experiments.continual.prepare_run: its stream, its
seeded initial weights, its generator) and trains them together with
engram.batched_training.train_task_seeds. Each seed's rows are the one-seed path's rows,
under the same run ids, with the same values up to float rounding, except train_seconds:
the task's wall time shared by all the seeds, divided by their number (so that summing over
runs still gives the wall time spent).

What it does not do (yet): resume a killed group from a checkpoint (a rerun trains the
group's seeds from their first task again; rows already written are skipped, re-measured
alike), and run methods that are not `Method.batchable`, networks with buffers or dropout,
train.amp or train.channels_last: `check_batchable` refuses those before anything runs. A
seed that diverges fails its whole group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.config import MethodSpec, RunConfig
from engram.errors import ConfigError
from engram.experiments.continual import (continual_run_id, epoch_rows, evaluation_rows,
                                          prepare_run, task_end_rows)
from engram.experiments.harness import Job, JobSink, resolve_device, run_id
from engram.results import ResultWriter


@dataclass
class SeedsPayload:
    """What a worker needs to run one group: the grid point's config, the method, its seeds
    and their run ids (in the seeds' order)."""
    cfg: RunConfig
    method: MethodSpec
    seeds: list[int]
    run_ids: list[str]


def check_batchable(cfg: RunConfig) -> None:
    """ConfigError naming what stops `batch_seeds` for this config: a method whose hooks are
    not known to stay exact when its seeds train together (Method.batchable; see `engram
    list --params`), dropout (masks come from torch's one global RNG, drawn per run),
    train.amp or train.channels_last."""
    from engram.registry import METHODS

    refused = [spec.label() for spec in cfg.methods if not METHODS.get(spec.name).batchable]
    if refused:
        raise ConfigError(f"batch_seeds: method {', '.join(refused)} cannot train its seeds "
                          "as one batch (`engram list --params` says which can); set "
                          "batch_seeds: false")
    if cfg.model.dropout > 0:
        raise ConfigError("batch_seeds: model.dropout draws its masks from torch's global RNG, "
                          "one run at a time; set model.dropout: 0 or batch_seeds: false")
    for key in ("amp", "channels_last"):
        if getattr(cfg.train, key):
            raise ConfigError(f"batch_seeds: train.{key} is not supported with batched seeds; "
                              "set one of them to false")


def seed_group_jobs(point: dict[str, Any], cfg: RunConfig, seen: set[str]) -> list[Job]:
    """One job per method of `cfg` (a sweep point's config) holding all its seeds whose run
    ids are not in `seen` (which gains them); the job's own run id names the group."""
    check_batchable(cfg)
    jobs = []
    for spec in cfg.methods:
        seeds = [seed for seed in cfg.seeds if continual_run_id(cfg, spec, seed) not in seen]
        ids = [continual_run_id(cfg, spec, seed) for seed in seeds]
        seen.update(ids)
        if seeds:
            jobs.append(Job(run_id({"seed_group": ids}), seeds[0], f"{spec.label()} (seeds "
                            f"{','.join(map(str, seeds))} batched)", SeedsPayload(cfg, spec, seeds, ids),
                            point, size=len(seeds) * cfg.stream.n_tasks * cfg.train.epochs))
    return jobs


def group_finished(job: Job, writer: ResultWriter) -> bool:
    """Whether every run of a seed group has its run_complete row."""
    return all(rid in writer.completed_runs for rid in job.payload.run_ids)


def execute_seeds(job: Job, sink: JobSink) -> None:
    """Run one seed group (the harness's execute, through continual.execute_run): build each
    seed's stream and run as run_one would, train them together, emit each seed's rows."""
    from engram.data import build_stream, load_source

    payload: SeedsPayload = job.payload
    cfg, spec = payload.cfg, payload.method
    device = resolve_device(cfg.device)
    source = load_source(cfg.data.source, cfg.data.path, cfg.data.labels)
    runs = [prepare_run(cfg, spec, seed, build_stream(source, cfg.data, cfg.stream, seed, device),
                        device) for seed in payload.seeds]
    for ident, method, ctx in runs:
        if any(True for _ in ctx.model.buffers()):
            raise ConfigError("batch_seeds: the network keeps buffers (batch norm's running "
                              "statistics), which a stacked forward pass does not update; "
                              "set batch_seeds: false")
    idents, methods, ctxs = map(list, zip(*runs))
    train_seeds(idents, methods, ctxs, sink)
    for ident in idents:  # a checkpoint left by an earlier one-seed attempt is stale now
        (Path(sink.folder) / "checkpoints" / f"{ident.run_id}.pt").unlink(missing_ok=True)


def train_seeds(idents: list, methods: list, ctxs: list, sink: JobSink) -> None:
    """The body of a seed group: run_through_stream's rows for every seed (the untrained
    baseline, each epoch's train loss, the evaluations, each task's train_seconds and
    extra_bytes, run_complete), the training batched (train_task_seeds)."""
    from engram.batched_training import train_task_seeds

    for ident, method, ctx in zip(idents, methods, ctxs):
        sink.emit(evaluation_rows(ident, ctx, method, 0, 0))  # the untrained baseline
    stream = ctxs[0].stream  # every seed's stream has the same tasks, in the same order
    for index in range(len(stream)):
        number = index + 1
        for ctx in ctxs:
            ctx.task = ctx.stream.tasks[index]
            ctx.seen_tasks.append(ctx.task)
        started = time.perf_counter()

        def on_epoch(s: int, epoch: int, mean_loss: float) -> None:
            sink.emit(epoch_rows(idents[s], ctxs[s], methods[s], number, epoch, mean_loss))
            sink.report(1)

        train_task_seeds(ctxs, methods, on_epoch)
        share = (time.perf_counter() - started) / len(ctxs)  # the task's time, per seed
        for ident, method, ctx in zip(idents, methods, ctxs):
            sink.emit(task_end_rows(ident, ctx, method, number, share))
    for ident, ctx in zip(idents, ctxs):
        sink.emit([ident.row(task_trained=len(stream), epoch=ctx.train_cfg.epochs, step=ctx.step,
                             metric="run_complete", value=1)])
