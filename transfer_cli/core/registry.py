"""Name -> builder registries, so configs pick implementations without if/elif chains."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from transfer_cli.core.errors import TransferError


T = TypeVar("T")


def unknown_name_error(kind: str, name: str, known: list[str], option: str) -> TransferError:
    """Build the standard 'unknown X' error, listing close matches first."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    listing = ", ".join(known) if len(known) <= 30 else ", ".join(known[:30]) + ", ..."
    return TransferError(f"unknown {kind} '{name}': {hint}set {option} to one of: {listing}")


class Registry(Generic[T]):
    """A mapping from names to objects that fails helpfully on unknown names."""

    def __init__(self, kind: str, option: str) -> None:
        self.kind = kind
        self.option = option
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise unknown_name_error(self.kind, name, sorted(self._items), self.option)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
