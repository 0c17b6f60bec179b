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

The training loop is the runner's own `train_task` (one epoch of batch size 1 per task); by
default (train.optimizer_policy: fresh) it makes a fresh optimizer at each task, which for
plain SGD, the problems' default, is the same as one optimizer for the whole stream; with
Adam or momentum, `optimizer_policy: carry` keeps one optimizer's state across the tasks. The runs go through the one experiment harness
(engram.experiments.harness): one job per method and seed. The summary and the figure of the
results are engram.reports.plasticity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engram.config import AugmentConfig, DataConfig, MethodSpec, ModelConfig, TrainConfig, parse_methods, check_device, check_name, check_seeds, data_identity, params_dict, train_identity
from engram.schema import opt, parse_dataclass, read_config_tree
from engram.data.streams import Stream, Task
from engram.errors import ConfigError
from engram.data.problems import PROBLEMS, Problem, ProblemConfig
from engram.experiments import harness
from engram.experiments.harness import Job, JobSink, Plan, Report, resolve_device, run_plan
from engram.results import PLASTICITY_COLUMNS, PLASTICITY_KEY  # the table's columns


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
        if self.train.augment != AugmentConfig():
            raise ConfigError("train.augment: the plasticity problems are not images to crop "
                              "or flip; leave train.augment out")
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
    softmax over bit flipping's single output, or sleep on a cnn), before anything is
    trained or written."""
    from engram.methods.base import ProblemInfo, refuse_unusable, refuse_unusable_model
    from engram.models import build_model

    problem = problem_tasks(cfg, 0)  # its tasks are generated lazily: nothing is drawn yet
    info = ProblemInfo(cfg.problem.kind, problem.outputs, classification=not problem.regression)
    with torch.random.fork_rng(devices=[]):  # the probe network's init draws nothing of a run's
        model = build_model(cfg.model, problem.input_shape, 1, problem.outputs)
    for spec in cfg.methods:
        refuse_unusable(spec, info)
        refuse_unusable_model(spec, model)


def _regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.squeeze(-1), targets)


# ----------------------------------------------------------------------------- running

def plasticity_run_id(cfg: PlasticityConfig, method: MethodSpec, seed: int) -> str:
    """The run id (engram.experiments.harness.run_id) of everything that determines one run's
    numbers: data, problem, model, train, the method and its parameters, the seed (not the
    name, threads or device)."""
    return harness.run_id({
        "data": data_identity(cfg.data), "problem": dataclasses.asdict(cfg.problem),
        "model": dataclasses.asdict(cfg.model), "train": train_identity(cfg.train),
        "method": {"name": method.name, **params_dict(method.params)}, "seed": seed})


def plasticity_config_dict(cfg: PlasticityConfig) -> dict[str, Any]:
    """The plain-dict form of a config (what `config.yaml` in the folder holds)."""
    dump = dataclasses.asdict(cfg)
    dump["methods"] = [{"name": m.name, **params_dict(m.params)} for m in cfg.methods]
    return dump


@dataclass
class PlasticityPayload:
    """What a worker needs to run one job: the config and the method."""
    cfg: PlasticityConfig
    method: MethodSpec


def plasticity_plan(cfg: PlasticityConfig) -> Plan:
    """The harness plan of `engram plasticity`: one job per method x seed, each reporting
    its tasks to the progress bar."""
    device = resolve_device(cfg.device)  # a bad device stops before the folder is made
    dump = plasticity_config_dict(cfg)
    jobs = [Job(plasticity_run_id(cfg, spec, seed), seed, spec.label(),
                PlasticityPayload(cfg, spec), size=cfg.problem.n_tasks)
            for seed in cfg.seeds for spec in cfg.methods]
    identity = {k: v for k, v in dump.items() if k not in ("threads", "device")}
    identity["train"] = train_identity(identity["train"])  # folders of earlier configs resume
    identity["data"] = data_identity(identity["data"])
    return Plan(command="plasticity", identity=identity,
                growable=("seeds",), config=dump, columns=PLASTICITY_COLUMNS,
                key=PLASTICITY_KEY, jobs=jobs, execute=execute_plasticity_run,
                device=str(device), threads=cfg.threads, unit="task")


def run_plasticity(cfg: PlasticityConfig, out: str | Path, **run_options: Any) -> Report:
    """Run every method x seed of `cfg` into `out/results.csv` on the harness
    (engram.experiments.harness): the folder is locked and must hold this experiment or one
    this extends by seeds; finished runs are skipped; an unfinished one is rerun (its rows are
    re-measured identically and not duplicated); each task's rows are written as measured,
    with workers > 1 too. A method that cannot act on the problem is refused first.
    run_options: run_plan's (workers, backend, address, trackers, show_progress,
    raise_failures)."""
    check_methods_usable(cfg)  # before any run starts or the folder is made
    return run_plan(plasticity_plan(cfg), out, **run_options)


def execute_plasticity_run(job: Job, sink: JobSink) -> None:
    """The harness's `execute` for plasticity: one method, one seed, the whole stream."""
    cfg, spec = job.payload.cfg, job.payload.method
    run_one(cfg, spec, job.seed, job.run_id, resolve_device(cfg.device), sink)


def run_one(cfg: PlasticityConfig, spec: MethodSpec, seed: int, run_id: str,
            device: torch.device, sink: JobSink) -> None:
    """Learn the seed's problem online with one method, handing each task's rows to `sink`
    as soon as they are measured and reporting one progress unit per task."""
    from engram.registry import METHODS
    from engram.methods.base import Context, refuse_unusable_model
    from engram.metrics.plasticity import plasticity_diagnostics
    from engram.models import build_model
    from engram.training import train_task

    tasks, input_shape, outputs, regression = problem_tasks(cfg, seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, input_shape, 1, outputs).to(device)
    refuse_unusable_model(spec, model)
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
        # a DivergenceError names the task; the harness adds the method and seed
        train_task(ctx, method, lambda epoch, loss: losses.append(loss))
        rows.append({**common, "task": task.index + 1, "step": ctx.step,
                     "metric": "online_loss", "value": losses[-1]})
        if ctx.epoch_accuracy is not None:
            rows.append({**common, "task": task.index + 1, "step": ctx.step,
                         "metric": "online_accuracy", "value": ctx.epoch_accuracy})
        sink.emit(rows)
        sink.report(1)
    sink.emit([{**common, "task": "", "step": ctx.step, "metric": "run_complete", "value": 1}])
