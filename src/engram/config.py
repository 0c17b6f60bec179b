"""The shared parts of experiment configs (data, stream, model, train, methods) and `engram run`'s
RunConfig: typed, validated, clear errors (the machinery is engram.schema).

A config is checked completely before any training starts. Every field below has a
one-line doc (shown by `engram run --help-config`); unknown keys, wrong types,
out-of-range values and unknown registry names stop with a message that names the key
and the allowed values.

    cfg = load_config("configs/demo.yaml", overrides=["train.epochs=5", "seeds=[0,1]"])
"""

from __future__ import annotations

import copy

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engram.errors import ConfigError
from engram.optimizers import check_optimization, lower_name
from engram.registry import DATASETS, METHODS, MODELS, STREAMS
from engram.schema import opt, parse_dataclass, read_yaml_file, apply_override, short_repr

_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(value: str, key: str) -> None:
    """An experiment name becomes the folder runs/<name>: it must be one plain path
    component (letters, digits, `._-`; not `.` or `..`), so it can never point elsewhere."""
    if not _PLAIN_NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"{key}: {short_repr(value)} is not a plain name; use letters, "
                          "digits and . _ - only (it names the folder runs/<name>)")


SEED_MAX = 2**63 - 1  # torch.manual_seed takes 64-bit seeds; .npz records store them as int64


def check_seeds(value: list[int], key: str) -> None:
    """At least one seed, none repeated (it would run twice), each in [0, 2**63 - 1]."""
    if not value:
        raise ConfigError(f"{key}: give at least one seed, e.g. {key}: [0]")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: {short_repr(value)} repeats a seed; a seed would run twice")
    for seed in value:
        if not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"{key}: {short_repr(seed)} is out of range; a seed is a whole "
                              "number from 0 to 2**63 - 1")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def check_device(value: str, key: str = "device") -> None:
    """Only devices engram can train on: auto, cpu, cuda, cuda:N, mps. (torch also knows
    `meta`, `xpu`, ..., where a run would fail deep inside or record nothing real.)"""
    if not _DEVICE.fullmatch(value):
        raise ConfigError(f"{key}: {short_repr(value)} is not a device; use auto, cpu, cuda "
                          "or cuda:N (mps on Apple silicon)")


@dataclass
class DataConfig:
    source: str = opt("digits", "dataset to read (see `engram list`)", registry=DATASETS)
    path: str | None = opt(None, "folder holding the dataset files (every source but digits)")
    test_fraction: float = opt(0.2, "fraction held out for testing when the source has no test split",
                               low=0.01, high=0.9)
    val_fraction: float = opt(0.0, "fraction of the training pool held out for validation",
                              low=0.0, high=0.9)
    limit: int | None = opt(None, "use at most this many training examples (before splitting tasks)",
                            low=1)
    labels: Literal["fine", "coarse"] = opt(
        "fine", "cifar100 only: its 100 fine classes or its 20 coarse superclasses")

    def __post_init__(self) -> None:
        check_label_set(self.source, self.labels)


def check_label_set(source: str, labels: str) -> None:
    """ConfigError unless the dataset `source` offers the label set `labels`: every dataset
    has its one ("fine") set; only a reader with a `labels` keyword (cifar100) offers others."""
    if labels == "fine" or source not in DATASETS:  # an unknown source is reported by its key
        return
    import inspect

    if "labels" not in inspect.signature(DATASETS.get(source)).parameters:
        raise ConfigError(f"data.labels: {short_repr(labels)} applies only to a dataset with "
                          f"coarse labels (cifar100); {source} has one label set, leave "
                          "data.labels at fine")


@dataclass
class StreamConfig:
    kind: str = opt("split", "how the dataset becomes a sequence of tasks", registry=STREAMS)
    scenario: Literal["task", "domain", "class"] = opt(
        "class", "task-, domain- or class-incremental (van de Ven & Tolias 2019)")
    n_tasks: int = opt(5, "number of tasks (split: at most n_classes / classes_per_task)", low=1)
    classes_per_task: int = opt(2, "split only: classes in each task", low=1)
    rotation_step: float = opt(30.0, "rotated only: degrees added per task", low=-360, high=360)


@dataclass
class ModelConfig:
    kind: str = opt("mlp", "network body (see `engram list`)", registry=MODELS)
    hidden: list[int] = opt([256, 256], "mlp: hidden layer widths", low=1)
    channels: list[int] = opt([16, 32], "cnn: output channels of each 3x3 conv block", low=1)
    activation: Literal["relu", "tanh", "sigmoid", "leaky_relu"] = opt("relu", "hidden activation")
    dropout: float = opt(0.0, "dropout probability after each hidden block (0: none)", low=0.0,
                         high=0.95)


@dataclass
class AugmentConfig:
    crop_padding: int = opt(0, "random crop: pad each training image by this many black pixels "
                            "per side, crop back to its size at a random offset (0: no crop; "
                            "the papers use 4)", low=0)
    flip: bool = opt(False, "mirror each training image left-right with probability 1/2")
    normalize: Literal["cifar10", "cifar100", "tinyimagenet"] | None = opt(
        None, "subtract Mammoth's per-channel mean and divide by its std, on the train, val and "
        "test data alike (null: none)")


