"""The run directory: metrics.jsonl, summary.json and curves.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record as a JSON line, flushed so a crash keeps it."""
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `records` atomically (resume drops epochs past its checkpoint)."""
    temp = run_dir / "metrics.jsonl.tmp"
    temp.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    os.replace(temp, run_dir / "metrics.jsonl")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    temp = path.with_suffix(path.suffix + ".tmp")
    temp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, path)


def stage_boundaries(records: list[dict[str, Any]]) -> list[float]:
    """Epoch positions (between epochs) where the stage changes."""
    return [
        (previous["epoch"] + current["epoch"]) / 2
        for previous, current in zip(records, records[1:])
        if previous["stage"] != current["stage"]
    ]


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, stage boundaries as dashed vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("val", "-s")):
        loss_ax.plot(epochs, [r[f"{split}/loss"] for r in records], style, label=split, markersize=3)
        acc_ax.plot(epochs, [r[f"{split}/acc1"] for r in records], style, label=split, markersize=3)
    for axis, label in ((loss_ax, "loss"), (acc_ax, "top-1 accuracy")):
        for boundary in stage_boundaries(records):
            axis.axvline(boundary, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    acc_ax.set_ylim(0, 1)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
