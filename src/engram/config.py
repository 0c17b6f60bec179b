"""Typed, validated experiment configs: YAML in, dataclasses out, clear errors.

A config is checked completely before any training starts. Every field below has a
one-line doc (shown by `engram run --help-config`); unknown keys, wrong types,
out-of-range values and unknown registry names stop with a message that names the key
and the allowed values.

    cfg = load_config("configs/demo.yaml", overrides=["train.epochs=5", "seeds=[0,1]"])
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

from engram.errors import ConfigError


def opt(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
        registry: str | None = None, check: Callable[[Any, str], None] | None = None) -> Any:
    """A dataclass field with a doc line, an optional [low, high] range and registry check,
    and an optional `check(value, key)` that raises ConfigError (names, seeds, devices)."""
    meta = {"doc": doc, "low": low, "high": high, "registry": registry, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- value checks

def short_repr(value: Any) -> str:
    """repr(value) cut to about 80 characters, 8 items and 3 levels: what an error message
    echoes. A full repr of a value built from YAML aliases can take minutes and gigabytes."""
    import reprlib

    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxdict, brief.maxtuple, brief.maxset = 3, 8, 8, 8, 8
    brief.maxstring, brief.maxother, brief.maxlong = 80, 80, 40
    return brief.repr(value)


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
    source: str = opt("digits", "dataset to read (see `engram list`)", registry="datasets")
    path: str | None = opt(None, "folder holding the dataset files (mnist, fashion_mnist, cifar10)")
    test_fraction: float = opt(0.2, "fraction held out for testing when the source has no test split",
                               low=0.01, high=0.9)
    val_fraction: float = opt(0.0, "fraction of the training pool held out for validation",
                              low=0.0, high=0.9)
    limit: int | None = opt(None, "use at most this many training examples (before splitting tasks)",
                            low=1)


@dataclass
class StreamConfig:
    kind: str = opt("split", "how the dataset becomes a sequence of tasks", registry="streams")
    scenario: Literal["task", "domain", "class"] = opt(
        "class", "task-, domain- or class-incremental (van de Ven & Tolias 2019)")
    n_tasks: int = opt(5, "number of tasks (split: at most n_classes / classes_per_task)", low=1)
    classes_per_task: int = opt(2, "split only: classes in each task", low=1)
    rotation_step: float = opt(30.0, "rotated only: degrees added per task", low=-360, high=360)


@dataclass
class ModelConfig:
    kind: str = opt("mlp", "network body (see `engram list`)", registry="models")
    hidden: list[int] = opt([256, 256], "mlp: hidden layer widths", low=1)
    channels: list[int] = opt([16, 32], "cnn: output channels of each 3x3 conv block", low=1)
    activation: Literal["relu", "tanh", "sigmoid", "leaky_relu"] = opt("relu", "hidden activation")
    dropout: float = opt(0.0, "dropout probability after each hidden block (0: none)", low=0.0,
                         high=0.95)


@dataclass
class TrainConfig:
    epochs: int = opt(20, "passes over each task's training data", low=1)
    batch_size: int = opt(32, "examples per optimizer step", low=1)
    optimizer: Literal["sgd", "adam"] = opt("sgd", "optimizer, re-created at the start of each task")
    lr: float = opt(0.05, "learning rate", low=0.0)
    momentum: float = opt(0.0, "sgd momentum", low=0.0, high=0.999)
    weight_decay: float = opt(0.0, "L2 weight decay of the optimizer", low=0.0)
    eval_every: int = opt(0, "also evaluate every N epochs inside a task (0: only after each task)",
                          low=0)
    eval_splits: list[Literal["val", "test"]] = opt(["test"], "splits evaluated at each evaluation")


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
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "where examples come from"})
    stream: StreamConfig = field(default_factory=StreamConfig, metadata={"doc": "the task sequence"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the network"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "the training loop"})
    methods: list[MethodSpec] = field(
        default_factory=lambda: [MethodSpec("naive", None)],
        metadata={"doc": "methods to compare: a list of {name: NAME, param: value, ...}"})

    def __post_init__(self) -> None:
        check_seeds(self.seeds, "seeds")
        if not self.train.eval_splits:
            raise ConfigError("train.eval_splits: give at least one split: [test], [val] or [val, test]")
        # The default method list needs the method registry, which is imported lazily.
        self.methods = [m if m.params is not None else parse_method(m.name, {}, "methods[0]")
                        for m in self.methods]


# ----------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type annotation `tp`; return it converted (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {short_repr(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {short_repr(value)} is not allowed; choose one of: "
                              + ", ".join(repr(a) for a in allowed))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {short_repr(value)}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {short_repr(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {short_repr(value)}")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported")  # a bug in engram


def _check_range(value: Any, meta: dict, key: str) -> None:
    low, high = meta.get("low"), meta.get("high")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if ((low is not None or high is not None) and math.isnan(item)) or \
                (low is not None and item < low) or (high is not None and item > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"{key}: {short_repr(item)} is out of range; allowed: {bounds}")


def _check_registry(value: Any, registry: str, key: str) -> None:
    names = registry_names(registry)
    if isinstance(value, list):  # a list of registry names, each checked
        for i, item in enumerate(value):
            _check_registry(item, registry, f"{key}[{i}]")
        return
    if value not in names:
        raise ConfigError(f"{key}: unknown {registry[:-1]} {short_repr(value)}; choose one of: "
                          + ", ".join(names))


def registry_names(registry: str) -> list[str]:
    """Names in one of engram's registries, imported only when a config needs them."""
    if registry == "datasets":
        from engram.data import DATASETS as reg
    elif registry == "streams":
        from engram.data import STREAMS as reg
    elif registry == "models":
        from engram.models import MODELS as reg
    elif registry == "methods":
        from engram.methods import METHODS as reg
    elif registry == "problems":
        from engram.plasticity import PROBLEMS as reg
    elif registry == "measures":
        from engram.importance.measures import MEASURES as reg
    else:
        raise ValueError(registry)
    return reg.names()


