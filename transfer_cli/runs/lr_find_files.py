"""What `transfer lr-find` leaves in its directory: lr_find.csv (the curve), lr_find.json (the suggestion and how
the test ran), lr_find.png (the curve with the suggestion marked), and config.yaml (what ran), written last.

Such a directory holds no trained run: no checkpoint, no metrics.jsonl, no summary.json, so
`transfer report` passes it by; `transfer resume` and `transfer eval` refuse it in one line
(rundir.require_run_dir), and a new run is never started into it (runlock.refuse_if_run).
"""

from __future__ import annotations

import csv
from pathlib import Path

from transfer_cli.core.files import atomic_file
from transfer_cli.core.plotting import pyplot, save_figure


CURVE, RESULT, PLOT = "lr_find.csv", "lr_find.json", "lr_find.png"
LR_FIND_FILES = (CURVE, RESULT, PLOT)


def holds_lr_find(path: Path) -> bool:
    """Whether `path` is a directory `transfer lr-find` wrote (its lr_find.json is the mark)."""
    return (path / RESULT).exists()


def write_curve(path: Path, groups: list[str], lrs: list[dict[str, float]], losses: list[float],
                smoothed: list[float]) -> None:
    """One row per optimizer step: step (from 1), the lr of each group, the loss and its smoothed value; floats
    written as Python's repr, so they read back exactly."""
    with atomic_file(path) as file:
        writer = csv.writer(file)
        writer.writerow(["step", *(f"lr/{group}" for group in groups), "loss", "smoothed_loss"])
        for step, (step_lrs, loss, smooth) in enumerate(zip(lrs, losses, smoothed), 1):
            writer.writerow([step, *(repr(step_lrs[group]) for group in groups), repr(loss), repr(smooth)])


def plot_curve(path: Path, lrs: list[float], losses: list[float], smoothed: list[float], suggested: int,
               second_opinion_lr: float, title: str) -> None:
    """Loss against lr on a log axis: each step's loss faint, the smoothed loss bold, the suggestion (index
    `suggested`) as a dot and a line, the minimum-loss lr / 10 as a dotted line."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot(lrs, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    axis.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    lr = lrs[suggested]
    axis.axvline(lr, color="tab:red", linestyle="--", linewidth=1)
    axis.plot([lr], [smoothed[suggested]], "o", color="tab:red", label=f"steepest descent: {lr:.1e}")
    axis.axvline(second_opinion_lr, color="grey", linestyle=":", linewidth=1,
                 label=f"minimum-loss lr / 10: {second_opinion_lr:.1e}")
    axis.set_xscale("log")
    low, high = min(*losses, *smoothed), smoothed[0]  # above the start: the divergence, cut off so the descent shows
    pad = (high - low) or abs(high) or 1.0
    axis.set_ylim(low - 0.1 * pad, high + 0.5 * pad)
    axis.set_xlabel("learning rate (the stage's top group)")
    axis.set_ylabel("training loss")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)
