"""Loss of plasticity: long non-stationary problems, learned online, with diagnostics.

A network trained on a long, changing stream can slowly lose the ability to learn (Dohare et
al., Nature 2024). `engram plasticity CONFIG.yaml` trains each method on such a stream, one
example per step, and records as rows of `OUT/results.csv`:

- `online_loss` / `online_accuracy` per task: the mean over the task's examples of the loss
  (or correctness) on each example *before* the step that trains on it, the online error of
  the paper, one value per task (a bin); only the stream's examples count, not the memory
  examples replay trains on alongside them;
- the plasticity diagnostics of `engram.metrics.plasticity` (dead and dormant units,
  effective and stable rank, weight and gradient magnitude per layer) on a probe batch of
  the next task, measured at each task's start, before training on it, as LoP does.

The problems (each a generator of tasks; same seed, same tasks):

- `bit_flipping`: the slowly-changing regression of Dohare et al. (formerly "bit-flipping").
  Inputs are `n_inputs` bits: `n_flipping` of them are constant within a task and all redrawn
  at each task change (LoP's default generator; `flip_one: true` flips a single one, the
  paper's text), the rest are fresh random bits every example. The target is a fixed random
  network, n_inputs -> `target_hidden` linear threshold units -> 1, weights and biases
  uniform in {-1, +1}, unit i firing when its input exceeds beta * (n_inputs + 1) - S_i with
  S_i = (n_inputs - sum_j w_ij + b_i) / 2 (LoP's fix_ltu_net.py). A task is `flip_every`
  examples; squared-error loss.
- `permuted_digits`: online permuted digits (the paper's online permuted MNIST on the
  bundled digits, or MNIST with data.source: mnist): each task a fresh pixel permutation of
  the whole training set, examples in a new random order, each seen once.
- `class_stream`: a long class-incremental stream: the classes in a random order per seed,
  cut into groups of `classes_per_task`, each task the examples of one group (one shared
  10-way head, labels are the classes), the groups cycling for `n_tasks` tasks.

The training loop is the runner's own `train_task` (one epoch of batch size 1 per task); it
makes a fresh optimizer at each task, which for plain SGD, the problems' default, is the same
as one optimizer for the whole stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from engram.config import DataConfig, MethodSpec, ModelConfig, TrainConfig, parse_methods, check_device, check_name, check_seeds, params_dict
from engram.schema import opt, parse_dataclass, read_config_tree
from engram.data.streams import Stream, Task
from engram.errors import ConfigError, DivergenceError
from engram.data.problems import PROBLEMS, Problem, ProblemConfig

PLASTICITY_COLUMNS = ["run_id", "name", "seed", "method", "label", "problem", "task", "step",
                      "metric", "value"]
PLASTICITY_KEY = ("run_id", "task", "metric")


@dataclass
class PlasticityConfig:
    name: str = opt("plasticity", "a name for this experiment", check=check_name)
    seeds: list[int] = opt([0, 1, 2, 3, 4], "random seeds: target network, inputs, init, order",
                           check=check_seeds)
    threads: int = opt(1, "CPU threads for torch (0: torch's default)", low=0)
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N",
                      check=check_device)
    data: DataConfig = field(default_factory=DataConfig,
                             metadata={"doc": "permuted_digits: where the images come from"})
    problem: ProblemConfig = field(default_factory=ProblemConfig,
                                   metadata={"doc": "the non-stationary problem"})
    model: ModelConfig = field(default_factory=lambda: ModelConfig(hidden=[5]),
                               metadata={"doc": "the learner"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1, batch_size=1, optimizer="sgd", lr=0.01), metadata={"doc": "its optimiser"})
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("naive", None)],
                                      metadata={"doc": "methods, as in `engram run`"})

    def __post_init__(self) -> None:
        if self.train.epochs != 1:
            raise ConfigError("train.epochs: plasticity problems are learned online, each "
                              "example once; leave train.epochs at 1")
        if self.problem.kind == "bit_flipping" and \
                self.problem.n_flipping >= self.problem.n_inputs:
            raise ConfigError("problem.n_flipping must be below problem.n_inputs (the other "
                              "bits are redrawn every example)")
        from engram.config import parse_method
        self.methods = [m if m.params is not None else parse_method(m.name, {}, "methods[0]")
                        for m in self.methods]


def load_plasticity_config(path: str | Path, overrides: list[str] = ()) -> PlasticityConfig:
    """Read a plasticity YAML (safe loader), apply dotted overrides, validate everything."""
    raw = read_config_tree(path, overrides)
    methods = raw.pop("methods", None)
    cfg = parse_dataclass(PlasticityConfig, raw)
    if methods is not None:
        cfg.methods = parse_methods(methods)
    return cfg


def problem_tasks(cfg: PlasticityConfig, seed: int) -> Problem:
    """The configured problem for one seed."""
    return PROBLEMS.get(cfg.problem.kind)(cfg.problem, cfg.data, seed)


def check_methods_usable(cfg: PlasticityConfig) -> None:
    """ConfigError for the first configured method that cannot act on the problem (e.g. LwF's
    softmax over bit flipping's single output), before anything is trained or written."""
    from engram.methods.base import ProblemInfo, refuse_unusable

    problem = problem_tasks(cfg, 0)  # its tasks are generated lazily: nothing is drawn yet
    info = ProblemInfo(cfg.problem.kind, problem.outputs, classification=not problem.regression)
    for spec in cfg.methods:
        refuse_unusable(spec, info)


def _regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.squeeze(-1), targets)


