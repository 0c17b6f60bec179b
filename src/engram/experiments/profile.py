"""The weight-importance profiler: which measure knows which weights matter?

For each seed: train a network on one task, and at chosen epochs score every weight with
each importance measure; group the scores (per weight, unit, filter or layer), order the
groups (least or most important first, ties at random) and, for every threshold t of a grid,
replace the first fraction t of the groups with small random values; record the validation
loss and accuracy of each thresholded network. A measure whose curve stays low longer knows
better which weights matter. The trained network itself is never changed: the thresholded
parameter sets are stacked copies evaluated together (`aggregate.evaluate_stacked`).

Every result is one row of `OUT/results.csv`, appended as it is measured (`PROFILE_COLUMNS`);
a rerun skips the rows already there, so an interrupted grid resumes, and a grid grown by
more seeds, measures or thresholds measures only what is new. `profile_id` hashes what
determines the numbers besides the grid axes (data, task, model, training, replacement); a
folder holding another profile is refused (engram.experiments.outdir).

The grid runs on the one harness (engram.experiments.harness): one job per seed (train it,
profile it at each chosen epoch), so `--workers N` profiles N seeds in parallel processes
while this process alone writes the table, and a seed that fails is listed while the
others go on.

    engram profile configs/profile/digits.yaml --out runs/profile_digits --workers 3
    engram profile-report runs/profile_digits
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from engram.config import DataConfig, ModelConfig, StreamConfig, TrainConfig, check_device, check_name, check_seeds, data_identity, train_identity
from engram.optimizers import check_optimization, lower_name, optimizer_takes
from engram.schema import opt, parse_dataclass, read_config_tree
from engram.errors import ConfigError
from engram.experiments.harness import Job, JobSink, Plan, Report, resolve_device, run_id, run_plan
from engram.registry import MEASURES, STREAMS
from engram.results import PROFILE_COLUMNS, PROFILE_KEY, ResultWriter  # the table's columns
from engram.importance.measures import Trajectory
from engram.methods.base import Batch, Context, Method
from torch import nn

DEFAULT_MEASURES = ["random", "magnitude", "inverse_magnitude", "fisher_exact",
                    "fisher_empirical", "mas", "si", "taylor", "snip", "weight_change"]
DEFAULT_THRESHOLDS = [round(0.05 * i, 2) for i in range(21)]  # 0, 0.05, ..., 1


@dataclass
class ProfileTask:
    kind: str = opt("split", "stream the task comes from (see `engram list`)", registry=STREAMS)
    n_tasks: int = opt(1, "tasks in that stream (split: at most classes / classes_per_task)", low=1)
    classes_per_task: int = opt(10, "split only: classes per task (10 on digits: all of them)",
                                low=1)
    rotation_step: float = opt(30.0, "rotated only: degrees added per task", low=-360, high=360)
    task: int = opt(1, "which task of the stream to train and profile (1-based); e.g. "
                       "classes_per_task: 2, task: 1 is 'classify 0s and 1s'", low=1)


@dataclass
class ProfileTrain:
    batch_size: int = opt(32, "examples per optimizer step", low=1)
    optimizer: str = opt("sgd", "any optimizer class of torch.optim, any case (sgd, adam, "
                         "adamw, rmsprop, ...)")
    lr: float = opt(0.1, "learning rate", low=0.0)
    momentum: float = opt(0.9, "momentum of optimizers that take one (sgd, rmsprop); the "
                          "others ignore it", low=0.0, high=0.999)
    weight_decay: float = opt(0.0, "weight decay of the optimizer", low=0.0)
    optimizer_args: dict[str, Any] = opt({}, "more keyword arguments of the optimizer class")
    scheduler: str | None = opt(None, "an LR scheduler class of torch.optim.lr_scheduler "
                                "(null: none)")
    scheduler_args: dict[str, Any] = opt({}, "keyword arguments of the scheduler")
    scheduler_step: Literal["epoch", "step"] = opt(
        "epoch", "call scheduler.step() after every epoch or after every optimizer step")

    def __post_init__(self) -> None:
        self.optimizer, self.scheduler = lower_name(self.optimizer), lower_name(self.scheduler)
        # the default momentum 0.9 is sgd's: an optimizer without one ignores it, as before
        check_optimization(self, "train", strict_momentum=False)

    def train_config(self, epochs: int) -> TrainConfig:
        """The runner's TrainConfig of this training (`epochs` epochs)."""
        fields = dataclasses.asdict(self)
        if not optimizer_takes(self.optimizer, "momentum"):
            fields["momentum"] = 0.0
        return TrainConfig(epochs=epochs, **fields)


