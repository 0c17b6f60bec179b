"""Plugins: a user's own Python modules that add models, datasets, streams, methods and
importance measures to engram's registries (`METHODS.add("mine", Mine, "...")` at import,
exactly as engram's own libraries do; engram.registry).

A plugin is named by a dotted module name importable from sys.path (`mylab.engram_parts`)
or by the path of a .py file (`plugins/mine.py`, imported under its file name, `mine`). The
CLI loads those given with `--import` and every entry point of the installed distributions'
`engram.plugins` group (`entry_point_plugins`), once, before it reads a config; the harness
loads the same list in every worker process and Ray task before it unpickles a job there
(a job may hold a plugin method's Params). A file given by path is imported by that path in
the workers too (on this machine; on a Ray cluster every node needs it at that path, or the
module importable by name).

Ground floor: imports nothing of engram but its errors.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from engram.errors import ConfigError, one_line

ENTRY_POINT_GROUP = "engram.plugins"

_loaded: dict[str, str] = {}  # what was asked for -> the name it is loaded under (idempotence)


def load_plugins(modules: Sequence[str]) -> list[str]:
    """Import each plugin module once (again: nothing happens) and return the names to give
    a worker for the same modules: a dotted name as is, a .py file as its absolute path.
    A module that cannot be imported: a one-line ConfigError naming it and the error."""
    loaded = []
    for spec in modules:
        path = Path(spec)
        is_file = spec.endswith(".py") or path.is_file()
        key = str(path.resolve()) if is_file else spec
        if key not in _loaded:
            try:
                _loaded[key] = _import_file(path.resolve()) if is_file else _import_name(spec)
            except ConfigError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure of a user's module
                raise ConfigError(f"--import {spec}: cannot import it "
                                  f"({one_line(error)})") from None
        loaded.append(key)
    return loaded


def entry_point_plugins() -> list[str]:
    """Load every installed distribution's `engram.plugins` entry point (`ep.load()`, which
    imports its module); return their module names (a worker imports those by name)."""
    from importlib.metadata import entry_points

    found = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.module in _loaded:
            found.append(entry_point.module)
            continue
        try:
            entry_point.load()
        except Exception as error:  # noqa: BLE001 - a broken installed plugin
            raise ConfigError(f"entry point {entry_point.name} = {entry_point.value} (group "
                              f"{ENTRY_POINT_GROUP}): cannot import it "
                              f"({one_line(error)})") from None
        _loaded[entry_point.module] = entry_point.module
        found.append(entry_point.module)
    return found


def add_search_path(entries: Sequence[str]) -> None:
    """Append to sys.path those of `entries` (a driver's sys.path) that this process lacks
    and that exist here: a Ray worker on the driver's machine then finds the modules the
    driver imported by name (a spawned worker gets the parent's sys.path anyway)."""
    for entry in entries:
        if entry not in sys.path and (entry == "" or Path(entry).exists()):
            sys.path.append(entry)


def _import_name(name: str) -> str:
    importlib.import_module(name)
    return name


def _import_file(path: Path) -> str:
    """Import a .py file under its file name; the module is in sys.modules by that name, so
    pickle finds the classes it defines (in this process and in workers that import the same
    path)."""
    if not path.is_file():
        raise ConfigError(f"--import {path}: no such file")
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve() == path:
            return name  # imported already (by name, or by a test)
        raise ConfigError(f"--import {path}: a module named {name!r} is already imported "
                          f"(from {getattr(existing, '__file__', 'built in')}); rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--import {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed import leaves nothing half-made behind
        raise
    return name

