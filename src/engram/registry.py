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
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if "\n" in description or not description:
            raise ValueError(f"{self.kind} {name!r} needs a one-line description")
        self._entries[name] = Entry(name, obj, description)
        return obj

    def get(self, name: str) -> T:
        self._fill()
        try:
            return self._entries[name].obj
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self._fill()
        return list(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
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
STREAMS: Registry[Any] = Registry("stream", "engram.data")
PROBLEMS: Registry[Any] = Registry("plasticity problem", "engram.data")
MODELS: Registry[Any] = Registry("model", "engram.models")
METHODS: Registry[Any] = Registry("method", "engram.methods")
MEASURES: Registry[Any] = Registry("importance measure", "engram.importance")
