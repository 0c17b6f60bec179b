"""A tiny name -> (object, one-line description) registry.

Every pluggable piece of engram (datasets, streams, models, methods) lives in one of
these. Entries are added with one explicit line next to the code they name, never by
scanning the filesystem, so `engram list` and the registry-parametrized tests see exactly
what the code defines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    """An ordered mapping from registry names to objects with a description each."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # e.g. "dataset", used in error messages
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, obj: T, description: str) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if "\n" in description or not description:
            raise ValueError(f"{self.kind} {name!r} needs a one-line description")
        self._entries[name] = Entry(name, obj, description)
        return obj

    def get(self, name: str) -> T:
        try:
            return self._entries[name].obj
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
