"""Which epoch a run keeps as best.pt, and the val number reported for it.

The best epoch is chosen on the selection split (dataset.select_fraction, held out of train) where the run has one,
so the val top-1 reported for best.pt was not also used to choose it; without one it is chosen on val itself, and
its val number is the maximum over epochs: optimistic, and said so wherever it is shown.
"""

from __future__ import annotations

import math
from typing import Any


def selected_on(record: dict[str, Any]) -> str:
    """The split an epoch record chooses on: the selection split where the run holds one out, else val."""
    return "select" if "select/acc1" in record else "val"


def beats(record: dict[str, Any], best_acc: float, best_loss: float | None) -> bool:
    """Whether an epoch beats the best so far on its selection split: higher top-1, or the same top-1 at a lower
    loss (a selection split of a few dozen images ties often; the loss still tells them apart)."""
    split = selected_on(record)
    acc, loss = record[f"{split}/acc1"], record[f"{split}/loss"]
    return acc > best_acc or (acc == best_acc and best_loss is not None and loss < best_loss)


def best_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record of the epoch `fit` keeps as best.pt (the first of equals), among records whose selection figures
    are finite numbers; None where there is none."""
    best: dict[str, Any] | None = None
    for record in records:
        split = selected_on(record)
        figures = (record.get(f"{split}/acc1"), record.get(f"{split}/loss"))
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in figures):
            continue
        if best is None or beats(record, best[f"{split}/acc1"], best[f"{split}/loss"]):
            best = record
    return best


def label(selected: str) -> str:
    """How a reported number says where its checkpoint was chosen."""
    return "selected on the selection split" if selected == "select" else "selected on val: optimistic"