def parse_dataclass(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and checking every value."""
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys to values, "
                          f"got {short_repr(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys in "
                          f"{where or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        if cls is RunConfig and name == "methods":
            kwargs[name] = _parse_methods(value)
            continue
        converted = _convert(value, hints[name], key)
        meta = fields[name].metadata
        _check_range(converted, meta, key)
        if meta.get("registry"):
            _check_registry(converted, meta["registry"], key)
        if meta.get("check") and converted is not None:
            meta["check"](converted, key)
        kwargs[name] = converted
    return cls(**kwargs)


def _parse_methods(value: Any, key: str = "methods") -> list[MethodSpec]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of {{name: METHOD, ...}} entries")
    specs = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}: each method needs a name, e.g. {{name: ewc}}; "
                              f"got {short_repr(entry)}")
        params = {k: v for k, v in entry.items() if k != "name"}
        specs.append(parse_method(entry["name"], params, where))
    return specs


def parse_method(name: Any, params: dict, where: str) -> MethodSpec:
    """Validate one method entry against that method's own Params dataclass."""
    _check_registry(name, "methods", f"{where}.name")
    from engram.methods import METHODS

    method_cls = METHODS.get(name)
    if getattr(method_cls, "takes_methods", False):  # compose: nested method entries
        unknown = [k for k in params if k != "methods"]
        if unknown:
            raise ConfigError(f"unknown key {where}({name}).{unknown[0]}; {name} takes only "
                              "methods: [METHOD, ...]")
        nested = params.get("methods", list(method_cls.default_methods))
        return MethodSpec(name, method_cls.Params(_parse_methods(nested, f"{where}({name}).methods")))
    return MethodSpec(name, parse_dataclass(method_cls.Params, params, f"{where}({name})"))


def params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params) if params is not None else {}


# ----------------------------------------------------------------------------- loading

# PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `lr: 1e-3` and
# `1.0e3` would be strings and then fail as "expected a number". YAML 1.2 reads them as floats.
_EXPONENT_FLOAT = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"


# Bounds on a YAML document: a config is a few hundred lines, so these only stop abuse. Without
# them an alias bomb (`a: &a [x, x]`, `b: &b [*a, *a]`, ... nine levels: a billion values)
# took a minute and 2.5 GB before failing, and `[[[[...]]]]` 5,000 deep overflowed the stack.
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_DEPTH = 50  # nested lists and mappings
MAX_CONFIG_VALUES = 100_000  # values after every alias is expanded


