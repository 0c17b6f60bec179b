"""Continual-learning runs: every (method, seed) of a config through its task stream.

The optimisation itself is engram.training.train_task; this module is the bookkeeping around
it: building data and models, evaluating, writing rows, checkpointing at task
boundaries so that rerunning the command continues a killed run exactly where its last
finished task left off (same tensors, same random states: the run's generator and torch's global RNG that
draws dropout masks, so the same numbers). With `batch_seeds: true` the seeds of a method
train together as one stacked network (execute_seeds, at the end; engram.batched_training)
and write the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from engram.config import (MethodSpec, RunConfig, config_to_dict, data_identity, params_dict,
                           train_identity)
from engram.data.streams import Stream
from engram.errors import ConfigError, DivergenceError, EngramError
from engram.methods.base import (Context, Method, ProblemInfo, refuse_unusable,
                                 refuse_unusable_model)
from engram.experiments.harness import (Job, JobSink, Plan, Report, RunsFailed, resolve_device,
                                        run_id, run_plan)
from engram.results import COLUMNS, KEY, ResultWriter, row_key
from engram.training import measure, restore_optimizer, train_task

# Config keys that change how a run is carried out but not its numbers: --resume may differ.
NOT_RESULT_KEYS = ("plots", "threads", "device", "checkpoint_seconds", "batch_seeds")


@dataclass
class RunIdentity:
    """The columns every row of one run shares."""
    run_id: str
    name: str
    method: MethodSpec
    seed: int
    dataset: str
    stream: str
    scenario: str

    @classmethod
    def of_config(cls, cfg: RunConfig, method: MethodSpec, seed: int) -> "RunIdentity":
        """An `engram run` run's: its id (continual_run_id) and its config's names."""
        return cls(continual_run_id(cfg, method, seed), cfg.name, method, seed,
                   cfg.data.source, cfg.stream.kind, cfg.stream.scenario)

    def row(self, **fields: Any) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "name": self.name, "seed": self.seed,
            "method": self.method.name, "label": self.method.label(),
            "params": json.dumps(params_dict(self.method.params), sort_keys=True),
            "dataset": self.dataset, "stream": self.stream,
            "scenario": self.scenario, "task_eval": "", "split": "", **fields}


def evaluation_rows(ident: RunIdentity, ctx: Context, method: Method, task_trained: int,
                     epoch: int, metrics: Sequence[Callable] = ()) -> list[dict]:
    rows = []
    net = method.eval_model(ctx)  # the live model unless the method picks weights per task
    for task in ctx.stream.tasks:
        for split in ctx.train_cfg.eval_splits:
            data = task.val if split == "val" else task.test
            if data is None or len(data) == 0:
                continue
            found = measure(net, data, ctx.loss_fn, metrics)  # the loss trained on
            common = dict(task_trained=task_trained, epoch=epoch, step=ctx.step,
                          task_eval=task.index + 1, split=split)
            rows.append(ident.row(metric="accuracy", value=found.accuracy, **common))
            rows.append(ident.row(metric="loss", value=found.loss, **common))
            rows += [ident.row(metric=name, value=value, **common)
                     for name, value in found.metrics.items()]
    return rows


def epoch_rows(ident: RunIdentity, ctx: Context, method: Method, task_trained: int, epoch: int,
               mean_loss: float, metrics: Sequence[Callable] = ()) -> list[dict]:
    """The rows of one finished epoch: its train_loss, and the evaluations train.eval_every
    asks for inside a task (the last epoch's come with the task's end, task_end_rows)."""
    rows = [ident.row(task_trained=task_trained, epoch=epoch, step=ctx.step, split="train",
                      metric="train_loss", value=mean_loss)]
    every, epochs = ctx.train_cfg.eval_every, ctx.train_cfg.epochs
    if every and epoch % every == 0 and epoch < epochs:
        rows += evaluation_rows(ident, ctx, method, task_trained, epoch, metrics)
    return rows


def task_end_rows(ident: RunIdentity, ctx: Context, method: Method, task_trained: int,
                  seconds: float, metrics: Sequence[Callable] = ()) -> list[dict]:
    """The rows at the end of a task: the evaluations, the task's train_seconds and the
    method's extra_bytes (the last row: task_end_recorded looks for it)."""
    epochs = ctx.train_cfg.epochs
    rows = evaluation_rows(ident, ctx, method, task_trained, epochs, metrics)
    rows.append(ident.row(task_trained=task_trained, epoch=epochs, step=ctx.step, split="train",
                          metric="train_seconds", value=seconds))
    # What the method keeps beyond the live model after this task: the memory bill.
    rows.append(ident.row(task_trained=task_trained, epoch=epochs, step=ctx.step,
                          metric="extra_bytes", value=method.extra_bytes()))
    return rows