# ----------------------------------------------------------------------------- running

def plasticity_run_id(cfg: PlasticityConfig, method: MethodSpec, seed: int) -> str:
    canonical = {"data": dataclasses.asdict(cfg.data), "problem": dataclasses.asdict(cfg.problem),
                 "model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train),
                 "method": {"name": method.name, **params_dict(method.params)}, "seed": seed}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class PlasticityReport:
    runs_done: int
    runs_skipped: int
    seconds: float


def run_plasticity(cfg: PlasticityConfig, out: str | Path, *, show_progress: bool = True,
                   workers: int = 1) -> PlasticityReport:
    """Run every method x seed of `cfg` into `out/results.csv`; finished runs are skipped,
    an unfinished one is rerun (its rows are re-measured identically and not duplicated).

    With workers > 1, runs go to that many spawned processes; each returns its rows when it
    finishes and this process writes them, so a killed parallel run loses the runs in flight
    (a rerun redoes them), where a single process writes every task's rows as measured.

    The folder is locked for the whole call and must hold this experiment, or one this
    extends by seeds (engram.experiments.outdir); worker processes never write it."""
    from engram.experiments.outdir import OutputFolder
    from engram.experiments.continual import resolve_device

    check_methods_usable(cfg)  # a method that cannot act is refused before any run starts
    device = resolve_device(cfg.device)
    dump = plasticity_config_dict(cfg)
    with OutputFolder(out, "plasticity") as folder:
        folder.claim({k: v for k, v in dump.items() if k not in ("threads", "device")},
                     ("seeds",), str(device))
        return _run_plasticity_in(cfg, dump, folder.path, device, show_progress, workers)


def plasticity_config_dict(cfg: PlasticityConfig) -> dict[str, Any]:
    """The plain-dict form of a config (what `config.yaml` in the folder holds)."""
    dump = dataclasses.asdict(cfg)
    dump["methods"] = [{"name": m.name, **params_dict(m.params)} for m in cfg.methods]
    return dump


def _run_plasticity_in(cfg: PlasticityConfig, dump: dict, out: Path, device: torch.device,
                       show_progress: bool, workers: int) -> PlasticityReport:
    import yaml

    from engram.results import ResultWriter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    (out / "config.yaml").write_text(yaml.safe_dump(dump, sort_keys=False))
    started = time.perf_counter()
    done = skipped = 0
    progress = None
    if show_progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=len(cfg.seeds) * len(cfg.methods) * cfg.problem.n_tasks,
                        unit="task", dynamic_ncols=True, disable=None)
    try:
        with ResultWriter(out / "results.csv", PLASTICITY_COLUMNS, PLASTICITY_KEY) as writer:
            todo = []
            for seed in cfg.seeds:
                for spec in cfg.methods:
                    run_id = plasticity_run_id(cfg, spec, seed)
                    if (run_id, "", "run_complete") in writer.keys:
                        skipped += 1
                        if progress is not None:
                            progress.update(cfg.problem.n_tasks)
                    else:
                        todo.append((spec, seed, run_id))
            if workers <= 1 or len(todo) <= 1:
                for spec, seed, run_id in todo:
                    _run_one(cfg, spec, seed, run_id, device, writer, progress)
                    done += 1
            else:
                from engram.experiments.pool import run_in_processes

                jobs = [(cfg, spec, seed, run_id, str(device)) for spec, seed, run_id in todo]
                update = progress.update if progress is not None else None
                for _, rows in run_in_processes(_run_in_worker, jobs, workers, update):
                    writer.write(rows)
                    done += 1
    finally:
        if progress is not None:
            progress.close()
    return PlasticityReport(done, skipped, time.perf_counter() - started)


class _RowCollector:
    """A writer stand-in for worker processes: keeps the rows to hand back."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def write(self, rows: list[dict[str, Any]]) -> int:
        self.rows.extend(rows)
        return len(rows)


class _Reporter:
    """A progress bar stand-in for worker processes: passes each update to `report`."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self.update = report


