"""`epochs.md` of `transfer report`: each row's val top-1 epoch by epoch, for the text beside a figure.

A row's seeds are read side by side: the mean ± sample std at each epoch, then every run's own value in
the order the row names its runs, so a reader sees both the trend and whether every seed follows it. Values
that are missing or not finite (report_runs.Figures) are left out of the mean and shown as "-".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from transfer_cli.core.tables import markdown
from transfer_cli.runs.report_runs import Run


HEADER = ["row", "epoch", "stage", "val acc (mean ± std)", "each run"]


def _acc(record: dict[str, Any] | None) -> float | None:
    value = (record or {}).get("val/acc1")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def epoch_rows(label: str, runs: Sequence[Run]) -> list[list[str]]:
    """One line per epoch any of `runs` recorded: its stage(s), the mean ± std and each run's value."""
    by_epoch = [{record.get("epoch"): record for record in run.records} for run in runs]
    epochs = sorted({epoch for records in by_epoch for epoch in records if isinstance(epoch, int)})
    lines = []
    for epoch in epochs:
        records = [records.get(epoch) for records in by_epoch]
        stages = ", ".join(dict.fromkeys(str(record.get("stage") or "?") for record in records if record))
        values = [_acc(record) for record in records]
        each = " / ".join("-" if value is None else f"{value:.3f}" for value in values)
        lines.append([label, str(epoch), stages, _mean_std([v for v in values if v is not None]), each])
    return lines


def epochs_table(rows: Sequence[tuple[str, Sequence[Run]]]) -> str:
    """The markdown table of every (label, runs) row, epoch by epoch."""
    return markdown(HEADER, [line for label, runs in rows for line in epoch_rows(label, runs)])