@dataclass
class TrainConfig:
    epochs: int = opt(20, "passes over each task's training data", low=1)
    batch_size: int = opt(32, "examples per optimizer step", low=1)
    optimizer: str = opt("sgd", "any optimizer class of torch.optim, any case (sgd, adam, adamw, "
                         "rmsprop, ...)")
    lr: float = opt(0.05, "learning rate", low=0.0)
    momentum: float = opt(0.0, "momentum, for optimizers that take one (sgd, rmsprop)", low=0.0,
                          high=0.999)
    weight_decay: float = opt(0.0, "weight decay of the optimizer (adamw too: not torch's 0.01)",
                              low=0.0)
    eval_every: int = opt(0, "also evaluate every N epochs inside a task (0: only after each task)",
                          low=0)
    eval_splits: list[Literal["val", "test"]] = opt(["test"], "splits evaluated at each evaluation")
    optimizer_args: dict[str, Any] = opt({}, "more keyword arguments of the optimizer class, e.g. "
                                         "{betas: [0.9, 0.99], amsgrad: true}")
    scheduler: str | None = opt(None, "an LR scheduler class of torch.optim.lr_scheduler, any "
                                "case (cosineannealinglr, steplr, onecyclelr, ...; null: none)")
    scheduler_args: dict[str, Any] = opt({}, "keyword arguments of the scheduler, e.g. {T_max: 20}")
    scheduler_step: Literal["epoch", "step"] = opt(
        "epoch", "call scheduler.step() after every epoch or after every optimizer step")
    optimizer_policy: Literal["fresh", "carry"] = opt(
        "fresh", "fresh: a new optimizer (and scheduler: the schedule restarts) at the start of "
        "each task; carry: one for the whole run, its state (e.g. Adam's moments) kept")
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={
        "doc": "data augmentation of images (engram.data.augment): crop and flip augment every "
               "training mini-batch (replayed examples too); normalize changes all the data"})
    amp: bool = opt(False, "mixed precision: autocast to float16 with a gradient scaler on CUDA "
                    "(bfloat16, no scaler, on the CPU: slow, for testing)")
    channels_last: bool = opt(False, "keep the model's 4-d weights and the images in channels-last "
                              "memory format (faster convolutions on CUDA)")

    def __post_init__(self) -> None:
        self.optimizer, self.scheduler = lower_name(self.optimizer), lower_name(self.scheduler)
        check_optimization(self, "train")


# TrainConfig and DataConfig settings added after run ids and result folders were first
# written: left out of every identity while at their defaults, so the ids and folders of
# earlier configs stay valid.
LATER_TRAIN_DEFAULTS: dict[str, Any] = {
    "optimizer_args": {}, "scheduler": None, "scheduler_args": {}, "scheduler_step": "epoch",
    "optimizer_policy": "fresh",
    "augment": {"crop_padding": 0, "flip": False, "normalize": None}, "amp": False,
    "channels_last": False}
LATER_DATA_DEFAULTS: dict[str, Any] = {"labels": "fine"}


def _identity(settings: Any, later_defaults: dict[str, Any]) -> dict[str, Any]:
    """Every field of `settings` (a dataclass or a dict of one), except those of
    `later_defaults` left at their defaults."""
    fields = settings if isinstance(settings, dict) else dataclasses.asdict(settings)
    return {k: v for k, v in fields.items()
            if k not in later_defaults or v != later_defaults[k]}


def train_identity(train: Any) -> dict[str, Any]:
    """Optimizer settings (a TrainConfig, the profiler's or the window's, or a dict of one) as
    run ids and folder identities hash them: every field, except LATER_TRAIN_DEFAULTS left at
    their defaults."""
    return _identity(train, LATER_TRAIN_DEFAULTS)


def data_identity(data: Any) -> dict[str, Any]:
    """Data settings (a DataConfig or a dict of one) as run ids and folder identities hash
    them: every field, except LATER_DATA_DEFAULTS left at their defaults."""
    return _identity(data, LATER_DATA_DEFAULTS)


@dataclass
class MethodSpec:
    """One method to run: its registry name and its validated parameters."""
    name: str
    params: Any  # the method's own Params dataclass

    def label(self) -> str:
        """Short display name, e.g. `ewc(strength=100)`; parameters left at defaults are omitted."""
        if self.name == "compose":
            return "+".join(part.label() for part in self.params.methods)
        changed = {k: v for k, v in params_dict(self.params).items()
                   if v != getattr(type(self.params)(), k)}
        inner = ",".join(f"{k}={v}" for k, v in changed.items())
        return f"{self.name}({inner})" if inner else self.name