@dataclass
class ProfileGrid:
    epochs: list[int] = opt([2], "profile after these training epochs (training runs to the "
                                 "largest)", low=1)
    measures: list[str] = opt(list(DEFAULT_MEASURES), "importance measures (see `engram list`)",
                              registry=MEASURES)
    aggregations: list[Literal["weight", "unit", "filter", "layer"]] = opt(
        ["weight", "unit", "layer"], "groups replaced together: weight, unit (fan-in + bias), "
        "filter (conv output channel), layer")
    reducers: list[Literal["mean", "min", "max"]] = opt(["mean"], "a group's score from its "
                                                                 "weights' scores")
    scopes: list[Literal["layer", "model"]] = opt(
        ["layer"], "rank groups within each layer, or across the whole model (layer "
        "aggregation is always ranked across the model: a layer holds one layer-group)")
    directions: list[Literal["least_first", "most_first"]] = opt(
        ["least_first", "most_first"], "replace the least or the most important first")
    thresholds: list[float] = opt(list(DEFAULT_THRESHOLDS), "fractions of groups replaced",
                                  low=0.0, high=1.0)
    replacement: Literal["normal", "zero"] = opt("normal", "replaced weights become N(0, (scale "
                                                           "* layer weight std)^2), or 0")
    replacement_scale: float = opt(0.1, "std of the replacement, in units of the layer's "
                                        "weight std", low=0.0)
    importance_examples: int = opt(1000, "training examples the measures see", low=1)