def _run_in_worker(cfg: PlasticityConfig, spec: MethodSpec, seed: int, run_id: str,
                   device: str, report: Callable[[int], None] | None) -> list[dict[str, Any]]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    collector = _RowCollector()
    _run_one(cfg, spec, seed, run_id, torch.device(device), collector,
             None if report is None else _Reporter(report))
    return collector.rows


def _run_one(cfg: PlasticityConfig, spec: MethodSpec, seed: int, run_id: str,
             device: torch.device, writer: Any, progress: Any) -> None:
    from engram.registry import METHODS
    from engram.methods.base import Context
    from engram.metrics.plasticity import plasticity_diagnostics
    from engram.models import build_model
    from engram.training import train_task

    tasks, input_shape, outputs, regression = problem_tasks(cfg, seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, input_shape, 1, outputs).to(device)
    method = METHODS.get(spec.name)(spec.params)
    stream = Stream([], "domain", 1, outputs, input_shape, [])
    ctx = Context(model=model, stream=stream, train_cfg=cfg.train, device=device,
                  generator=torch.Generator().manual_seed(seed + 1_000_003),
                  loss_fn=_regression_loss if regression else F.cross_entropy,
                  count_correct=not regression)
    ctx.model = model = method.prepare_model(model, ctx).to(device)
    common = {"run_id": run_id, "name": cfg.name, "seed": seed, "method": spec.name,
              "label": spec.label(), "problem": cfg.problem.kind}
    for task in tasks:
        task = Task(task.index, task.name, task.classes, task.train.to(device), None,
                    task.test.to(device))
        stream.tasks.append(task)
        ctx.task = task
        ctx.seen_tasks.append(task)
        # diagnostics of the network as it meets the new task, before training on it
        probe = task.train.x[:cfg.problem.probe_size]
        rows = [{**common, "task": task.index + 1, "step": ctx.step, "metric": key, "value": v}
                for key, v in plasticity_diagnostics(model, probe).items()]
        losses: list[float] = []
        try:
            train_task(ctx, method, lambda epoch, loss: losses.append(loss))
        except DivergenceError as error:  # which of the runs diverged (the message has the task)
            raise DivergenceError(f"{spec.label()} seed {seed}: {error}") from None
        rows.append({**common, "task": task.index + 1, "step": ctx.step,
                     "metric": "online_loss", "value": losses[-1]})
        if ctx.epoch_accuracy is not None:
            rows.append({**common, "task": task.index + 1, "step": ctx.step,
                         "metric": "online_accuracy", "value": ctx.epoch_accuracy})
        writer.write(rows)
        if progress is not None:
            progress.update(1)
    writer.write([{**common, "task": "", "step": ctx.step, "metric": "run_complete", "value": 1}])


# ----------------------------------------------------------------------------- plots

PLOTTED = (("online_loss", "online loss per task (squared error; cross-entropy for classes)"),
           ("online_accuracy", "online accuracy per task"),
           ("dead_units", "fraction of dead units"),
           ("effective_rank", "effective rank of hidden features (mean over layers)"),
           ("weight_magnitude", "mean |w|"))


def _per_seed(rows: list[dict[str, str]], metric: str) -> dict[str, dict[int, dict[int, float]]]:
    """label -> seed -> task -> value of `metric`, labels in first-seen order. A label with
    two runs on one seed (two configs' runs in one folder, which the label does not tell
    apart) raises DataError (:func:`engram.summary.count_seeds`) instead of counting it twice."""
    from engram.reports.tables import count_seeds

    per_label: dict[str, dict[int, dict[int, float]]] = {}
    runs: dict[str, dict[str, str]] = {}  # label -> run id -> seed
    for r in rows:
        if r["metric"] != metric or not r["task"]:
            continue
        per_label.setdefault(r["label"], {}).setdefault(int(r["seed"]), {})[int(r["task"])] = \
            float(r["value"])
        runs.setdefault(r["label"], {})[r["run_id"]] = r["seed"]
    for label, by_run in runs.items():
        count_seeds(by_run.items(), f"method {label!r}")
    return per_label


def metric_curves(rows: list[dict[str, str]], metric: str, bin_tasks: int = 1
                  ) -> dict[str, tuple]:
    """label -> (tasks (T,), mean over seeds (T,), standard error (T,), n seeds), for one
    metric (:func:`engram.stats.mean_se`: SE nan with one seed); only tasks every seed of
    the label has reached. With bin_tasks > 1 each seed's values are first averaged over
    bins of that many tasks (x = the bin's last task), as the paper bins the online error,
    and the mean and SE are taken over the seeds' bin values."""
    import numpy as np

    from engram.stats import mean_se

    curves = {}
    for label, by_seed in _per_seed(rows, metric).items():
        tasks = sorted(set.intersection(*(set(v) for v in by_seed.values())))
        values = np.array([[by_seed[s][t] for t in tasks] for s in sorted(by_seed)])  # (S, T)
        if bin_tasks > 1 and len(tasks) >= bin_tasks:
            n_bins = len(tasks) // bin_tasks
            values = values[:, :n_bins * bin_tasks].reshape(len(values), n_bins, bin_tasks)
            values = values.mean(-1)  # (S, bins)
            tasks = tasks[bin_tasks - 1:n_bins * bin_tasks:bin_tasks]
        mean, se = mean_se(values)
        curves[label] = (np.array(tasks), mean, se, len(values))
    return curves


