"""engram's registries: name -> (object, one-line description), one per pluggable kind.

Ground floor: imports nothing of engram. The registries are made here, empty, so that the
config schema can name them (`opt(..., registry=METHODS)`) without importing the libraries
that fill them; each library adds its entries with one explicit line next to the code they
name (`METHODS.add("ewc", EWC, "...")` in engram/methods/__init__.py), never by scanning the
filesystem. A registry knows the module that fills it (`home`) and imports it on first
lookup, so `"ewc" in METHODS` is true whether or not engram.methods was imported yet.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object: its registry name, the object, a one-line description (what
    `engram list` prints)."""
    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    """An ordered mapping from registry names to objects with a description each."""

    def __init__(self, kind: str, home: str | None = None) -> None:
        self.kind = kind  # e.g. "dataset", used in error messages
        self.home = home  # the module whose import adds the entries, e.g. "engram.methods"
        self._entries: dict[str, Entry[T]] = {}
        self._filled = home is None

    def _fill(self) -> None:
        """Import the home module once (its import adds the entries)."""
        if not self._filled:
            self._filled = True  # first: the home module's own lookups must not recurse
            try:
                importlib.import_module(self.home)
            except BaseException:
                self._filled = False  # a failed import must not leave a silently short list
                raise

    def add(self, name: str, obj: T, description: str) -> T:
        """Register `obj` under `name` with a one-line `description`; returns `obj`.
        ValueError when the name is taken or the description is empty or has a newline.
        A plugin registers with one line at import time, e.g.
        ``METHODS.add("my_method", MyMethod, "what it does (Author et al. 2024)")``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if "\n" in description or not description:
            raise ValueError(f"{self.kind} {name!r} needs a one-line description")
        self._entries[name] = Entry(name, obj, description)
        return obj

    def get(self, name: str) -> T:
        """The object registered as `name` (importing the home module first); KeyError
        naming every registered name when there is none."""
        self._fill()
        try:
            return self._entries[name].obj
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        self._fill()
        return list(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        """Every Entry (name, object, description), in registration order."""
        self._fill()
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        self._fill()
        return name in self._entries

    def __len__(self) -> int:
        self._fill()
        return len(self._entries)


# The registries of engram's libraries, filled by the modules named.
DATASETS: Registry[Any] = Registry("dataset", "engram.data")
"""Datasets (config `data.dataset`): name -> loader returning the source's images and labels
(engram.data.sources)."""
STREAMS: Registry[Any] = Registry("stream", "engram.data")
"""Stream kinds (config `stream.kind`: split, permuted, rotated, ...): name -> function
(pools, StreamConfig, generator) -> raw tasks (engram.data.streams)."""
PROBLEMS: Registry[Any] = Registry("plasticity problem", "engram.data")
"""Loss-of-plasticity problems (`engram plasticity`): name -> function building a Problem,
its tasks and shapes (engram.data.problems)."""
MODELS: Registry[Any] = Registry("model", "engram.models")
"""Network bodies (config `model.kind`: mlp, cnn): name -> (input_shape, ModelConfig) ->
nn.Module mapping inputs to features; the linear head is added by engram.models.ContinualNet."""
METHODS: Registry[Any] = Registry("method", "engram.methods")
"""Continual-learning methods: name -> a subclass of engram.methods.base.Method (its `Params`
dataclass holds the config keys)."""
MEASURES: Registry[Any] = Registry("importance measure", "engram.importance")
"""Parameter-importance measures compared by `engram profile` (Fisher, MAS, ...): name ->
function (model, batches, loss_fn, ...) -> per-parameter scores (engram.importance.measures)."""
