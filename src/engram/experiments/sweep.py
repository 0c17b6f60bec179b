"""Sweeps: a config whose keys may hold lists of alternatives, run as a grid of runs.

A sweep file is an ordinary config (see `engram run --help-config`) in which any key may
list alternatives:

    stream: {scenario: [task, domain, class]}   # 3 alternatives
    train:  {lr: [0.01, 0.1]}                   # x 2
    model:  {hidden: [[64], [256, 256]]}        # a list-valued key: a list of lists, x 2
    methods: [naive, {name: ewc, strength: [10, 100]}]   # method parameters too: 3 methods
    seeds: [0, 1, 2, 3, 4]                      # every point runs every seed

The grid is the Cartesian product of the alternatives; each point runs every method with
every seed. Each (point, method, seed) is one run, keyed by the hash of its canonical
config (`engram.experiments.harness.run_id`), so a run is measured once however often the sweep is
started: rerunning the same command resumes an interrupted sweep, and adding a seed or an
alternative runs only what is new. The runs are the continual runs of
engram.experiments.continual on the one harness (engram.experiments.harness): `--workers`
local processes, only the parent writes `results.csv`, a run that fails is recorded in
`failures.jsonl` (its point, method, seed and error) and the others go on.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import types
import typing
from pathlib import Path
from typing import Any

from engram.config import RunConfig, load_config_dict
from engram.errors import ConfigError
from engram.experiments.continual import (continual_finished, continual_jobs, execute_run,
                                          refuse_trackers_with_batched_seeds)
from engram.experiments.harness import Job, Plan, Report, resolve_device, run_plan
from engram.results import COLUMNS, KEY

# Keys whose alternatives would not change a run's numbers, so they cannot be grid axes.
NOT_AXES = ("name", "threads", "plots", "device", "checkpoint_seconds", "batch_seeds")


# ----------------------------------------------------------------------------- the grid

def _is_alternatives(value: Any, annotation: Any) -> bool:
    """A list means alternatives, except for list-typed keys, where a list of lists does."""
    if not isinstance(value, list) or not value:
        return False
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. int | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return all(isinstance(v, list) for v in value)
    return True


def _find_axes(raw: dict, cls: type, prefix: str = "") -> list[tuple[str, list]]:
    """(dotted key, alternatives) for every key of `raw` that lists alternatives."""
    axes = []
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        if name not in hints or name == "methods":
            continue  # unknown keys: load_config_dict names them; methods: see _expand_methods
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            axes += _find_axes(value, hints[name], key + ".")
        elif _is_alternatives(value, hints[name]):
            if key == "seeds":
                continue  # the seed list, run at every point
            if key in NOT_AXES:
                raise ConfigError(f"{key}: a sweep cannot vary {key}: it does not change a run's "
                                  "numbers, so every alternative would be the same run; give "
                                  "one value")
            axes.append((key, value))
    return axes


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[last] = value


def _get_dotted(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _expand_methods(entries: Any) -> Any:
    """Method entries whose parameters list alternatives become one entry per combination."""
    from engram.registry import METHODS

    if not isinstance(entries, list):
        return entries  # load_config_dict reports the problem
    expanded = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("name") not in METHODS.names():
            expanded.append(entry)
            continue
        params_cls = METHODS.get(entry["name"]).Params
        hints = typing.get_type_hints(params_cls) if dataclasses.is_dataclass(params_cls) else {}
        axes = [(k, v) for k, v in entry.items()
                if k in hints and k != "methods" and _is_alternatives(v, hints[k])]
        for values in itertools.product(*(v for _, v in axes)):
            expanded.append({**entry, **dict(zip((k for k, _ in axes), values))})
    return expanded


def expand_sweep(raw: Any, source: str = "sweep") -> list[tuple[dict[str, Any], RunConfig]]:
    """Every grid point of a raw sweep dict: (axis values, validated RunConfig).

    Every point is validated before anything runs, so a typo in the last alternative stops
    the sweep at once, naming the point.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    raw = copy.deepcopy(raw)
    if "methods" in raw:
        raw["methods"] = _expand_methods(raw["methods"])
    axes = _find_axes(raw, RunConfig)
    base_name = raw.get("name", source)
    points = []
    for values in itertools.product(*(alternatives for _, alternatives in axes)):
        point = dict(zip((key for key, _ in axes), values))
        tree = copy.deepcopy(raw)
        for key, value in point.items():
            _set_dotted(tree, key, value)
        try:
            cfg = load_config_dict(tree, source=source)
        except ConfigError as err:
            where = ", ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"{source}, grid point [{where}]: {err}" if where else str(err)) from None
        # The name tells grid points apart in tables; the scenario is a column of its own.
        # Set after validation: the plain-name rule is for the name the user wrote.
        shown = {k: v for k, v in point.items() if k != "stream.scenario"}
        if shown:
            cfg.name = f"{base_name}[" + ",".join(f"{k}={v}" for k, v in shown.items()) + "]"
        points.append((point, cfg))
    return points


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[dict, list[Job]]:
    """Read a sweep file (safe YAML), apply `dotted.key=value` overrides (a value may be a
    list of alternatives too) and return (the resulting raw sweep, its jobs)."""
    from engram.schema import apply_override, read_yaml_file

    raw = read_yaml_file(path, "sweep file")
    if isinstance(raw, dict):
        for override in overrides:
            apply_override(raw, override)
    return raw, continual_jobs(expand_sweep(raw, str(path)))


