"""Value rules for config fields, and the walk that applies them to a whole config.

A schema field carries its rule in its metadata (`field(default=..., metadata=rule(...))`,
see schema.py), so the range sits next to the field it guards. `check_tree` visits every field
of a dataclass tree and raises one TransferError naming the first bad key, its value and what
it must be. It imports neither torch nor Hydra: composition checks it before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transfer_cli.core.errors import TransferError


RULE = "rule"
MISSING = "???"  # omegaconf.MISSING: a required value not given yet (composition reports it)


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
