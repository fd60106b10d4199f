"""val_acc.png of `transfer report`: one colour per row of the table, so the figure reads beside it.

A row's seeds are drawn as their mean val accuracy per epoch with a band from the lowest to the
highest seed (min-max: with two or three seeds a standard deviation says little); a row of one
run is its plain line. A vertical tick on a line marks the epoch where one of its stages starts.
The legend lies below the plot, one entry per row (at most LEGEND_MAX), its labels shortened
(the table holds the full text), and the figure grows with it, so no label is clipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer_cli.core.plotting import pyplot, save_figure
from transfer_cli.runs.report_runs import Run


LEGEND_MAX = 16  # legend entries; more rows end it with one entry that points to the table
LEGEND_COLUMNS = 2
LABEL_CHARS = 50  # a longer label is cut with "…"
WIDTH_IN, PLOT_HEIGHT_IN, LEGEND_LINE_IN = 10.0, 4.8, 0.26


@dataclass(frozen=True)
class Curve:
    """What one row draws: its mean val accuracy per epoch, the seeds' band (None for one run), and the epochs
    where a stage starts."""

    label: str  # the row's values, cut to fit the legend
    note: str  # kept whole after the label: n=3, seed 0, unfinished
    epochs: list[int]
    mean: list[float]
    band: tuple[list[float], list[float]] | None
    stage_starts: list[int]


def curve(runs: Sequence[Run], label: str, note: str = "") -> Curve:
    """The mean, lowest and highest finite val/acc1 of `runs` at each epoch every one of them reached (a mean over
    fewer seeds at some epochs would be a different mean); stage starts from the first run with stage names."""
    per_run = [{r["epoch"]: r["val/acc1"] for r in run.records if math.isfinite(r.get("val/acc1", math.nan))}
               for run in runs]
    epochs = sorted(set.intersection(*(set(values) for values in per_run))) if per_run else []
    columns = [[values[epoch] for values in per_run] for epoch in epochs]
    band = ([min(c) for c in columns], [max(c) for c in columns]) if len(runs) > 1 else None
    staged = next((run.records for run in runs if run.records and run.records[0]["stage"] is not None), [])
    starts = [cur["epoch"] for prev, cur in zip(staged, staged[1:]) if prev["stage"] != cur["stage"]]
    return Curve(label, note, epochs, [sum(c) / len(c) for c in columns], band, starts)


def legend_labels(curves: list[Curve]) -> list[str]:
    """Each label cut to LABEL_CHARS, its note kept whole; where two cut labels would read the same, the full ones."""
    def cut(text: str) -> str:
        return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1].rstrip() + "…"

    def noted(text: str, note: str) -> str:
        return f"{text} ({note})" if note else text

    full = [noted(c.label, c.note) for c in curves]
    short = [noted(cut(c.label), c.note) for c in curves]
    return short if len(set(short)) == len(set(full)) else full


def plot_val_acc(path: Path, curves: list[Curve]) -> None:
    """Each row's curve in its own colour, its stage starts ticked, the legend below the plot."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    drawn = [c for c in curves if c.epochs]
    entries = min(len(drawn), LEGEND_MAX)
    lines = math.ceil(entries / LEGEND_COLUMNS)
    figure = plt.figure(figsize=(WIDTH_IN, PLOT_HEIGHT_IN + LEGEND_LINE_IN * lines), layout="constrained")
    axis = figure.subplots()
    palette = plt.get_cmap("tab10" if len(drawn) <= 10 else "tab20").colors
    handles: list[Any] = []
    for index, c in enumerate(drawn):
        colour = palette[index % len(palette)]
        (line,) = axis.plot(c.epochs, c.mean, "-o", color=colour, markersize=3)
        handles.append(line)
        if c.band is not None:
            handles[-1] = (line, axis.fill_between(c.epochs, *c.band, color=colour, alpha=0.2, linewidth=0))
        ticks = [(epoch, mean) for epoch, mean in zip(c.epochs, c.mean) if epoch in c.stage_starts]
        if ticks:
            axis.plot(*zip(*ticks), linestyle="none", marker="|", markersize=14, markeredgewidth=2, color=colour)
    axis.set(xlabel="epoch", ylabel="val top-1 accuracy", ylim=(0, 1),
             title="val accuracy: mean over seeds, band min–max; | a stage starts")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    if drawn:
        labels = legend_labels(drawn)
        if len(drawn) > LEGEND_MAX:  # the last entry names what the legend leaves out
            handles = [*handles[:LEGEND_MAX - 1], Line2D([], [], linestyle="none")]
            labels = [*labels[:LEGEND_MAX - 1], f"and {len(drawn) - LEGEND_MAX + 1} more rows: see results.md"]
        figure.legend(handles, labels, loc="outside lower center", ncols=min(LEGEND_COLUMNS, entries),
                      fontsize="small", frameon=False)
    save_figure(figure, path)
