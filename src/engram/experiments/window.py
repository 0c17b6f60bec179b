"""The sliding-window memorisation experiment (`engram window`): watching forgetting.

A network memorises `n_points` random points (x ~ N(0, 1) of width `x_dim`, y ~ N(0, 1) of
width `y_dim`, drawn independently) but is only ever trained on a contiguous window of
`window` of them. Each step is one full-batch step on the window's mean loss, the loss of a
point being the squared norm ||N(x) - y||^2. Whenever the window's mean loss is below
`threshold` the window moves forward by `shift` points, wrapping around the end.

The network (engram.models.residual.ResidualNet) is `depth` residual blocks
h <- h + act(W h + b) of width `width` (= `x_dim`) followed by a dense layer `width` ->
`y_dim`; by default every weight and bias starts at zero.

The step is the runner's (engram.training.apply_update), so any registered method can ride
along: `method: {name: continual_backprop}` resets units, `replay` mixes remembered points
into the window's batch, `shrink_perturb` / `l2_init` act every step. The whole run is one
task to the method, so methods that act only at task boundaries (EWC, LwF, ...) do nothing
here. The stream a method sees (its after_step batch) is each point once, at the first step
whose window holds it, in that order; other steps offer nothing. So replay's memory is a
reservoir sample of the distinct points trained on so far: min(memory, points seen) distinct
points, each of them equally likely to be held; once every point has been in the window it
no longer changes. L2 is `weight_decay`, dropout `dropout` (on each block's output before the skip sum;
the window check and the recorded losses are in eval mode, without dropout).

What is recorded (`WindowRecord`): after 0, k, 2k, ... steps (k = `record_every`) and after
the last step, every
point's loss (one forward of all points), the window's start and the norm of all weights and
biases; per shift the step it happened and how many steps the window was trained on before
it (`relearn_steps`).

Step semantics: at step s (s = 0 .. max_steps - 1; s updates done so far) the current
window's mean loss L is computed (eval mode, no gradient); if L < threshold the window shifts
(shift step s, at most one shift per step) and the step trains on the new window; then one
optimizer update. Row t of the record holds the state after t updates: `point_loss[t]` are
the losses the step-t check sees and `window_start[t]` the window it checks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Literal

import numpy as np
import torch

from engram.config import SEED_MAX, MethodSpec, TrainConfig, check_name, check_seeds, train_identity
from engram.optimizers import check_optimization, lower_name
from engram.schema import check_range, opt, short_repr
from engram.data.streams import TensorSet
from engram.errors import ConfigError, DataError, DivergenceError
from engram.experiments.harness import Job, JobSink, Plan, Report, run_id, run_plan
from engram.models.residual import ACTIVATION_MODULES, ResidualNet
from engram.results import WINDOW_COLUMNS, WINDOW_KEY, ResultWriter  # the table's columns

if TYPE_CHECKING:
    from engram.methods.base import ProblemInfo


@dataclass
class WindowConfig:
    n_points: int = opt(500, "points memorised", low=1)
    x_dim: int = opt(40, "input width (x ~ N(0, 1))", low=1)
    y_dim: int = opt(20, "target width (y ~ N(0, 1))", low=1)
    depth: int = opt(5, "residual blocks h <- h + act(W h + b)", low=0)
    width: int = opt(40, "width of the residual blocks (must equal x_dim)", low=1)
    activation: Literal["atan", "tanh", "relu"] = opt("atan", "activation in the blocks")
    init: Literal["zeros", "default"] = opt(
        "zeros", "zeros: every weight and bias 0; default: torch's Linear init")
    dropout: float = opt(0.0, "dropout on each block's output before the skip sum (0: none)",
                         low=0.0, high=0.95)
    window: int = opt(50, "points in the training window", low=1)
    threshold: float = opt(1.0, "the window shifts when its mean loss is below this "
                                 "(a point's loss starts near y_dim)", low=0.0)
    shift: int = opt(1, "points the window moves per shift (wrapping around)", low=1)
    optimizer: str = opt(
        "adam", "any optimizer class of torch.optim, any case (with sgd the net ends up "
        "memorising all points and relearning gets faster; with adam relearning gets slower)")
    lr: float = opt(0.001, "learning rate", low=0.0)
    weight_decay: float = opt(0.0, "L2 penalty: the optimizer's weight decay", low=0.0)
    optimizer_args: dict[str, Any] = opt({}, "more keyword arguments of the optimizer class, "
                                         "e.g. {betas: [0.9, 0.99]}, or for sgd {momentum: 0.9}")
    scheduler: str | None = opt(None, "an LR scheduler class of torch.optim.lr_scheduler, "
                                "stepped after every optimizer step (null: none)")
    scheduler_args: dict[str, Any] = opt({}, "keyword arguments of the scheduler, e.g. "
                                         "{T_max: 60000}")
    max_steps: int = opt(60000, "optimizer steps", low=0)
    record_every: int = opt(20, "record every point's loss every this many steps", low=1)
    seed: int = opt(0, "seed of the data, the init and dropout (in an experiment: set by "
                       "`seeds`, not here)", low=0, high=SEED_MAX)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_range(getattr(self, f.name), f.metadata, f.name)
        if self.width != self.x_dim:
            raise ConfigError(f"width: the residual blocks keep the input's width, so width "
                              f"must equal x_dim ({self.x_dim}); got {self.width}")
        if self.window > self.n_points:
            raise ConfigError(f"window: {self.window} is more than n_points ({self.n_points})")
        if self.activation not in ACTIVATION_MODULES:
            raise ConfigError(f"activation: unknown {self.activation!r}; choose one of: "
                              + ", ".join(ACTIVATION_MODULES))
        if self.init not in ("zeros", "default"):
            raise ConfigError(f"init: unknown {self.init!r}; choose zeros or default")
        self.optimizer, self.scheduler = lower_name(self.optimizer), lower_name(self.scheduler)
        check_optimization(self, "")

    def network(self) -> ResidualNet:
        """The network, initialised from torch's global generator (seeded by run_window)."""
        return ResidualNet(self.width, self.y_dim, self.depth, self.activation, self.init,
                           self.dropout)