def write_plasticity_plots(rows: list[dict[str, str]], out_dir: str | Path,
                           bin_tasks: int | None = None) -> Path:
    """One figure, `out_dir/plasticity.png`: a panel per recorded metric of `PLOTTED` against
    the task number, a line per method with a ±1 SE band over seeds; the online error and
    accuracy in bins of `bin_tasks` tasks (default: a twentieth of the tasks)."""
    from engram.reports.figures import new_figure, save_figure

    present = [(m, title) for m, title in PLOTTED if any(r["metric"] == m for r in rows)]
    n_tasks = max((int(r["task"]) for r in rows if r["task"]), default=1)
    bin_tasks = bin_tasks or max(1, n_tasks // 20)
    fig = new_figure(7.0, 2.6 * len(present))
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (metric, title) in zip(axes, present):
        binned = bin_tasks if metric.startswith("online") else 1
        for label, (tasks, mean, se, n) in metric_curves(rows, metric, binned).items():
            line, = ax.plot(tasks, mean, label=f"{label} ({n} seeds)", linewidth=1.2)
            ax.fill_between(tasks, mean - se, mean + se, color=line.get_color(), alpha=0.25,
                            linewidth=0)
        ax.set_title(title + (f", bins of {binned} tasks" if binned > 1 else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    axes[-1].set_xlabel("task (diagnostics at its start; online error over it)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out / "plasticity.png")


# ----------------------------------------------------------------------------- summary

SUMMARISED = ("online_loss", "online_accuracy", "dead_units", "effective_rank",
              "weight_magnitude")


def plasticity_summary(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per method label and metric of `SUMMARISED`: mean ± standard error over seeds
    (:func:`engram.stats.mean_se`) of each seed's mean over the early tasks (2 to 1 + T/5:
    the first, from-scratch task left out) and over the late tasks (the last T/5). One
    entry per (label, metric); n_seeds counts distinct seeds, and two runs of one label on
    one seed raise DataError (see :func:`_per_seed`). A seed with no task in a window gives
    that window nan."""
    from engram.stats import mean_se

    n_tasks = max((int(r["task"]) for r in rows if r["task"]), default=0)
    fifth = max(1, n_tasks // 5)
    windows = {"early": (2, 1 + fifth), "late": (n_tasks - fifth + 1, n_tasks)}
    table = []
    for metric in SUMMARISED:
        for label, per_seed in _per_seed(rows, metric).items():
            entry: dict[str, Any] = {"label": label, "metric": metric}
            for name, (lo, hi) in windows.items():
                means = []  # one per seed: its mean over the window's tasks
                for by_task in per_seed.values():
                    inside = [v for t, v in by_task.items() if lo <= t <= hi]
                    means.append(sum(inside) / len(inside) if inside else math.nan)
                entry[name] = mean_se(means)
                entry[f"{name}_tasks"] = (lo, hi)
            entry["n_seeds"] = len(per_seed)
            table.append(entry)
    return table


def format_plasticity_summary(table: list[dict[str, Any]]) -> str:
    """The summary as aligned text: one block per metric, a line per method, each window
    "mean ± SE [95% t-interval]" over the seeds (a mean alone with one seed)."""
    from engram.reports.tables import format_stat

    lines = []
    for metric in dict.fromkeys(e["metric"] for e in table):
        block = [e for e in table if e["metric"] == metric]
        (lo1, hi1), (lo2, hi2) = block[0]["early_tasks"], block[0]["late_tasks"]
        lines.append(f"{metric} (mean ± SE over seeds [95% t-interval]): "
                     f"tasks {lo1}-{hi1} -> tasks {lo2}-{hi2}")
        width = max(len(e["label"]) for e in block)
        cells = [[format_stat(*e[w], n=e["n_seeds"]) for w in ("early", "late")] for e in block]
        early = max(len(c[0]) for c in cells)
        for e, (a, b) in zip(block, cells):
            n = e["n_seeds"]
            lines.append(f"  {e['label']:<{width}}  {a:<{early}}  ->  {b}"
                         f"  ({n} seed{'s' if n != 1 else ''})")
        lines.append("")
    return "\n".join(lines)