@functools.cache
def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """The safe loader, plus: a depth limit, a limit on values after alias expansion,
        and duplicate keys refused (PyYAML silently keeps the last)."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            # Composing recurses once per level: stop before Python's recursion limit does.
            depth = getattr(self, "_depth", 0) + 1
            if depth > MAX_CONFIG_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_CONFIG_DEPTH} levels deep",
                    self.peek_event().start_mark)
            self._depth = depth
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth = depth - 1

        def construct_document(self, node: Any) -> Any:
            _count_values(node, {}, set())  # before anything is built from the node graph
            return super().construct_document(node)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue  # `<<: *base` merges are meant to be overridden
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)}, first on line "
                        f"{seen[key]}", key_node.start_mark)
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    def _count_values(node: Any, counted: dict[int, int], open_nodes: set[int]) -> int:
        """The number of values `node` stands for once aliases are expanded (a shared node
        counts once per reference); memoised, so aliases cost nothing to count."""
        if id(node) in counted:
            return counted[id(node)]
        if id(node) in open_nodes:  # `&a [*a]`: a list that contains itself
            raise yaml.composer.ComposerError(None, None, "an alias refers to a value that "
                                              "contains it", node.start_mark)
        open_nodes.add(id(node))
        children = [] if isinstance(node, yaml.ScalarNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) \
            else node.value
        total = 1 + sum(_count_values(child, counted, open_nodes) for child in children)
        open_nodes.discard(id(node))
        if total > MAX_CONFIG_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_CONFIG_VALUES:,} values (each alias counted as a "
                "copy of what it names)", node.start_mark)
        counted[id(node)] = total
        return total

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_EXPONENT_FLOAT),
                                 list("-+0123456789."))
    return Loader


def _load_yaml_text(text: str, source: str) -> Any:
    """Parse YAML with the bounded safe loader; any problem is one line naming `source`."""
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source} is {len(text):,} characters; a config may have at most "
                          f"{MAX_CONFIG_BYTES:,}")
    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader: no arbitrary objects
    except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. a date 2020-13-45
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(err)}") from None


def _yaml_problem(err: Exception) -> str:
    """PyYAML's multi-line message as one line: context and problem, each with its place."""
    parts = []
    for text, mark in ((getattr(err, "context", None), getattr(err, "context_mark", None)),
                       (getattr(err, "problem", None), getattr(err, "problem_mark", None))):
        if text:
            parts.append(f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark
                         else text)
    return "; ".join(parts) or " ".join(str(err).split())


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in `path`: it must exist, hold at most MAX_CONFIG_BYTES of UTF-8
    and not be empty (an empty file is most likely a mistake, not a wish for the defaults)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"{what} {path} does not exist")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{what} {path} is {size:,} bytes; a config may have at most "
                              f"{MAX_CONFIG_BYTES:,}")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{what} {path} is not UTF-8 text: byte {data[err.start]:#04x} on "
                          f"line {line}; save it as UTF-8") from None
    raw = _load_yaml_text(text, str(path))
    if raw is None:
        raise ConfigError(f"{what} {path} is empty; write the keys to change (see "
                          "--help-config), e.g. seeds: [0]")
    return raw


def apply_override(tree: dict, override: str) -> None:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a raw config dict.

    List entries are addressed by index: `methods.1.strength=100`.
    """
    if "=" not in override:
        raise ConfigError(f"override {short_repr(override)} must look like dotted.key=value")
    dotted, raw = override.split("=", 1)
    value = _load_yaml_text(raw, f"override {short_repr(override)}")
    node: Any = tree
    parts = dotted.strip().split(".")
    if len(parts) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"override {short_repr(dotted)}: more than {MAX_CONFIG_DEPTH} levels")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted}: {short_repr(part)} is not an index of a "
                                  f"{len(node)}-entry list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # an empty YAML section (`data:`) is null
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:depth])} is not a mapping")


def load_config_dict(raw: Any, overrides: list[str] = (), source: str = "config") -> RunConfig:
    """Validate a raw (YAML-decoded) config dict after applying dotted overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    for override in overrides:
        apply_override(raw, override)
    return parse_dataclass(RunConfig, raw)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (safe loader only), apply overrides, validate everything."""
    raw = read_yaml_file(path)
    return load_config_dict(raw, overrides, str(path))


def read_config_tree(path: str | Path, overrides: list[str] = ()) -> dict:
    """A YAML config file as a raw dict (safe loader only) with dotted overrides applied:
    what the profiler's and the plasticity runner's loaders validate with their own schema."""
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for override in overrides:
        apply_override(raw, override)
    return raw


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The plain-dict form of a config (what `config.yaml` in a run folder holds)."""
    out = dataclasses.asdict(cfg)
    out["methods"] = [{"name": m.name, **params_dict(m.params)} for m in cfg.methods]
    return out


def run_id(cfg: RunConfig, method: MethodSpec, seed: int) -> str:
    """Hash of everything that determines one run's numbers (not name, plots or threads)."""
    canonical = {
        "data": dataclasses.asdict(cfg.data),
        "stream": dataclasses.asdict(cfg.stream),
        "model": dataclasses.asdict(cfg.model),
        "train": dataclasses.asdict(cfg.train),
        "method": {"name": method.name, **params_dict(method.params)},
        "seed": seed,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per config key with its default and doc, for `--help-config`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{key}: {f.metadata.get('doc', '')}")
            lines.extend(describe_fields(hints[f.name], key + "."))
            continue
        if f.name == "methods":
            lines.append(f"{key}: {f.metadata['doc']}")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {key} = {json.dumps(default)}  ({_type_name(hints[f.name])}): "
                     f"{f.metadata.get('doc', '')}")
    return lines