def window_problem(cfg: WindowConfig) -> ProblemInfo:
    """The problem as methods see it (`Method.unusable_reason`): a regression, y_dim outputs."""
    from engram.methods.base import ProblemInfo

    return ProblemInfo("window", cfg.y_dim, classification=False)


def window_data(cfg: WindowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The points: x (n_points, x_dim) then y (n_points, y_dim), from Generator(seed)."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n_points, cfg.x_dim, generator=g)
    y = torch.randn(cfg.n_points, cfg.y_dim, generator=g)
    return x, y


def squared_norm_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over points of ||N(x) - y||^2: outputs, targets (B, y_dim) -> scalar."""
    return (outputs - targets).pow(2).sum(1).mean()


def weight_norm(model: torch.nn.Module) -> float:
    """The Euclidean norm of all weights and biases together."""
    with torch.no_grad():
        return math.sqrt(sum(float(p.pow(2).sum()) for p in model.parameters()))


def window_indices(start: int, window: int, n_points: int) -> torch.Tensor:
    """The window's point indices, wrapping around the end."""
    return (torch.arange(window) + start) % n_points


TIDY_COLUMNS = ["variant", "seed", "step", "metric", "value"]


@dataclass
class WindowRecord:
    steps: np.ndarray  # (S,) int64: updates done at each recorded row
    point_loss: np.ndarray  # (S, n_points) float32
    window_start: np.ndarray  # (S,) int64: the window the next step checks
    weight_norm: np.ndarray  # (S,) float64: norm of all weights and biases
    shift_steps: list[int] = field(default_factory=list)
    relearn_steps: list[int] = field(default_factory=list)
    window: int = 0
    seed: int = 0
    seconds: float = 0.0

    def window_mean_loss(self) -> np.ndarray:
        """Mean loss of the window at each recorded row, shape (S,)."""
        n = self.point_loss.shape[1]
        idx = (self.window_start[:, None] + np.arange(self.window)[None, :]) % n
        return np.take_along_axis(self.point_loss, idx, axis=1).mean(1)

    def save_npz(self, path: str | Path) -> None:
        """Compressed arrays, no pickle, written atomically (a killed process leaves no half
        file); the point losses as float16 (3 significant digits, half the size: 3 MB for
        the default run), clipped to float16's largest value 65504."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        loss = np.clip(self.point_loss, None, np.finfo(np.float16).max).astype(np.float16)
        try:
            self._write(tmp, loss)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _write(self, path: Path, loss: np.ndarray) -> None:
        np.savez_compressed(
            path, steps=self.steps, point_loss=loss,
            window_start=self.window_start,
            weight_norm=self.weight_norm, shift_steps=np.asarray(self.shift_steps, np.int64),
            relearn_steps=np.asarray(self.relearn_steps, np.int64),
            window=np.int64(self.window), seed=np.int64(self.seed),
            seconds=np.float64(self.seconds))

    @classmethod
    def load_npz(cls, path: str | Path) -> WindowRecord:
        """A record saved by save_npz; DataError naming the file when it is unreadable or its
        arrays are not those save_npz writes (shapes (S,), (S, n), ..., scalars)."""
        import zipfile

        try:
            with np.load(path, allow_pickle=False) as z:
                record = cls(steps=z["steps"], point_loss=z["point_loss"].astype(np.float32),
                             window_start=z["window_start"], weight_norm=z["weight_norm"],
                             shift_steps=[int(s) for s in z["shift_steps"]],
                             relearn_steps=[int(s) for s in z["relearn_steps"]],
                             window=int(z["window"]), seed=int(z["seed"]),
                             seconds=float(z["seconds"]))
            rows = len(record.steps)
            if record.steps.ndim != 1 or record.point_loss.ndim != 2 or \
                    record.point_loss.shape[0] != rows or record.window_start.shape != (rows,) \
                    or record.weight_norm.shape != (rows,) or \
                    len(record.shift_steps) != len(record.relearn_steps):
                raise ValueError("its arrays do not have the shapes of a window record")
        except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as err:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise DataError(f"{path} is not a readable window record ({reason}); delete it "
                            "to rerun that run") from None
        return record

    def tidy_rows(self, variant: str) -> list[dict]:
        """Rows variant, seed, step, metric, value: relearn_steps (one per shift, at the
        shift's step), weight_norm and window_mean_loss (every recorded row)."""
        rows = [{"variant": variant, "seed": self.seed, "step": int(s),
                 "metric": "relearn_steps", "value": float(r)}
                for s, r in zip(self.shift_steps, self.relearn_steps)]
        for metric, values in (("weight_norm", self.weight_norm),
                               ("window_mean_loss", self.window_mean_loss())):
            rows += [{"variant": variant, "seed": self.seed, "step": int(s),
                      "metric": metric, "value": float(v)}
                     for s, v in zip(self.steps, values)]
        return rows


def run_window(cfg: WindowConfig, method: MethodSpec | None = None,
               on_steps: Callable[[int], None] | None = None) -> WindowRecord:
    """Train on the sliding window for cfg.max_steps steps (see the module doc), with the
    registered `method` (default: none). `on_steps(n)` is told every 1,000 steps done."""
    from engram.data.streams import Stream, Task
    from engram.registry import METHODS
    from engram.methods.base import Context, refuse_unusable, refuse_unusable_model
    from engram.optimizers import build_scheduler
    from engram.training import apply_update, make_optimizer

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)  # init: default, dropout masks
    x, y = window_data(cfg)
    points = TensorSet(x, y, torch.zeros(cfg.n_points, dtype=torch.long))
    task = Task(0, "window", [], points, None, points)
    # The optimizer settings as the runner's TrainConfig: a method that draws extra examples
    # (replay's replay_batch_size: null) draws a window's worth.
    train_cfg = TrainConfig(epochs=1, batch_size=cfg.window, optimizer=cfg.optimizer,
                            lr=cfg.lr, weight_decay=cfg.weight_decay,
                            optimizer_args=cfg.optimizer_args, scheduler=cfg.scheduler,
                            scheduler_args=cfg.scheduler_args, scheduler_step="step")
    spec = method or MethodSpec("naive", None)
    refuse_unusable(spec, window_problem(cfg))
    learner = METHODS.get(spec.name)(spec.params)
    model = cfg.network()
    refuse_unusable_model(spec, model)  # e.g. multihead: the residual net has no body
    ctx = Context(model=model, stream=Stream([task], "domain", 1, cfg.y_dim, (cfg.x_dim,), []),
                  train_cfg=train_cfg, generator=torch.Generator().manual_seed(cfg.seed + 1),
                  device=torch.device("cpu"), task=task, loss_fn=squared_norm_loss)
    ctx.model = model = learner.prepare_model(model, ctx)
    ctx.seen_tasks.append(task)
    model.train()
    learner.before_task(ctx)
    optimizer = make_optimizer(model, train_cfg, foreach=True)  # 12 small tensors
    scheduler = build_scheduler(optimizer, train_cfg)  # None without cfg.scheduler

    # rows at 0, k, 2k, ... and always the final step
    n_rows = cfg.max_steps // cfg.record_every + 1 + (cfg.max_steps % cfg.record_every > 0)
    steps = np.zeros(n_rows, np.int64)
    point_loss = np.zeros((n_rows, cfg.n_points), np.float32)
    window_start = np.zeros(n_rows, np.int64)
    norms = np.zeros(n_rows, np.float64)
    shift_steps: list[int] = []
    relearn_steps: list[int] = []
    start, last_shift, row = 0, 0, 0
    has_dropout = cfg.dropout > 0

    def window_loss(batch: TensorSet) -> float:
        """The check: the window's mean loss at the current weights, without dropout."""
        if has_dropout:
            model.eval()
        with torch.no_grad():
            value = squared_norm_loss(model(batch.x), batch.y).item()
        if has_dropout:
            model.train()
        return value

    def record(t: int) -> None:
        nonlocal row
        model.eval()
        with torch.no_grad():
            point_loss[row] = (model(x) - y).pow(2).sum(1).numpy()  # (n_points,)
        model.train()
        norms[row] = weight_norm(model)
        steps[row], window_start[row] = t, start
        row += 1

    offered = torch.zeros(cfg.n_points, dtype=torch.bool)  # points the method has been given
    no_points = TensorSet(*(part[:0] for part in points))

    def first_time(start: int) -> TensorSet:
        """The points of the window at `start` not offered to the method before (see the
        module doc): a memory then stores each point at most once."""
        idx = window_indices(start, cfg.window, cfg.n_points)
        idx = idx[~offered[idx]]
        offered[idx] = True
        return TensorSet(*(part[idx] for part in points))

    record(0)
    window_batch = points_at(points, start, cfg)
    window_is_new = True
    for s in range(cfg.max_steps):
        value = window_loss(window_batch)
        if not math.isfinite(value):
            raise DivergenceError(f"window run diverged at step {s} (window loss {value}); "
                                  f"lower lr (now {cfg.lr})")
        if value < cfg.threshold:
            shift_steps.append(s)
            relearn_steps.append(s - last_shift)
            last_shift = s
            start = (start + cfg.shift) % cfg.n_points
            window_batch = points_at(points, start, cfg)
            window_is_new = True
        new_points = first_time(start) if window_is_new else no_points
        window_is_new = False
        batch = learner.make_batch(window_batch, ctx)  # replay adds remembered points
        loss = squared_norm_loss(model(batch.x, batch.task), batch.y)
        apply_update(ctx, learner, optimizer, loss, batch, new_points)
        if scheduler is not None:
            scheduler.step()
        if (s + 1) % cfg.record_every == 0 or s + 1 == cfg.max_steps:
            record(s + 1)
        if on_steps is not None and (s + 1) % 1000 == 0:
            on_steps(1000)
    if on_steps is not None:
        on_steps(cfg.max_steps % 1000)
    return WindowRecord(steps=steps[:row], point_loss=point_loss[:row],
                        window_start=window_start[:row], weight_norm=norms[:row],
                        shift_steps=shift_steps, relearn_steps=relearn_steps,
                        window=cfg.window, seed=cfg.seed, seconds=time.perf_counter() - t0)


def points_at(points: TensorSet, start: int, cfg: WindowConfig) -> TensorSet:
    """The window's `cfg.window` points starting at `start` (wrapping around)."""
    idx = window_indices(start, cfg.window, cfg.n_points)
    return TensorSet(*(part[idx] for part in points))


# ----------------------------------------------------------------------------- experiments

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass
class WindowVariant:
    """One line of the comparison: the run settings after this variant's overrides, and the
    registered method that trains along."""
    name: str
    config: WindowConfig
    method: MethodSpec

    def label(self) -> str:
        return self.name


@dataclass
class WindowExperiment:
    name: str = opt("window", "a name for this experiment (default folder runs/<name>)",
                    check=check_name)
    seeds: list[int] = opt([0], "seeds: every variant runs once per seed (data, init, dropout)",
                           check=check_seeds)
    threads: int = opt(1, "CPU threads for torch per run (0: torch's default); one thread "
                          "is fastest for this small network", low=0)
    animation: Literal["gif", "mp4", "none"] = opt(
        "gif", "the movie's format: gif (pillow), mp4 (needs ffmpeg), none")
    animate: list[str] = opt([], "variants to animate (first seed); empty: the first variant")
    frames: int = opt(240, "frames in the animation (evenly spaced recorded rows)", low=2)
    fps: int = opt(20, "frames per second of the animation", low=1)
    run: WindowConfig = field(default_factory=WindowConfig,
                              metadata={"doc": "the run settings every variant starts from"})
    variants: list[WindowVariant] = field(default_factory=list, metadata={
        "doc": "list of {name: NAME, method: {name: METHOD, ...}, KEY: VALUE ...}: each "
               "changes run settings (e.g. weight_decay, dropout) and/or adds a registered "
               "method; default: one variant `plain`"})


def load_window_experiment(path: str | Path | None, overrides: list[str] = ()
                           ) -> WindowExperiment:
    """A window experiment from YAML (safe loader; no file: the defaults) with dotted
    overrides (`run.max_steps=5000`; with a config file also `variants.1.dropout=0.2`),
    validated."""
    from engram.schema import apply_override, read_config_tree

    if path is None:
        raw: dict = {}
        for override in overrides:
            apply_override(raw, override)
    else:
        raw = read_config_tree(path, overrides)
    return parse_window_experiment(raw)


def parse_window_experiment(raw: dict) -> WindowExperiment:
    from engram.config import named_entry, parse_method
    from engram.schema import parse_dataclass

    raw = dict(raw)
    variants = raw.pop("variants", None) or [{"name": "plain"}]
    base = raw.pop("run", None) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"run: expected a mapping of run settings, got {short_repr(base)}")
    if not isinstance(variants, list):
        raise ConfigError("variants: expected a list of {name: NAME, ...} entries")
    for where, settings in [("run", base)] + [(f"variants[{i}]", v) for i, v in
                                              enumerate(variants) if isinstance(v, dict)]:
        if "seed" in settings:
            raise ConfigError(f"{where}.seed: seeds are set for the whole experiment; use "
                              "seeds: [0, 1, ...]")
    experiment = parse_dataclass(WindowExperiment, raw)  # checks seeds and name
    experiment.run = parse_dataclass(WindowConfig, base, "run")
    parsed, seen = [], set()
    for i, entry in enumerate(variants):
        where = f"variants[{i}]"
        entry = named_entry(entry, where,
                            "each variant needs a name, e.g. {name: l2, weight_decay: 0.001}")
        name = str(entry["name"])
        if not _NAME.match(name):
            raise ConfigError(f"{where}.name: {short_repr(name)} names files; use letters, "
                              "digits and _ . + - only")
        if name in seen:
            raise ConfigError(f"{where}.name: {name!r} is used twice")
        seen.add(name)
        method = named_entry(entry.get("method", "naive"), f"{where}.method",
                             "expected {name: METHOD, ...}")
        spec = parse_method(method["name"], {k: v for k, v in method.items() if k != "name"},
                            f"{where}.method")
        if spec.name == "replay" and spec.params.policy != "reservoir":
            # class_balanced needs class labels, herding fills the memory at a task's end:
            # here targets are vectors and the whole run is one task
            raise ConfigError(f"{where}.method.policy: the window's points have no classes "
                              "and no task ends; use policy: reservoir")
        settings = {**base, **{k: v for k, v in entry.items() if k not in ("name", "method")}}
        parsed.append(WindowVariant(name, parse_dataclass(WindowConfig, settings, where), spec))
    experiment.variants = parsed
    names = [v.name for v in parsed]
    for name in experiment.animate:
        if name not in names:
            raise ConfigError(f"animate: no variant named {name!r}; the variants are "
                              + ", ".join(names))
    return experiment