@dataclass
class RunConfig:
    name: str = opt("run", "a name for this experiment, shown in tables and plots",
                    check=check_name)
    seeds: list[int] = opt([0], "random seeds; every method runs once per seed",
                           check=check_seeds)
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N",
                      check=check_device)
    threads: int = opt(1, "CPU threads for torch (0: torch's default); 1 is fastest for small models",
                       low=0)
    plots: bool = opt(True, "write PNG plots next to results.csv when the run finishes")
    checkpoint_seconds: float = opt(
        10.0, "at a task's end, save a resume checkpoint if this many seconds passed since the "
        "last one (0: after every task)", low=0.0)
    batch_seeds: bool = opt(
        False, "train the seeds of each method together as one stacked network (same rows "
        "and run ids, up to float rounding; naive, replay and the quadratic penalties (ewc, "
        "online_ewc, mas, l2, si, rwalk, ewcpp, l2_init), see `engram list --params`; the "
        "other methods run their seeds one at a time)")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "where examples come from"})
    stream: StreamConfig = field(default_factory=StreamConfig, metadata={"doc": "the task sequence"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the network"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "the training loop"})
    methods: list[MethodSpec] = opt([MethodSpec("naive", None)],
                                    "methods to compare: a list of {name: NAME, param: value, ...}",
                                    parse=lambda raw, key: parse_methods(raw, key))

    def __post_init__(self) -> None:
        check_seeds(self.seeds, "seeds")
        if not self.train.eval_splits:
            raise ConfigError("train.eval_splits: give at least one split: [test], [val] or [val, test]")
        # The default method list needs the method registry, which is imported lazily.
        self.methods = [m if m.params is not None else parse_method(m.name, {}, "methods[0]")
                        for m in self.methods]


def named_entry(entry: Any, where: str, needs: str) -> dict[str, Any]:
    """One entry of a list of named entries (methods, window variants): a mapping with a
    `name` key, a bare string standing for {name: STRING}. ConfigError, at `where`, saying
    `needs` (e.g. "each method needs a name, e.g. {name: ewc}"), for anything else."""
    if isinstance(entry, str):
        return {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: {needs}; got {short_repr(entry)}")
    return entry


def parse_methods(value: Any, key: str = "methods") -> list[MethodSpec]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of {{name: METHOD, ...}} entries")
    specs = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        entry = named_entry(entry, where, "each method needs a name, e.g. {name: ewc}")
        params = {k: v for k, v in entry.items() if k != "name"}
        specs.append(parse_method(entry["name"], params, where))
    return specs


def parse_method(name: Any, params: dict, where: str) -> MethodSpec:
    """Validate one method entry against that method's own Params dataclass."""
    if name not in METHODS:
        raise ConfigError(f"{where}.name: unknown method {short_repr(name)}; choose one of: "
                          + ", ".join(METHODS.names()))
    method_cls = METHODS.get(name)
    if getattr(method_cls, "takes_methods", False):  # compose: nested method entries
        unknown = [k for k in params if k != "methods"]
        if unknown:
            raise ConfigError(f"unknown key {where}({name}).{unknown[0]}; {name} takes only "
                              "methods: [METHOD, ...]")
        nested = params.get("methods", list(method_cls.default_methods))
        return MethodSpec(name, method_cls.Params(parse_methods(nested, f"{where}({name}).methods")))
    return MethodSpec(name, parse_dataclass(method_cls.Params, params, f"{where}({name})"))


def params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params) if params is not None else {}


def load_config_dict(raw: Any, overrides: list[str] = (), source: str = "config",
                     smoke: bool = False) -> RunConfig:
    """Validate a raw (YAML-decoded) config dict after applying dotted overrides. A config may
    hold a `smoke:` list of overrides scaling it down to a quick CPU run of the same pipeline;
    with smoke=True (`engram run --smoke`) they are applied before `overrides`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    raw = copy.deepcopy(raw)  # the caller's dict stays as it was (overrides edit this one)
    smoke_overrides = raw.pop("smoke", [])
    if not (isinstance(smoke_overrides, list)
            and all(isinstance(item, str) and "=" in item for item in smoke_overrides)):
        raise ConfigError(f"{source}: smoke must be a list of KEY=VALUE overrides, e.g. "
                          "[train.epochs=1, data.limit=500]")
    if smoke and not smoke_overrides:
        raise ConfigError(f"{source} has no smoke: list of overrides, so --smoke cannot scale "
                          "it down (see configs/seq_cifar10.yaml)")
    for override in (smoke_overrides if smoke else []) + list(overrides):
        apply_override(raw, override)
    return parse_dataclass(RunConfig, raw)


def load_config(path: str | Path, overrides: list[str] = (), smoke: bool = False) -> RunConfig:
    """Read a YAML config (safe loader only), apply overrides (after its smoke: overrides
    when smoke=True), validate everything."""
    raw = read_yaml_file(path)
    return load_config_dict(raw, overrides, str(path), smoke)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The plain-dict form of a config (what `config.yaml` in a run folder holds)."""
    out = dataclasses.asdict(cfg)
    out["methods"] = [{"name": m.name, **params_dict(m.params)} for m in cfg.methods]
    return out