@dataclass
class ProfileConfig:
    name: str = opt("profile", "a name for this grid, shown in reports", check=check_name)
    seeds: list[int] = opt([0, 1, 2], "random seeds: data split, initialisation, order, ties",
                           check=check_seeds)
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N",
                      check=check_device)
    threads: int = opt(1, "CPU threads for torch (0: torch's default)", low=0)
    data: DataConfig = field(default_factory=lambda: DataConfig(val_fraction=0.2),
                             metadata={"doc": "where examples come from (val_fraction: the "
                                              "validation set the curves are measured on)"})
    task: ProfileTask = field(default_factory=ProfileTask, metadata={"doc": "the task trained"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the network"})
    train: ProfileTrain = field(default_factory=ProfileTrain, metadata={"doc": "its training"})
    profile: ProfileGrid = field(default_factory=ProfileGrid, metadata={"doc": "the grid"})

    def __post_init__(self) -> None:
        check_seeds(self.seeds, "seeds")
        if self.data.val_fraction <= 0:
            raise ConfigError("data.val_fraction: the profiler measures validation loss; give "
                              "a fraction > 0, e.g. 0.2")
        if self.task.task > self.task.n_tasks:
            raise ConfigError(f"task.task: {self.task.task} is beyond the stream's "
                              f"{self.task.n_tasks} tasks")
        for key in ("epochs", "measures", "aggregations", "reducers", "scopes", "directions",
                    "thresholds"):
            if not getattr(self.profile, key):
                raise ConfigError(f"profile.{key}: give at least one value")


def load_profile_config(path: str | Path, overrides: list[str] = ()) -> ProfileConfig:
    """Read a profile YAML (safe loader), apply dotted overrides, validate everything."""
    return parse_dataclass(ProfileConfig, read_config_tree(path, overrides))


def profile_id(cfg: ProfileConfig) -> str:
    """The run id (engram.experiments.harness.run_id) of what determines the numbers apart
    from the grid axes and seeds; unchanged content, so folders made earlier keep their ids."""
    grid = cfg.profile
    return run_id({"data": data_identity(cfg.data), "task": dataclasses.asdict(cfg.task),
                   "model": dataclasses.asdict(cfg.model), "train": train_identity(cfg.train),
                   "replacement": [grid.replacement, grid.replacement_scale],
                   "importance_examples": grid.importance_examples})


def derived_generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `parts` (same on every rerun, so a resumed
    grid draws the same random measure, ties and replacement values)."""
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


@dataclass
class ProfileReport(Report):
    """The harness's report (jobs: one per seed, rows_written: the curve points measured now)
    and the rows of this grid that were already there."""
    rows_skipped: int = 0


def _combinations(grid: ProfileGrid) -> list[tuple[str, str, str, str]]:
    """(aggregation, reducer, scope, direction) of every curve. Whole layers are ranked across
    the model only: within a layer the one group would be all-or-nothing at t = 0.5."""
    combos = []
    for agg in grid.aggregations:
        scopes = ["model"] if agg == "layer" else grid.scopes
        combos += [(agg, red, scope, direction) for red in grid.reducers for scope in scopes
                   for direction in grid.directions]
    return combos


# The config's lists a profile folder may grow by: each value is its own rows.
GROWABLE = ("seeds", "profile.epochs", "profile.measures", "profile.aggregations",
            "profile.reducers", "profile.scopes", "profile.directions", "profile.thresholds")


def _seed_keys(cfg: ProfileConfig, pid: str, seed: int) -> set[tuple[str, ...]]:
    """The keys of every row one seed contributes to the grid."""
    from engram.results import row_key

    return {row_key({"profile_id": pid, "seed": seed, "epoch": epoch, "measure": measure,
                     "aggregation": agg, "reducer": red, "scope": scope, "direction": direction,
                     "threshold": threshold}, PROFILE_KEY)
            for epoch in cfg.profile.epochs for measure in cfg.profile.measures
            for agg, red, scope, direction in _combinations(cfg.profile)
            for threshold in cfg.profile.thresholds}


class _SeedFinished:
    """The plan's `finished`: a seed is done when all its rows are in the table. The harness
    asks about every job before running any, so the keys seen present here are the rows this
    call found already there (counted as skipped)."""

    def __init__(self, cfg: ProfileConfig) -> None:
        self.cfg = cfg
        self.present: set[tuple[str, ...]] = set()

    def __call__(self, job: Job, writer: ResultWriter, out: Path) -> bool:
        keys = _seed_keys(self.cfg, job.run_id, job.seed)
        self.present |= keys & writer.keys
        return keys <= writer.keys


def profile_plan(cfg: ProfileConfig) -> Plan:
    """The harness plan of `engram profile`: one job per seed (train once, profile at every
    chosen epoch), its progress counted in curve points."""
    device = resolve_device(cfg.device)  # a bad device stops before the folder is made
    dump = dataclasses.asdict(cfg)
    pid = profile_id(cfg)
    grid = cfg.profile
    per_seed = (len(grid.epochs) * len(grid.measures) * len(_combinations(grid))
                * len(grid.thresholds))
    jobs = [Job(pid, seed, cfg.name, cfg, size=per_seed, key_prefix=(pid, str(seed)))
            for seed in cfg.seeds]
    identity = {k: v for k, v in dump.items() if k not in ("device", "threads")}
    identity["train"] = train_identity(identity["train"])  # folders of earlier configs resume
    identity["data"] = data_identity(identity["data"])
    return Plan(command="profile", identity=identity,
                growable=GROWABLE, config=dump, columns=PROFILE_COLUMNS, key=PROFILE_KEY,
                jobs=jobs, execute=execute_profile, device=str(device), threads=cfg.threads,
                unit="point", finished=_SeedFinished(cfg))


def run_profile(cfg: ProfileConfig, out: str | Path, **run_options: Any) -> ProfileReport:
    """Run (or resume) the whole grid of `cfg` into `out/results.csv` on the harness (one job
    per seed; `workers` > 1 runs seeds in parallel processes). The folder must hold this
    profile, or one this extends by seeds or grid values (GROWABLE). rows_written: the rows
    this call measured; rows_skipped: this grid's rows that were already there.
    run_options: run_plan's (workers, backend, address, trackers, show_progress,
    raise_failures)."""
    plan = profile_plan(cfg)
    report = run_plan(plan, out, **run_options)
    return ProfileReport.extending(report, rows_skipped=len(plan.finished.present))


def execute_profile(job: Job, sink: JobSink) -> None:
    """The harness's `execute` for the profile: one seed's stream, training and profiles."""
    from engram.data import build_stream, load_source

    cfg: ProfileConfig = job.payload
    device = resolve_device(cfg.device)
    stream_cfg = StreamConfig(kind=cfg.task.kind, scenario="domain", n_tasks=cfg.task.n_tasks,
                              classes_per_task=cfg.task.classes_per_task,
                              rotation_step=cfg.task.rotation_step)
    source = load_source(cfg.data.source, cfg.data.path, cfg.data.labels)
    stream = build_stream(source, cfg.data, stream_cfg, job.seed, device)
    _profile_seed(cfg, job.run_id, job.seed, stream.tasks[cfg.task.task - 1], stream, device,
                  sink)


def _profile_seed(cfg: ProfileConfig, pid: str, seed: int, task: Any, stream: Any,
                  device: torch.device, sink: JobSink) -> None:
    """Train one seed's network, profiling it at each chosen epoch."""
    from engram.methods.base import Context
    from engram.models import build_model
    from engram.training import train_task

    torch.manual_seed(seed)  # initialisation; training draws come from ctx.generator
    model = build_model(cfg.model, stream.input_shape, 1, stream.head_dim).to(device)
    train_cfg = cfg.train.train_config(max(cfg.profile.epochs))
    ctx = Context(model=model, stream=stream, train_cfg=train_cfg, device=device,
                  generator=torch.Generator().manual_seed(seed), task=task, seen_tasks=[task])
    recorder = TrajectoryRecorder()

    def on_epoch(epoch: int, mean_loss: float) -> None:
        if epoch in cfg.profile.epochs:
            profile_network(cfg, pid, seed, epoch, model, task, recorder, mean_loss, sink)

    train_task(ctx, recorder, on_epoch)


def _importance_batches(task: Any, cfg: ProfileConfig, seed: int) -> list[tuple]:
    """The training examples the measures see: a fixed random subset, in training batches."""
    data = task.train
    pick = torch.randperm(len(data), generator=derived_generator(seed, "importance"))
    pick = pick[:cfg.profile.importance_examples].to(data.y.device)
    x, y = data.x[pick], data.y[pick]
    size = cfg.train.batch_size
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def profile_network(cfg: ProfileConfig, pid: str, seed: int, epoch: int, model: torch.nn.Module,
                    task: Any, recorder: Any, train_loss: float, sink: JobSink) -> None:
    """Score, threshold and evaluate `model` for every measure and combination of the grid,
    handing each curve's rows to `sink.emit` and its points to `sink.report`; a curve whose
    rows are all in `sink.recorded` is skipped (a resumed seed measures only what is
    missing). The model is not changed (measures are pure; thresholded copies are stacked)."""
    from engram.importance import aggregate
    from engram.registry import MEASURES
    from engram.results import row_key

    grid = cfg.profile
    params = {name: p.detach() for name, p in model.named_parameters()}
    values = aggregate.replacement_values(params, model, grid.replacement,
                                          grid.replacement_scale,
                                          derived_generator(seed, epoch, "replacement"))
    thresholds = torch.tensor(grid.thresholds, dtype=torch.float64)  # round(t * n) as written
    val = task.val
    batches = _importance_batches(task, cfg, seed)
    groups = {agg: aggregate.make_groups(model, agg) for agg in grid.aggregations}
    trajectory = recorder.trajectory()
    for measure in grid.measures:
        common = {"profile_id": pid, "name": cfg.name, "seed": seed, "epoch": epoch,
                  "measure": measure, "n_classes": len(task.classes)}
        todo = []
        for agg, red, scope, direction in _combinations(grid):
            rows = [{**common, "aggregation": agg, "reducer": red, "scope": scope,
                     "direction": direction, "threshold": t} for t in grid.thresholds]
            if all(row_key(r, PROFILE_KEY) in sink.recorded for r in rows):
                sink.report(len(rows))
                continue
            todo.append((agg, red, scope, direction, rows))
        if not todo:
            continue
        fn = MEASURES.get(measure)
        importance = fn(model, batches, F.cross_entropy, trajectory=trajectory,
                        generator=derived_generator(seed, epoch, "measure", measure))
        for agg, red, scope, direction, rows in todo:
            scores = aggregate.group_scores(importance, groups[agg], red)
            order = aggregate.replacement_order(
                scores, groups[agg], scope, direction,
                derived_generator(seed, epoch, "ties", measure, agg, red, scope, direction))
            stacked, fraction = aggregate.thresholded_parameters(
                params, groups[agg], order, scope, thresholds, values)
            losses, accuracies = aggregate.evaluate_stacked(model, stacked, val.x, val.y)
            for row, f, loss, acc in zip(rows, fraction.tolist(), losses.tolist(),
                                         accuracies.tolist()):
                row.update(fraction_replaced=f, train_loss=train_loss, val_loss=loss,
                           val_accuracy=acc)
            sink.emit(rows)
            sink.report(len(rows))


# ----------------------------------------------------------------------------- the trajectory recorder

@dataclass
class _Running:
    """The recorder's running sums and the copies it compares against."""
    start: dict[str, torch.Tensor] = field(default_factory=dict)
    si_path: dict[str, torch.Tensor] = field(default_factory=dict)
    path_length: dict[str, torch.Tensor] = field(default_factory=dict)
    sign_flips: dict[str, torch.Tensor] = field(default_factory=dict)
    direction_flips: dict[str, torch.Tensor] = field(default_factory=dict)
    previous: dict[str, torch.Tensor] = field(default_factory=dict)        # theta_{t-1}
    previous_delta: dict[str, torch.Tensor] = field(default_factory=dict)  # theta_{t-1} - theta_{t-2}
    steps: int = 0


class TrajectoryRecorder(Method):
    """Records the training trajectory for the si and trajectory measures; changes nothing.

    Driven by the runner's `train_task` loop like any method:
    `after_backward` copies the gradient in .grad (g_t: the training loss's gradient, plus
    the penalty of any method composed with the recorder), `after_step` reads the new
    weights theta_t and updates, per element,

        si_path         -= g_t * (theta_t - theta_{t-1})
        path_length     += |theta_t - theta_{t-1}|
        sign_flips      += [theta_t * theta_{t-1} < 0]
        direction_flips += [(theta_t - theta_{t-1}) * (theta_{t-1} - theta_{t-2}) < 0]   (t >= 2)

    All counts are kept on copies (`detach().clone()`), never on references to the live
    tensors (HM's bug (i): its first comparison was a weight with itself).

    Recording begins at the first `before_task` (or at `reset(model)`) and then accumulates
    across later `train_task` calls, so a model trained in several chunks (profile, train on,
    profile again) is recorded as one trajectory; call `reset(model)` to start over.
    """

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self._run = _Running()
        self._grad: dict[str, torch.Tensor] = {}

    @property
    def recording(self) -> bool:
        return bool(self._run.start)

    def reset(self, model: nn.Module) -> None:
        """Start recording afresh from the model's current weights."""
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        zeros = lambda: {name: torch.zeros_like(t) for name, t in start.items()}  # noqa: E731
        self._run = _Running(start=start, si_path=zeros(), path_length=zeros(),
                             sign_flips=zeros(), direction_flips=zeros(),
                             previous={name: t.clone() for name, t in start.items()})
        self._grad = {}

    def before_task(self, ctx: Context) -> None:
        if not self.recording:
            self.reset(ctx.model)

    def after_backward(self, ctx: Context) -> None:
        self._grad = {name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for name, p in ctx.model.named_parameters()}

    @torch.no_grad()
    def after_step(self, batch: Batch, ctx: Context) -> None:
        run = self._run
        for name, p in ctx.model.named_parameters():
            now, before = p.detach().clone(), run.previous[name]
            delta = now - before  # theta_t - theta_{t-1}
            run.si_path[name] -= self._grad[name] * delta
            run.path_length[name] += delta.abs()
            run.sign_flips[name] += (now * before < 0).to(now.dtype)
            if name in run.previous_delta:
                run.direction_flips[name] += (delta * run.previous_delta[name] < 0).to(now.dtype)
            run.previous[name], run.previous_delta[name] = now, delta
        run.steps += 1

    def trajectory(self) -> Trajectory:
        """A snapshot (copies): later steps do not change it."""
        if not self.recording:
            raise ValueError("the TrajectoryRecorder has recorded nothing yet: train with it "
                             "as the method (or call reset(model) first)")
        run = self._run
        copy = lambda d: {name: t.clone() for name, t in d.items()}  # noqa: E731
        return Trajectory(start=copy(run.start), si_path=copy(run.si_path),
                          path_length=copy(run.path_length), sign_flips=copy(run.sign_flips),
                          direction_flips=copy(run.direction_flips), steps=run.steps)

    def state_dict(self) -> dict[str, Any]:
        run = self._run
        return {"start": run.start, "si_path": run.si_path, "path_length": run.path_length,
                "sign_flips": run.sign_flips, "direction_flips": run.direction_flips,
                "previous": run.previous, "previous_delta": run.previous_delta, "steps": run.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run = _Running(**{key: dict(value) if isinstance(value, dict) else value
                                for key, value in state.items()})