def window_run_id(variant: WindowVariant, seed: int) -> str:
    """A hash of the variant's name and everything that determines the run: settings,
    method, seed. Two variants with the same settings are two runs."""
    from engram.config import params_dict

    return run_id({"variant": variant.name,
                   "run": train_identity(dataclasses.replace(variant.config, seed=seed)),
                   "method": {"name": variant.method.name, **params_dict(variant.method.params)}})


def record_path(out: Path, variant: WindowVariant, seed: int) -> Path:
    """runs/<variant>-seed<seed>-<run id>.npz: a changed config never reads an old file."""
    return out / "runs" / f"{variant.name}-seed{seed}-{window_run_id(variant, seed)}.npz"


def execute_window(job: Job, sink: JobSink) -> None:
    """The harness's `execute` for one (variant, seed) run: train, save the NPZ record, then
    hand over the tidy rows with the `run_complete` row last (a run counts as finished only
    when both are there, see `window_finished`)."""
    variant: WindowVariant = job.payload
    # a DivergenceError names the step; the harness adds the variant (the job's label) and seed
    record = run_window(dataclasses.replace(variant.config, seed=job.seed), variant.method,
                        sink.report)
    path = record_path(sink.folder, variant, job.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    record.save_npz(path)
    sink.emit([{"run_id": job.run_id, **row} for row in record.tidy_rows(variant.name)]
              + [{"run_id": job.run_id, "variant": variant.name, "seed": job.seed, "step": "",
                  "metric": "run_complete", "value": 1}])


def window_finished(job: Job, writer: ResultWriter, out: Path) -> bool:
    """A run is finished when its run_complete row and its NPZ record are both there: a
    deleted record is measured again."""
    return job.run_id in writer.completed_runs and \
        record_path(out, job.payload, job.seed).is_file()


# Keys of a window experiment that change what is drawn or how fast, not its numbers.
NOT_RESULT_KEYS = ("threads", "animation", "animate", "frames", "fps")


def window_plan(experiment: WindowExperiment) -> Plan:
    """The harness plan of `engram window`: one job per variant x seed, sized in steps."""
    from engram.config import params_dict

    dump = dataclasses.asdict(experiment)
    dump["variants"] = [{"name": v.name, **_changed(v.config, experiment.run),
                         "method": {"name": v.method.name, **params_dict(v.method.params)}}
                        for v in experiment.variants]
    jobs = [Job(window_run_id(variant, seed), seed, variant.name, variant,
                size=variant.config.max_steps)
            for variant in experiment.variants for seed in experiment.seeds]
    identity = {k: v for k, v in dump.items() if k not in NOT_RESULT_KEYS}
    identity["run"] = train_identity(identity["run"])  # folders of earlier configs resume
    return Plan(command="window", identity=identity,
                growable=("seeds",), config=dump, columns=WINDOW_COLUMNS, key=WINDOW_KEY,
                jobs=jobs, execute=execute_window, device="cpu", threads=experiment.threads,
                unit="step", finished=window_finished)


@dataclass
class WindowReport(Report):
    """The harness's report and the records of the runs finished so far."""
    records: dict[str, list[WindowRecord]] = field(default_factory=dict)


def run_window_experiment(experiment: WindowExperiment, out: str | Path,
                          **run_options: Any) -> WindowReport:
    """Run every variant x seed into `out` on the harness (engram.experiments.harness):
    `runs/<variant>-seed<seed>-<run id>.npz` and the tidy rows of `results.csv`, written
    when each run finishes (its NPZ first, its `run_complete` row last). A rerun skips
    finished runs and redoes unfinished ones, whose rows are measured identically and not
    duplicated. A method that cannot act on the window is refused before any run.

    run_options: run_plan's (workers, backend, address, trackers, show_progress,
    raise_failures). With raise_failures=False a failed run (a diverging variant) is in the
    report's failures and missing from its records."""
    from engram.methods.base import refuse_unusable, refuse_unusable_model

    for variant in experiment.variants:  # a method that cannot act: refused before any run
        refuse_unusable(variant.method, window_problem(variant.config))
        with torch.random.fork_rng(devices=[]):  # the probe network's init draws nothing
            refuse_unusable_model(variant.method, variant.config.network())
    report = run_plan(window_plan(experiment), out, **run_options)
    failed = {failure["run_id"] for failure in report.failures}
    return WindowReport.extending(report, records=load_records(experiment, report.folder,
                                                               skip=failed))


def load_records(experiment: WindowExperiment, out: str | Path,
                 skip: Collection[str] = ()) -> dict[str, list[WindowRecord]]:
    """variant -> its records, one per seed in seed order, read from `out`'s NPZ files;
    runs whose id is in `skip` (failed ones) are left out, and so is a variant left with
    none. DataError naming the file when a record is unreadable."""
    records = {}
    for variant in experiment.variants:
        runs = [WindowRecord.load_npz(record_path(Path(out), variant, seed))
                for seed in experiment.seeds if window_run_id(variant, seed) not in skip]
        if runs:
            records[variant.name] = runs
    return records


def _changed(cfg: WindowConfig, base: WindowConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name)}
