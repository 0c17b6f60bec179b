"""The typed-config machinery every engram config is built on: YAML in, dataclasses out.

Ground floor: imports nothing of engram but `errors` and `registry`. A config class is a
dataclass whose fields are made with `opt` (a default, a one-line doc, a range, a registry
or a check); `parse_dataclass` builds it from a YAML mapping, naming the key of any unknown
key, wrong type or out-of-range value; `describe_fields` is `--help-config`. YAML is read
with a bounded safe loader (`read_yaml_file`), and `key.sub=value` overrides edit the raw tree
before validation (`apply_override`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Literal, Union

from engram.errors import ConfigError
from engram.registry import Registry


def opt(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
        registry: Registry | None = None, check: Callable[[Any, str], None] | None = None,
        parse: Callable[[Any, str], Any] | None = None) -> Any:
    """A dataclass field with a doc line, an optional [low, high] range, a registry its
    value (or each value of a list) must name, an optional `check(value, key)` that raises
    ConfigError (names, seeds, devices), and an optional `parse(raw, key)` that builds the
    value itself (method lists, whose entries each have their own schema)."""
    if registry is not None and not isinstance(registry, Registry):
        raise TypeError(f"opt(registry=...) takes a Registry, got {registry!r}")  # an engram bug
    meta = {"doc": doc, "low": low, "high": high, "registry": registry, "check": check,
            "parse": parse}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- parsing

def short_repr(value: Any) -> str:
    """repr(value) cut to about 80 characters, 8 items and 3 levels: what an error message
    echoes. A full repr of a value built from YAML aliases can take minutes and gigabytes."""
    import reprlib

    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxdict, brief.maxtuple, brief.maxset = 3, 8, 8, 8, 8
    brief.maxstring, brief.maxother, brief.maxlong = 80, 80, 40
    return brief.repr(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
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
    if origin is dict:  # free-form keyword arguments (e.g. an optimizer's), checked elsewhere
        if value is None:  # an empty YAML section, as parse_dataclass reads it
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of names to values, got "
                              f"{short_repr(value)}")
        return dict(value)
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


def check_range(value: Any, meta: dict, key: str) -> None:
    low, high = meta.get("low"), meta.get("high")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if ((low is not None or high is not None) and math.isnan(item)) or \
                (low is not None and item < low) or (high is not None and item > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"{key}: {short_repr(item)} is out of range; allowed: {bounds}")


def _check_registry(value: Any, registry: Registry, key: str) -> None:
    if isinstance(value, list):  # a list of registry names, each checked
        for i, item in enumerate(value):
            _check_registry(item, registry, f"{key}[{i}]")
        return
    if value not in registry:
        raise ConfigError(f"{key}: unknown {registry.kind} {short_repr(value)}; choose one of: "
                          + ", ".join(registry.names()))


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
        meta = fields[name].metadata
        if meta.get("parse"):  # a field that parses itself (a list of methods)
            kwargs[name] = meta["parse"](value, key)
            continue
        converted = _convert(value, hints[name], key)
        check_range(converted, meta, key)
        if meta.get("registry"):
            _check_registry(converted, meta["registry"], key)
        if meta.get("check") and converted is not None:
            meta["check"](converted, key)
        kwargs[name] = converted
    return cls(**kwargs)


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


def read_config_tree(path: str | Path, overrides: list[str] = ()) -> dict:
    """A YAML config file as a raw dict (safe loader only) with dotted overrides applied:
    what the profiler's and the plasticity runner's loaders validate with their own schema."""
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for override in overrides:
        apply_override(raw, override)
    return raw


def describe_fields(cls: type, prefix: str = "") -> list[str]:
    """One line per config key with its default and doc, for `--help-config`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{key}: {f.metadata.get('doc', '')}")
            lines.extend(describe_fields(hints[f.name], key + "."))
            continue
        if f.metadata.get("parse"):  # e.g. methods: described by `engram list --params`
            lines.append(f"{key}: {f.metadata['doc']}")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {key} = {json.dumps(default)}  ({_type_name(hints[f.name])}): "
                     f"{f.metadata.get('doc', '')}")
    return lines
