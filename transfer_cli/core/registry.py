"""Name -> builder registries, so configs pick implementations without if/elif chains."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from transfer_cli.core.errors import TransferError


T = TypeVar("T")


def unknown_name_error(kind: str, name: str, known: list[str], option: str) -> TransferError:
    """The one-line error for a name the schema leaves free (a timm or torchvision model, its weights), close
    matches first."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    listing = ", ".join(known) if len(known) <= 30 else ", ".join(known[:30]) + ", ..."
    return TransferError(f"unknown {kind} '{name}': {hint}set {option} to one of: {listing}")


class Registry(Generic[T]):
    """Builders for the choices of one config field, keyed by the names the schema spells (config/schema.py).

    Composition refuses any other name, in one line naming the choices, before a registry is asked: `get`
    meets only names the schema took. `register` refuses at import a name outside `choices` (the schema's
    tuple for the field; None leaves the comparison to tests/test_config_choices.py, which also proves that
    every choice has its builder).
    """

    def __init__(self, kind: str, option: str, choices: Sequence[str] | None = None) -> None:
        self.kind = kind
        self.option = option
        self.choices = choices
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if self.choices is not None and name not in self.choices:
            raise ValueError(f"{self.kind} '{name}' is not a choice of {self.option}: add it to its tuple in "
                             "config/schema.py first")

        def decorator(obj: T) -> T:
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