def task_end_recorded(keys: set, run_id: str, task: int, epochs: int) -> bool:
    """Whether the results hold the rows written at the end of `task` (1-based) of a run:
    its extra_bytes row, the last of that batch, so the batch before it is complete too."""
    marker = {"run_id": run_id, "task_trained": task, "epoch": epochs, "task_eval": "",
              "split": "", "metric": "extra_bytes"}
    return task == 0 or row_key(marker) in keys


def global_random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG states: the CPU one and, on CUDA, the run device's. Dropout draws
    its masks from them (the run's own generator, ctx.generator, draws everything else), so
    a checkpoint must carry them for a resumed run to draw the masks an uninterrupted one
    would; torch.manual_seed(seed) at the run's start sets both."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_global_random_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what global_random_state saved (the tensors may have been moved to `device` by
    torch.load's map_location; the setters want CPU byte tensors)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:  # absent: saved by a CPU run
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one


# What _save_checkpoint writes, and the type of each entry.
CHECKPOINT_ENTRIES = {"model": dict, "method": dict, "generator": torch.Tensor, "step": int,
                      "tasks_done": int}


def _unusable(path: Path, reason: str) -> EngramError:
    return EngramError(f"checkpoint {path} cannot be read ({reason}); delete it to restart "
                       "this run from its first task")


def _read_checkpoint(path: Path, device: torch.device) -> Any:
    """What a checkpoint file holds (weights-only load onto `device`); EngramError naming
    the file when it is not a torch file (a one-seed run's or a seed group's)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _unusable(path, f"not a torch file: {first_line[:120]}") from None


def _load_checkpoint(path: Path, device: torch.device, n_tasks: int) -> dict:
    """A resume checkpoint, checked to hold CHECKPOINT_ENTRIES with tasks_done in
    [0, n_tasks]; EngramError naming the file otherwise (it would fail deep inside run_one)."""
    state = _read_checkpoint(path, device)
    if not isinstance(state, dict):
        raise _unusable(path, f"it holds a {type(state).__name__}, not an engram checkpoint")
    for key, kind in CHECKPOINT_ENTRIES.items():
        if not isinstance(state.get(key), kind):
            raise _unusable(path, f"entry {key!r} is missing or not a {kind.__name__}")
    if not 0 <= state["tasks_done"] <= n_tasks:
        raise _unusable(path, f"tasks_done is {state['tasks_done']}; this run has {n_tasks} "
                              "tasks")
    return state


def continual_run_id(cfg: RunConfig, method: MethodSpec, seed: int | None) -> str:
    """The run id (engram.experiments.harness.run_id) of everything that determines one run's
    numbers: data, stream, model, train, the method and its parameters, the seed (not the
    name, plots, threads or device). Train settings added later are hashed only when set
    (config.train_identity, config.data_identity), so configs written before them keep their
    run ids. seed=None: the method's identity at this grid point, whichever its seeds (what
    names a group of batched seeds' checkpoint)."""
    identity = {
        "data": data_identity(cfg.data), "stream": dataclasses.asdict(cfg.stream),
        "model": dataclasses.asdict(cfg.model), "train": train_identity(cfg.train),
        "method": {"name": method.name, **params_dict(method.params)}}
    return run_id(identity if seed is None else {**identity, "seed": seed})


def prepare_run(cfg: RunConfig, spec: MethodSpec, seed: int, stream: Stream,
                device: torch.device) -> tuple[RunIdentity, Method, Context]:
    """One run's identity, method and Context, its network built (seeded), checked and
    prepared, before any training: the start of run_one, shared with the seed-batched runs
    (execute_seeds, below), which build each seed's run this same way."""
    from engram.data.augment import check_augmentable, normalize_stream, training_augmentation
    from engram.models import build_model
    from engram.registry import METHODS

    ident = RunIdentity.of_config(cfg, spec, seed)
    augment = cfg.train.augment
    check_augmentable(stream, augment)
    stream = normalize_stream(stream, augment.normalize)  # train, val and test alike
    # before any training: a method that could not act on this stream is refused, not run
    refuse_unusable(spec, ProblemInfo(f"{cfg.data.source} ({cfg.stream.kind} stream)",
                                      stream.head_dim, classification=True))
    torch.manual_seed(seed)  # model init and dropout masks; every other draw uses ctx.generator
    model = build_model(cfg.model, stream.input_shape, stream.n_heads, stream.head_dim).to(device)
    refuse_unusable_model(spec, model)  # e.g. sleep on a cnn: refused before any training
    method: Method = METHODS.get(spec.name)(spec.params)
    ctx = Context(model=model, stream=stream, train_cfg=cfg.train,
                  generator=torch.Generator().manual_seed(seed), device=device,
                  transform=training_augmentation(augment))  # crop, flip: None without
    ctx.model = method.prepare_model(model, ctx).to(device)  # e.g. a progressive net
    return ident, method, ctx


def run_one(cfg: RunConfig, spec: MethodSpec, seed: int, stream: Stream, sink: JobSink,
            device: torch.device) -> str:
    """Train one method with one seed through the whole stream, handing rows to `sink` as
    they are measured; resume from its checkpoint in OUT/checkpoints when the rows of the
    tasks it covers are recorded. Return the run id."""
    ident, method, ctx = prepare_run(cfg, spec, seed, stream, device)
    run_through_stream(ident, method, ctx, sink, cfg.checkpoint_seconds)
    return ident.run_id


def run_through_stream(ident: RunIdentity, method: Method, ctx: Context, sink: JobSink,
                       checkpoint_seconds: float, metrics: Sequence[Callable] = ()) -> None:
    """The body of every continual run (`engram run` through run_one, engram.fit): train
    `method` on ctx.model (built, checked and prepared) through ctx.stream, handing rows to
    `sink` as they are measured: the untrained baseline, each epoch's train loss, the
    evaluations (accuracy, loss with ctx.loss_fn, each of `metrics`), each task's
    train_seconds and extra_bytes, run_complete. A checkpoint in OUT/checkpoints (at most
    every `checkpoint_seconds`, at task ends) lets a rerun resume where it left off when
    the rows of the tasks it covers are recorded."""
    stream, train_cfg, device, model = ctx.stream, ctx.train_cfg, ctx.device, ctx.model
    checkpoint = sink.folder / "checkpoints" / f"{ident.run_id}.pt"
    tasks_done = 0
    state = None
    if checkpoint.exists():
        state = _load_checkpoint(checkpoint, device, len(stream))
        lacks_optimizer = train_cfg.optimizer_policy == "carry" and "optimizer" not in state
        if "global_rng" not in state or lacks_optimizer or not task_end_recorded(
                sink.recorded, ident.run_id, state["tasks_done"], train_cfg.epochs):
            # The checkpoint is ahead of the results (rows lost with a killed sweep parent, or
            # a results file cut short): resuming would leave tasks without rows. Or it is
            # from an engram that did not save the global RNG, so dropout masks would differ (or,
            # under optimizer_policy carry, the optimizer, whose moments would be lost).
            # Start over; the rows already there are re-measured identically and skipped.
            checkpoint.unlink()
            state = None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            method.load_state_dict(state["method"])
            ctx.generator.set_state(state["generator"].cpu())  # map_location moved it
            set_global_random_state(state["global_rng"], device)  # dropout masks
            if "optimizer" in state:  # optimizer_policy carry: its state goes on
                restore_optimizer(ctx, state["optimizer"], state.get("scheduler"))
        except (KeyError, ValueError, TypeError, RuntimeError) as err:  # wrong shapes or keys
            raise _unusable(checkpoint, f"it does not fit this run: "
                                        f"{' '.join(str(err).split())[:200]}") from None
        ctx.step, tasks_done = state["step"], state["tasks_done"]
    else:
        sink.emit(evaluation_rows(ident, ctx, method, 0, 0, metrics))  # the untrained baseline

    epochs = train_cfg.epochs
    sink.report(tasks_done * epochs)  # progress is counted in epochs
    ctx.seen_tasks = list(stream.tasks[:tasks_done])
    last_checkpoint = time.perf_counter()
    for task in stream.tasks[tasks_done:]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        started = time.perf_counter()
        number = task.index + 1

        def on_epoch(epoch: int, mean_loss: float) -> None:
            sink.emit(epoch_rows(ident, ctx, method, number, epoch, mean_loss, metrics))
            sink.report(1)

        train_task(ctx, method, on_epoch)
        seconds = time.perf_counter() - started
        sink.emit(task_end_rows(ident, ctx, method, number, seconds, metrics))
        # A checkpoint costs milliseconds; on short tasks that is a visible share of the run,
        # so save one only when enough work would otherwise be lost. A run killed without one
        # resumes from its previous checkpoint (or its start): the same numbers, re-measured.
        due = time.perf_counter() - last_checkpoint >= checkpoint_seconds
        if due and number < len(stream):
            checkpoint.parent.mkdir(exist_ok=True)  # the harness removes it when empty
            saved = {"model": model.state_dict(), "method": method.state_dict(),
                     "generator": ctx.generator.get_state(),
                     "global_rng": global_random_state(device), "step": ctx.step,
                     "tasks_done": number}
            if train_cfg.optimizer_policy == "carry":  # the next task trains on with it
                saved["optimizer"] = ctx.optimizer.state_dict()
                if ctx.scheduler is not None:
                    saved["scheduler"] = ctx.scheduler.state_dict()
            _save_checkpoint(checkpoint, saved)
            last_checkpoint = time.perf_counter()
    sink.emit([ident.row(task_trained=len(stream), epoch=epochs, step=ctx.step,
                         metric="run_complete", value=1)])
    checkpoint.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the experiment



@dataclass
class RunPayload:
    """What a worker needs to run one job: the grid point's config and the method."""
    cfg: RunConfig
    method: MethodSpec


def continual_jobs(points: list[tuple[dict[str, Any], RunConfig]]) -> list[Job]:
    """The runs of (grid point, config) pairs, each once (two points that differ only in
    name share runs); each job reports its epochs to the progress bar. A config with
    batch_seeds makes one job per method holding its seeds (execute_seeds, below)."""
    jobs, seen = [], set()
    for point, cfg in points:
        if cfg.batch_seeds:
            jobs += seed_group_jobs(point, cfg, seen)
        else:
            jobs += one_seed_jobs(point, cfg, cfg.methods, seen)
    return jobs


def one_seed_jobs(point: dict[str, Any], cfg: RunConfig, specs: list[MethodSpec],
                  seen: set[str]) -> list[Job]:
    """One job per (seed, method of `specs`) whose run id is not in `seen` (which gains it)."""
    jobs = []
    for seed in cfg.seeds:
        for spec in specs:
            key = continual_run_id(cfg, spec, seed)
            if key not in seen:
                seen.add(key)
                jobs.append(Job(key, seed, spec.label(), RunPayload(cfg, spec), point,
                                size=cfg.stream.n_tasks * cfg.train.epochs))
    return jobs


def execute_run(job: Job, sink: JobSink) -> None:
    """The harness's `execute` for continual runs: build the seed's stream, run the method
    (a group of seeds batched: execute_seeds)."""
    from engram.data import build_stream, load_source

    if isinstance(job.payload, SeedsPayload):
        execute_seeds(job, sink)
        return
    cfg, spec = job.payload.cfg, job.payload.method
    device = resolve_device(cfg.device)
    source = load_source(cfg.data.source, cfg.data.path, cfg.data.labels)
    stream = build_stream(source, cfg.data, cfg.stream, job.seed, device)
    run_one(cfg, spec, job.seed, stream, sink, device)


def continual_finished(job: Job, writer: ResultWriter, out: Path) -> bool:
    """The harness's `finished` for continual runs: the run's run_complete row is written
    (for a group of batched seeds, every seed's)."""
    if isinstance(job.payload, SeedsPayload):
        return group_finished(job, writer)
    return job.run_id in writer.completed_runs


def refuse_trackers_with_batched_seeds(cfg: RunConfig, run_options: dict[str, Any]) -> None:
    """ConfigError when --log trackers would watch batched seeds: they log one job as one
    run, and a batched job holds several."""
    if cfg.batch_seeds and run_options.get("trackers"):
        raise ConfigError("--log follows one run per job; with batch_seeds a job trains "
                          "several seeds: drop --log or set batch_seeds: false")


def run_plan_of(cfg: RunConfig) -> Plan:
    """The harness plan of `engram run`: every method x seed of one config."""
    device = resolve_device(cfg.device)  # a bad device stops before the folder is made
    wanted = config_to_dict(cfg)
    identity = {k: v for k, v in wanted.items() if k not in NOT_RESULT_KEYS}
    identity["train"] = train_identity(identity["train"])  # folders of earlier configs resume
    identity["data"] = data_identity(identity["data"])
    identity.update(batched_identity(cfg))
    return Plan(command="run", identity=identity,
                growable=("seeds",), config=wanted, columns=COLUMNS, key=KEY,
                jobs=continual_jobs([({}, cfg)]), execute=execute_run, device=str(device),
                threads=cfg.threads, unit="epoch", finished=continual_finished)


def run_experiment(cfg: RunConfig, out: str | Path, **run_options: Any) -> Report:
    """Run (or resume) every method x seed of `cfg` into `out/results.csv`, on the harness:
    the folder is locked, finished runs are skipped, an interrupted one resumes from its
    last checkpoint. run_options: run_plan's (workers, backend, address, trackers,
    show_progress, raise_failures; engram.experiments.harness)."""
    refuse_trackers_with_batched_seeds(cfg, run_options)
    return run_plan(run_plan_of(cfg), out, **run_options)


# ----------------------------------------------------------------------------- batched seeds
# `batch_seeds: true`: the seeds of one method run as one job, trained as one stacked network.
#
# The harness job of a continual run is one (method, seed); with batch_seeds the seeds of one
# method (at one sweep point) become one job (`seed_group_jobs`), which builds every seed's
# run exactly as run_one does (prepare_run: its stream, its
# seeded initial weights, its generator) and trains them together with
# engram.batched_training.train_task_seeds. Each seed's rows are the one-seed path's rows,
# under the same run ids, with the same values up to float rounding, except train_seconds:
# the task's wall time shared by the seeds that finished the task, divided by their number
# (so that summing over runs still gives the wall time spent). Memory policies of replay
# (reservoir, class_balanced, herding) are all exact batched (tests/test_batched_seeds.py).
#
# Methods that are not `Method.batchable` run their seeds one at a time (seed_group_jobs);
# a folder is resumed only in the mode it was started in (batched_identity). A seed that
# diverges stops where its one-seed run would (the same rows, no run_complete) and sits out
# the rest while the others finish; the group job ends with RunsFailed, which the harness
# records as each diverged seed's own failure (failures.jsonl, the report), as for one-seed
# runs. Refused at planning, before anything runs (`check_batchable`): networks with buffers
# (batch norm: resnet18, resnet18_slim; a plugin kind that adds them for the real input
# shape is refused when its group starts), dropout, train.amp, train.channels_last.
#
# A group checkpoints as a one-seed run does (at task ends, at most every
# checkpoint_seconds: save_group), one file per method and grid point: every seed's network,
# method, generator and step, the seeds that diverged, and under optimizer_policy carry the
# optimizer state. A rerun of the same group resumes from it (resume_group) when the rows of
# the tasks it covers are in the table; otherwise, or when it holds a group of other seeds
# (the folder grew by seeds), it is removed and the group starts over: rows already written
# are skipped, and the re-measured ones may differ from them by float rounding if the
# group's seeds changed. A seed with a one-seed checkpoint (begun before its method could
# batch) goes on alone from it (execute_seeds).


@dataclass
class SeedsPayload:
    """What a worker needs to run one group: the grid point's config, the method, its seeds
    and their run ids (in the seeds' order)."""
    cfg: RunConfig
    method: MethodSpec
    seeds: list[int]
    run_ids: list[str]


def batched_identity(cfg: RunConfig) -> dict[str, Any]:
    """What batch_seeds adds to a folder's identity: {"batch_seeds": True} when it is on,
    nothing when off (folders written before the key existed keep theirs). Batched and
    one-seed runs give the same numbers only up to float rounding, which training can grow
    (see tests/test_ewc.py), so a folder is resumed in the mode it was started in and never
    holds rows of both."""
    return {"batch_seeds": True} if cfg.batch_seeds else {}


# The input shape a network is built for when check_batchable looks at its layers, before
# any data is loaded: which layers (and so which buffers) a body has does not depend on it
# for engram's model kinds. A plugin kind that cannot be built for it, or whose buffers
# depend on the real shape, is checked again when its group starts (execute_seeds).
PLACEHOLDER_INPUT_SHAPE = (3, 32, 32)


def check_batchable(cfg: RunConfig) -> None:
    """ConfigError naming what stops `batch_seeds` for this config: dropout (masks come from
    torch's one global RNG, drawn per run), a network with buffers (batch norm's running
    statistics, which the stacked forward pass does not update), train.amp or
    train.channels_last. Called at planning, before any run starts. (A method whose hooks
    are not known to stay exact when its seeds train together, Method.batchable, runs its
    seeds one at a time instead: seed_group_jobs.)"""
    if cfg.model.dropout > 0:
        raise ConfigError("batch_seeds: model.dropout draws its masks from torch's global RNG, "
                          "one run at a time; set model.dropout: 0 or batch_seeds: false")
    for key in ("amp", "channels_last"):
        if getattr(cfg.train, key):
            raise ConfigError(f"batch_seeds: train.{key} is not supported with batched seeds; "
                              "set one of them to false")
    buffers = model_kind_buffers(cfg)
    if buffers:
        raise ConfigError(f"batch_seeds: model.kind {cfg.model.kind} keeps {len(buffers)} "
                          f"buffers (e.g. {buffers[0]}), which a stacked forward pass does not "
                          "update (batch norm's running statistics); set batch_seeds: false")


def model_kind_buffers(cfg: RunConfig) -> list[str]:
    """The names of the buffers of the body cfg.model builds, built on the meta device (no
    storage, milliseconds even for a ResNet-18) for PLACEHOLDER_INPUT_SHAPE; [] when the
    kind cannot be built for that shape (execute_seeds checks the real network)."""
    from engram.registry import MODELS

    try:
        with torch.device("meta"):
            body, _ = MODELS.get(cfg.model.kind)(PLACEHOLDER_INPUT_SHAPE, cfg.model)
    except Exception:  # noqa: BLE001 - a plugin kind's own shape checks; see above
        return []
    return [name for name, _ in body.named_buffers()]


def seed_group_jobs(point: dict[str, Any], cfg: RunConfig, seen: set[str]) -> list[Job]:
    """One job per method of `cfg` (a sweep point's config) holding all its seeds whose run
    ids are not in `seen` (which gains them); the job's own run id names the group."""
    from engram.registry import METHODS

    check_batchable(cfg)
    unbatched = [spec for spec in cfg.methods if not METHODS.get(spec.name).batchable]
    jobs = one_seed_jobs(point, cfg, unbatched, seen)  # `engram list --params` says which
    for spec in cfg.methods:
        if spec in unbatched:
            continue
        seeds = [seed for seed in cfg.seeds if continual_run_id(cfg, spec, seed) not in seen]
        ids = [continual_run_id(cfg, spec, seed) for seed in seeds]
        seen.update(ids)
        if seeds:
            jobs.append(Job(run_id({"seed_group": ids}), seeds[0], f"{spec.label()} (seeds "
                            f"{','.join(map(str, seeds))} batched)",
                            SeedsPayload(cfg, spec, seeds, ids), point,
                            size=len(seeds) * cfg.stream.n_tasks * cfg.train.epochs,
                            run_ids=tuple(ids)))
    return jobs


def group_finished(job: Job, writer: ResultWriter) -> bool:
    """Whether every run of a seed group has its run_complete row."""
    return all(rid in writer.completed_runs for rid in job.payload.run_ids)


def execute_seeds(job: Job, sink: JobSink) -> None:
    """Run one seed group (the harness's execute, through execute_run): build each
    seed's stream and run as run_one would, train them together, emit each seed's rows.
    A seed with a one-seed checkpoint (begun in a folder written before its method could
    batch) goes on alone from it, so that all of its rows come from one path."""
    from engram.data import build_stream, load_source

    payload: SeedsPayload = job.payload
    cfg, spec = payload.cfg, payload.method
    device = resolve_device(cfg.device)
    source = load_source(cfg.data.source, cfg.data.path, cfg.data.labels)
    checkpoints = Path(sink.folder) / "checkpoints"
    failed: list[tuple[str, int, str, BaseException]] = []
    together = []
    for seed, rid in zip(payload.seeds, payload.run_ids):
        stream = build_stream(source, cfg.data, cfg.stream, seed, device)
        if not (checkpoints / f"{rid}.pt").exists():
            together.append(prepare_run(cfg, spec, seed, stream, device))
            continue
        try:
            run_one(cfg, spec, seed, stream, sink, device)
        except DivergenceError as error:  # as the group reports its own diverged seeds
            failed.append((rid, seed, spec.label(), error))
    for ident, method, ctx in together:
        # check_batchable refused engram's kinds with buffers at planning; this catches a
        # plugin kind (or a method's prepare_model) that adds them for the real input shape
        if any(True for _ in ctx.model.buffers()):
            raise ConfigError("batch_seeds: the network keeps buffers (batch norm's running "
                              "statistics), which a stacked forward pass does not update; "
                              "set batch_seeds: false")
    if together:
        idents, methods, ctxs = map(list, zip(*together))
        # one file per method and grid point, whichever its seeds: a group of other seeds
        # (the folder grew by seeds) finds it, sees it is not its own and removes it
        checkpoint = checkpoints / f"group-{continual_run_id(cfg, spec, None)}.pt"
        try:
            train_seeds(idents, methods, ctxs, sink, checkpoint, cfg.checkpoint_seconds)
        except RunsFailed as error:
            failed = error.failures + failed
    if failed:
        failed.sort(key=lambda failure: payload.run_ids.index(failure[0]))  # in seed order
        raise RunsFailed(f"{len(failed)} of {len(payload.seeds)} batched seeds diverged; the "
                         "others finished", failed)


def train_seeds(idents: list, methods: list, ctxs: list, sink: JobSink, checkpoint: Path,
                checkpoint_seconds: float) -> None:
    """The body of a seed group: run_through_stream's rows for every seed (the untrained
    baseline, each epoch's train loss, the evaluations, each task's train_seconds and
    extra_bytes, run_complete), the training batched (train_task_seeds). A seed that
    diverges stops where its one-seed run would (its rows up to the epoch before, no
    run_complete) while the others go on; RunsFailed at the end names each such seed's
    DivergenceError, which the harness records as that run's failure. Like a one-seed run,
    the group saves a `checkpoint` at task ends (at most every `checkpoint_seconds`): every
    seed's state, so that a rerun of the killed group resumes where it left off."""
    from engram.batched_training import SeedGroup, train_task_seeds

    group = SeedGroup([ctx.model for ctx in ctxs])  # the parameters stacked, once per run
    stream = ctxs[0].stream  # every seed's stream has the same tasks, in the same order
    alive = list(range(len(ctxs)))  # the seeds still training, in order
    diverged: dict[int, EngramError] = {}
    tasks_done = resume_group(checkpoint, group, idents, methods, ctxs, sink, alive, diverged)
    if tasks_done == 0:
        for ident, method, ctx in zip(idents, methods, ctxs):
            sink.emit(evaluation_rows(ident, ctx, method, 0, 0))  # the untrained baseline
    sink.report(tasks_done * ctxs[0].train_cfg.epochs * len(ctxs))  # progress, in epochs
    last_checkpoint = time.perf_counter()
    for index in range(tasks_done, len(stream)):
        if not alive:
            break
        number = index + 1
        for s in alive:
            ctxs[s].task = ctxs[s].stream.tasks[index]
            ctxs[s].seen_tasks.append(ctxs[s].task)
        started = time.perf_counter()

        def on_epoch(s: int, epoch: int, mean_loss: float) -> None:
            sink.emit(epoch_rows(idents[s], ctxs[s], methods[s], number, epoch, mean_loss))
            sink.report(1)

        diverged.update(train_task_seeds(group, ctxs, methods, on_epoch, alive))
        alive = [s for s in alive if s not in diverged]
        # the task's time, shared by the seeds that write it: summed over runs, the wall time
        share = (time.perf_counter() - started) / max(len(alive), 1)
        for s in alive:
            sink.emit(task_end_rows(idents[s], ctxs[s], methods[s], number, share))
        if (time.perf_counter() - last_checkpoint >= checkpoint_seconds and alive
                and number < len(stream)):  # as run_through_stream's
            save_group(checkpoint, group, idents, methods, ctxs, alive, diverged, number)
            last_checkpoint = time.perf_counter()
    for s in alive:
        sink.emit([idents[s].row(task_trained=len(stream), epoch=ctxs[s].train_cfg.epochs,
                                 step=ctxs[s].step, metric="run_complete", value=1)])
    checkpoint.unlink(missing_ok=True)
    if diverged:
        raise RunsFailed(
            f"{len(diverged)} of {len(ctxs)} batched seeds diverged; the others finished",
            [(idents[s].run_id, idents[s].seed, idents[s].method.label(), diverged[s])
             for s in sorted(diverged)])


def save_group(path: Path, group, idents: list, methods: list, ctxs: list, alive: list[int],
               diverged: dict[int, EngramError], tasks_done: int) -> None:
    """A seed group's checkpoint after `tasks_done` tasks: what run_through_stream saves,
    for every seed still training (its network's weights copied out of the stack: a view
    would save the whole stack), the seeds that diverged (their messages, for the failure
    report at the group's end), and under optimizer_policy carry the optimizer state (the
    group's one optimizer, or each seed's)."""
    cfg = ctxs[0].train_cfg
    seeds = {idents[s].run_id: {
        "model": {name: value.clone() for name, value in ctxs[s].model.state_dict().items()},
        "method": methods[s].state_dict(), "generator": ctxs[s].generator.get_state(),
        "step": ctxs[s].step} for s in alive}
    saved: dict[str, Any] = {"group": [ident.run_id for ident in idents], "seeds": seeds,
                             "tasks_done": tasks_done,
                             "diverged": {idents[s].run_id: str(error)
                                          for s, error in diverged.items()}}
    if cfg.optimizer_policy == "carry":
        if group.optimizer is not None:
            saved["optimizer"] = group.optimizer.state_dict()
            if group.scheduler is not None:
                saved["scheduler"] = group.scheduler.state_dict()
        else:
            saved["seed_optimizers"] = {
                idents[s].run_id: {"optimizer": ctxs[s].optimizer.state_dict(),
                                   "scheduler": (None if ctxs[s].scheduler is None
                                                 else ctxs[s].scheduler.state_dict())}
                for s in alive}
    path.parent.mkdir(exist_ok=True)  # the harness removes it when empty
    _save_checkpoint(path, saved)


def resume_group(path: Path, group, idents: list, methods: list, ctxs: list, sink: JobSink,
                 alive: list[int], diverged: dict[int, EngramError]) -> int:
    """Load a seed group's checkpoint (save_group) into the group's networks, methods,
    generators and optimizers, drop the seeds it records as diverged from `alive` (into
    `diverged`), and return how many tasks it covers; 0, having deleted the file, when
    there is none to resume from: no file, a group of other seeds (the config's seeds
    changed), or rows missing for the tasks it covers (as run_through_stream)."""
    from engram.batched_training import shares_one_optimizer
    from engram.optimizers import build_optimizer, build_scheduler

    if not path.exists():
        return 0
    cfg = ctxs[0].train_cfg
    state = _read_checkpoint(path, ctxs[0].device)
    ids = [ident.run_id for ident in idents]
    if not isinstance(state, dict) or state.get("group") != ids:
        path.unlink()  # another group's, or not a group checkpoint: start over
        return 0
    tasks_done = state.get("tasks_done")
    if not isinstance(tasks_done, int) or not 0 < tasks_done <= len(ctxs[0].stream):
        raise _unusable(path, f"tasks_done is {tasks_done!r}")
    if not isinstance(state.get("seeds"), dict) or not isinstance(state.get("diverged"), dict):
        raise _unusable(path, "it holds no seeds or no record of diverged seeds")
    lost: dict[str, str] = state["diverged"]  # run id -> the DivergenceError's message
    survivors = [s for s in range(len(ctxs)) if ids[s] not in lost]
    lacks_optimizer = cfg.optimizer_policy == "carry" and not (
        "optimizer" in state or "seed_optimizers" in state)
    if lacks_optimizer or set(state["seeds"]) != {ids[s] for s in survivors} or not all(
            task_end_recorded(sink.recorded, ids[s], tasks_done, cfg.epochs) for s in survivors):
        path.unlink()  # ahead of the results: the rows already there are re-measured, skipped
        return 0
    try:
        for s in survivors:
            saved = state["seeds"][ids[s]]
            ctxs[s].model.load_state_dict(saved["model"])  # copies into the stack's rows
            methods[s].load_state_dict(saved["method"])
            ctxs[s].generator.set_state(saved["generator"].cpu())  # map_location moved it
            ctxs[s].step = saved["step"]
            ctxs[s].seen_tasks = list(ctxs[s].stream.tasks[:tasks_done])
        if "optimizer" in state:  # carry, one optimizer for the group
            if not shares_one_optimizer(ctxs):
                raise ValueError("the checkpoint holds one optimizer; this group needs one per seed")
            group.optimizer = build_optimizer(group.parameters(), cfg, foreach=True)
            group.scheduler = build_scheduler(group.optimizer, cfg)
            group.optimizer.load_state_dict(state["optimizer"])
            if group.scheduler is not None and "scheduler" in state:
                group.scheduler.load_state_dict(state["scheduler"])
        for s in survivors if "seed_optimizers" in state else ():
            saved = state["seed_optimizers"][ids[s]]
            restore_optimizer(ctxs[s], saved["optimizer"], saved["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as err:
        raise _unusable(path, f"it does not fit this group: "
                              f"{' '.join(str(err).split())[:200]}") from None
    for s in range(len(ctxs)):
        if ids[s] in lost:
            diverged[s] = DivergenceError(lost[ids[s]])
    alive[:] = survivors
    return tasks_done