# ----------------------------------------------------------------------------- the sweep

def run_sweep(path: str | Path, out: str | Path, *, overrides: list[str] = (),
              raise_failures: bool = False, **run_options: Any) -> Report:
    """Run (or resume) every run of the sweep file `path` into `out/results.csv`, on the
    harness. The folder must hold this sweep (or one it extends: more seeds, alternatives or
    methods); the sweep as run is kept as sweep.yaml (an earlier, different one as
    sweep.N.yaml). Failures are reported, not raised, unless raise_failures. run_options:
    run_plan's (workers, backend, address, trackers, show_progress)."""
    raw, jobs = load_sweep(path, overrides)
    identity, extensible = sweep_identity(raw, str(path))
    first = jobs[0].payload.cfg if jobs else RunConfig()
    refuse_trackers_with_batched_seeds(first, run_options)
    plan = Plan(command="sweep", identity=identity, growable=tuple(extensible), config=raw,
                columns=COLUMNS, key=KEY, jobs=jobs, execute=execute_run,
                finished=continual_finished,
                device=str(resolve_device(first.device)), threads=first.threads, unit="epoch",
                config_name="sweep.yaml")
    return run_plan(plan, out, raise_failures=raise_failures, **run_options)


def sweep_identity(raw: dict, source: str = "sweep") -> tuple[dict[str, Any], list[str]]:
    """What determines a sweep folder's numbers, for engram.experiments.outdir: the first grid point's
    resolved config (defaults filled in) without the keys that are not axes, each axis
    replaced by its list of alternatives, and the sweep's own name. Returns (identity, the
    keys that may grow): the axes, the method list and the seeds, so adding an alternative
    or a seed extends a folder while changing a single-valued setting is refused."""
    from engram.config import config_to_dict, data_identity, train_identity
    from engram.experiments.outdir import flatten

    points = expand_sweep(raw, source)
    axes = list(points[0][0])
    resolved = [config_to_dict(cfg) for _, cfg in points]
    first = {**resolved[0], "train": train_identity(resolved[0]["train"]),  # as run ids hash it
             "data": data_identity(resolved[0]["data"])}
    identity = flatten({k: v for k, v in first.items() if k not in NOT_AXES})
    if first.get("batch_seeds"):  # as engram run's folders: one mode per folder
        identity["batch_seeds"] = True
    for key in axes:
        # a mapping-valued axis (train.optimizer_args) is one key, not its flattened entries
        identity = {k: v for k, v in identity.items() if not k.startswith(key + ".")}
        values = [json.loads(json.dumps(_get_dotted(tree, key))) for tree in resolved]
        identity[key] = list({json.dumps(v, sort_keys=True): v for v in values}.values())
    identity["name"] = raw.get("name", source)
    return identity, ["seeds", "methods", *axes]
