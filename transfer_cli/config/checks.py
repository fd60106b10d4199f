"""Value rules for config fields, and the walks that read a whole schema by its fields' metadata.

A schema field carries its rule in its metadata (`field(default=..., metadata=rule(...))`,
see schema.py), so the range sits next to the field it guards. `check_tree` visits every field
of a dataclass tree and raises one TransferError naming the first bad key, its value and what
it must be; `machinery_keys` lists the fields marked MACHINERY. A Toggle (auto | true | false)
is checked by one rule and read by one function, `resolve_toggle`. This module imports neither
torch nor Hydra: composition checks it before anything runs, and `transfer report` reads it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transfer_cli.core.errors import TransferError


RULE = "rule"
MISSING = "???"  # omegaconf.MISSING: a required value not given yet (composition reports it)
# field metadata: how a run is carried out (workers, device, caches, loggers), not what it computes
MACHINERY = {"machinery": True}


def only_for(*kinds: str) -> dict[str, tuple[str, ...]]:
    """Field metadata: only these kinds (a DatasetConfig.name) read the field; `transfer train --help` shows it
    under those alone."""
    return {"only_for": kinds}


def unread_fields(schema: type, kind: str) -> tuple[str, ...]:
    """The fields of dataclass `schema` that `kind` does not read (marked only_for other kinds)."""
    return tuple(spec.name for spec in dataclasses.fields(schema) if kind not in spec.metadata.get("only_for", (kind,)))

# A three-way switch: `auto` lets the run decide (each field says how), true and false decide for it. YAML and
# the command line turn true/false into booleans, which reach a str field as True/False: any case is taken.
Toggle = str
TOGGLE_CHOICES = ("auto", "true", "false")


@dataclass(frozen=True)
class Rule:
    """`test(value)` must hold; `says` completes 'key=value: must ...'."""

    test: Callable[[Any], bool]
    says: str

    def check(self, key: str, value: Any) -> None:
        if not _holds(self.test, value):
            raise TransferError(f"{key}={_show(value)}: {self.says}")


@dataclass(frozen=True)
class Items:
    """A list (or a map's values) whose length is one of `lengths` (None: any) and whose items obey `item`."""

    item: Rule | None = None
    lengths: tuple[int, ...] | None = None
    whole: Rule | None = None  # a rule on the list as a whole (order of a range, say)

    def check(self, key: str, value: Any) -> None:
        if self.lengths is not None and len(value) not in self.lengths:
            counts = " or ".join(map(str, self.lengths))
            raise TransferError(f"{key}={_show(value)}: must have {counts} value{'s' if self.lengths != (1,) else ''}")
        if self.item is not None:
            entries = value.items() if isinstance(value, dict) else enumerate(value)
            for index, item in entries:
                self.item.check(f"{key}.{index}" if isinstance(value, dict) else f"{key}[{index}]", item)
        if self.whole is not None:
            self.whole.check(key, value)


def rule(check: Rule | Items) -> dict[str, Rule | Items]:
    """Field metadata holding `check`: `x: float = field(default=0.0, metadata=rule(at_least(0)))`."""
    return {RULE: check}


def _holds(test: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(test(value))
    except (TypeError, ValueError):
        return False


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    return str(value)


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and math.isfinite(value)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Rule:
    """low <= value < high by default; `[0, 1)` in the message."""
    def test(value: Any) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return _finite(value) and above and below

    return Rule(test, f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def above(bound: float) -> Rule:
    return Rule(lambda value: _finite(value) and value > bound, f"must be > {bound:g}")


def at_least(bound: float) -> Rule:
    return Rule(lambda value: _finite(value) and value >= bound, f"must be >= {bound:g}")


def count_at_least(bound: int) -> Rule:
    """A whole number >= `bound` (a count: a float such as 2.0 from Python is refused too)."""
    return Rule(lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= bound,
                f"must be a whole number >= {bound}")


def whole_number(low: int, high: int, why: str) -> Rule:
    """A whole number in [low, high], `why` saying where the bounds come from."""
    return Rule(lambda value: isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
                f"must be a whole number from {low} to {high} ({why})")


def auto_or_count(bound: int) -> Rule:
    """`auto` or a whole number >= `bound` (trainer.num_workers)."""
    return Rule(lambda value: value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                                                  and value >= bound), f"must be auto or a whole number >= {bound}")


def one_of(*choices: str, case: bool = True) -> Rule:
    """A string among `choices` (case=False: any case, for flags that YAML may turn into True/False)."""
    if case:
        return Rule(lambda value: value in choices, f"must be one of {', '.join(choices)}")
    return Rule(lambda value: str(value).lower() in choices, f"must be one of {', '.join(choices)}")


def toggle() -> Rule:
    """A Toggle: auto, true or false, in any case (YAML's booleans arrive as True and False)."""
    return one_of(*TOGGLE_CHOICES, case=False)


def resolve_toggle(value: Toggle, auto: bool) -> bool:
    """A Toggle as on or off, `auto` being what the run decides for it (on CUDA, within budget, ...)."""
    return auto if is_auto(value) else str(value).lower() == "true"


def is_auto(value: Toggle) -> bool:
    """Whether a Toggle leaves the choice to the run: a forced one may deserve a warning that auto would not."""
    return str(value).lower() == "auto"


def matches(pattern: str, says: str) -> Rule:
    return Rule(lambda value: re.fullmatch(pattern, str(value)) is not None, says)


def ordered(values: Sequence[float]) -> bool:
    return list(values) == sorted(values)


def check_tree(node: Any, prefix: str = "") -> None:
    """Apply every field's rule in the dataclass tree `node`; None (unset or off) and MISSING are skipped."""
    for spec in dataclasses.fields(node):
        key, value = f"{prefix}{spec.name}", getattr(node, spec.name)
        if value is None or (isinstance(value, str) and value == MISSING):
            continue
        check = spec.metadata.get(RULE)
        if check is not None:
            check.check(key, value)
        if dataclasses.is_dataclass(value):
            check_tree(value, f"{key}.")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_tree(item, f"{key}[{index}].")


def machinery_keys(schema: type, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of the fields marked MACHINERY in the dataclass tree `schema` (a marked node covers its keys)."""
    hints = typing.get_type_hints(schema)
    keys: list[str] = []
    for spec in dataclasses.fields(schema):
        key = f"{prefix}{spec.name}"
        nested = _dataclass_in(hints[spec.name])
        if MACHINERY.items() <= spec.metadata.items():
            keys.append(key)
        elif nested is not None:
            keys.extend(machinery_keys(nested, f"{key}."))
    return tuple(keys)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names, itself or as Optional[...]; None for any other type."""
    candidates = [hint, *typing.get_args(hint)]
    return next((kind for kind in candidates if dataclasses.is_dataclass(kind)), None)
