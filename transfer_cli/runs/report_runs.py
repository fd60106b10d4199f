"""The runs a report compares: found below the given folders and read from the files `transfer train` leaves.

A run's status is its own (summary.json's: finished, or failed where a non-finite loss
stopped it; unfinished, or failed, for a run without one). Those files may have been edited
by hand: a value that is no number is shown as unknown, NaN or an infinity as
`n/a (non-finite)` and left out of the means and the plot, each with a warning line naming
the file and key; a damaged file is one line naming it, and a report is never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transfer_cli.config.loading import check_bounded_yaml
from transfer_cli.core.errors import TransferError
from transfer_cli.runs import runlog
from transfer_cli.runs.loggers import flatten
from transfer_cli.runs.rundir import read_summary
from transfer_cli.runs.selection import best_record, selected_on


# metric -> its summary.json key (params_trainable: per stage)
SUMMARY_KEYS = {"reported_val_acc": "reported_val_acc", "selected_acc": "selected_acc",
                "final_val_acc": "final_val_acc", "epochs": "epochs_run", "wall_time_s": "wall_time_s"}
SELECTED_ON = ("select", "val")
READ = ("val/acc1", "val/loss", "select/acc1", "select/loss")  # what the report reads of an epoch record
NON_FINITE = "n/a (non-finite)"
STATUS = re.compile(r"[\w-]+( [\w-]+){0,3}")  # a run status is a word or a few


@dataclass
class Figures:
    """A run's figures as the report shows them: finite numbers (None: unknown), the metrics whose value is NaN or
    an infinity, and a note for each value not shown as read, naming its file and key."""

    values: dict[str, float | None] = field(default_factory=dict)
    nonfinite: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def number(self, value: Any, where: str, metric: str) -> float | None:
        if value is None:
            return None
        if not _is_number(value):
            self.notes.append(f"{where} is {_shown(value)}, not a number: shown as unknown")
            return None
        if not math.isfinite(value):
            self.notes.append(f"{where} is {value}: shown as {NON_FINITE}, left out of the means")
            self.nonfinite.add(metric)
            return None
        return value


@dataclass
class Run:
    """One run directory, read once."""

    path: Path
    config: dict[str, str]
    overrides: list[str]
    records: list[dict[str, Any]]  # epoch, stage (None: unknown) and, where it has one, val/acc1 of each epoch
    status: str  # the run's own: summary.json's (finished, failed), or unfinished/failed without one
    figures: Figures
    selected_on: str | None = None  # the split best.pt was chosen on (runs/selection.py); None: unknown
    rates: str = "-"  # each stage's peak / mean lr as its steps ran (stage_rates)
    name: str = ""  # its path relative to the folder all reported runs share
    repeat_of: "Run | None" = None  # an earlier run with the same config and seed: not another seed

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.figures.values


def is_run_dir(path: Path) -> bool:
    """Hydra writes .hydra/ into every run, even one that died before its first epoch."""
    has_results = (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()
    return (path / ".hydra").is_dir() or ((path / "config.yaml").is_file() and has_results)


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Every run directory at or below `paths`, each once, in natural order."""
    seen: set[Path] = set()
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise TransferError(f"{path} does not exist")
        if not path.is_dir():
            raise TransferError(f"{path} is not a directory")
        found.extend(_walk(path, seen))
    if not found:
        raise TransferError(f"no run directories under {', '.join(map(str, paths))} "
                            "(a run directory holds .hydra/, or config.yaml with metrics.jsonl or summary.json)")
    return found


def run_dirs_under(root: Path) -> list[Path]:
    """The run directories at or below `root` (none where it does not exist): what a RUN_DIR argument completes
    to."""
    return list(_walk(root, set())) if root.is_dir() else []


def _walk(path: Path, seen: set[Path]) -> Iterator[Path]:
    if (resolved := path.resolve()) in seen:  # the same dir given twice, or a symlink loop
        return
    seen.add(resolved)
    if is_run_dir(path):
        yield path
        return
    try:
        children = sorted((c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_natural)
    except PermissionError:
        return
    for child in children:
        yield from _walk(child, seen)


def _natural(path: Path) -> list[Any]:
    """Sort key that puts sweep job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_run(path: Path) -> Run:
    """Read a run dir; a config missing from config.yaml falls back to the composed .hydra/config.yaml.

    A damaged file is a TransferError naming it (metrics.jsonl: runlog drops a torn last line); a
    value of the wrong type, or NaN, is a note (see Figures).
    """
    resolved = path / "config.yaml"
    config = _load_yaml(resolved if resolved.is_file() else path / ".hydra" / "config.yaml", dict) or {}
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml", list) or []
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    summary = read_summary(summary_path) if os.path.lexists(summary_path) else None  # a folder, a FIFO: one line
    try:
        raw = runlog.read_metrics(path)
    except OSError as error:
        raise TransferError(f"cannot read {metrics_path}: {error.strerror or error}") from error
    figures = Figures()
    records = _checked_records(metrics_path, raw, figures.notes)
    if summary is None:
        selected = _figures_of_epochs(records, figures)
        status = "unfinished" if records else "failed"
    else:
        selected = _figures_of_summary(summary, summary_path, figures)
        status = _status(summary, summary_path, figures.notes)
    flat = {key: value if isinstance(value, str) else json.dumps(value, default=str)
            for key, value in flatten(config, sep=".").items()}  # comparable strings
    return Run(path, flat, [str(o) for o in overrides], records, status, figures, selected, stage_rates(summary))


def stage_rates(summary: dict[str, Any] | None) -> str:
    """Each stage's peak and mean lr as its steps ran (summary.json's stages: peak_lrs, mean_lrs; a range where
    its groups ran at different rates): `1.0e-03 / 4.8e-04 → 1.0e-04 / 4.9e-05`. A OneCycle stage's mean is about
    half its peak: a bare "lr" says neither. '-' where the summary does not hold them as numbers."""
    stages = summary.get("stages") if summary else None
    if not isinstance(stages, list):
        return "-"
    shown = []
    for stage in stages:
        peak, mean = (stage.get(key) if isinstance(stage, dict) else None for key in ("peak_lrs", "mean_lrs"))
        if peak is None and mean is None:  # a stage the run never reached
            continue
        if not (isinstance(peak, dict) and isinstance(mean, dict)):
            return "-"
        shown.append(f"{_span(peak)} / {_span(mean)}")
    return " → ".join(shown) or "-"


def _span(lrs: dict[str, Any]) -> str:
    values = [value for value in lrs.values() if runlog.is_float(value) and math.isfinite(value) and value > 0]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{high:.1e}" if low == high else f"{low:.1e}–{high:.1e}"


def _is_number(value: Any) -> bool:
    """A JSON number a float holds: NaN and infinities are numbers (flagged), an integer past 1e308 is not."""
    return runlog.is_float(value) or (isinstance(value, float) and not math.isfinite(value))


def _shown(value: Any) -> str:
    """A value of the wrong type in a note: short, with its type."""
    text = repr(value)
    return f"{text[:40]}{'...' if len(text) > 40 else ''} (a {type(value).__name__})"


def _status(summary: dict[str, Any], file: Path, notes: list[str]) -> str:
    """summary.json's status; a summary without one is shown as unknown, with a note."""
    if "status" not in summary:
        notes.append(f"{file}: no status: shown as unknown")
        return "unknown"
    status = summary["status"]
    if isinstance(status, str) and STATUS.fullmatch(status):
        return status
    notes.append(f"{file}: status is {_shown(status)}, not a run status: shown as unknown")
    return "unknown"


def _figures_of_summary(summary: dict[str, Any], file: Path, figures: Figures) -> str | None:
    """The figures summary.json holds (params_trainable: the largest per-stage count); returns the split its best
    epoch was chosen on."""
    for metric, key in SUMMARY_KEYS.items():
        figures.values[metric] = figures.number(summary.get(key), f"{file}: {key}", metric)
    trainable = summary.get("params_trainable") or {}
    if not isinstance(trainable, dict):
        figures.notes.append(f"{file}: params_trainable is {_shown(trainable)}, not counts per stage: shown as unknown")
        trainable = {}
    counts = [figures.number(count, f"{file}: params_trainable/{stage}", "params_trainable")
              for stage, count in trainable.items()]
    figures.values["params_trainable"] = max((count for count in counts if count is not None), default=None)
    selected = summary.get("selected_on")
    if selected not in SELECTED_ON:
        figures.notes.append(f"{file}: selected_on is {_shown(selected)}, not one of {', '.join(SELECTED_ON)}: "
                             "where best.pt was chosen is shown as unknown")
        return None
    return selected


def _figures_of_epochs(records: list[dict[str, Any]], figures: Figures) -> str | None:
    """What an unfinished run's epochs reached: val at the epoch `fit` keeps as best.pt so far and its figure on
    the split it was chosen on (their notes come from `_checked_records`); returns that split."""
    accs = [record["val/acc1"] for record in records if "val/acc1" in record]
    final = accs[-1] if accs else None
    if final is not None and not math.isfinite(final):
        figures.nonfinite.add("final_val_acc")
        final = None
    best = best_record(records)
    if accs and best is None:
        figures.nonfinite.update({"reported_val_acc", "selected_acc"})
    split = selected_on(best) if best is not None else None
    reported = best.get("val/acc1") if best is not None else None
    figures.values.update({"reported_val_acc": reported if reported is not None and math.isfinite(reported) else None,
                           "selected_acc": best[f"{split}/acc1"] if best is not None else None,
                           "final_val_acc": final, "epochs": len(records) or None, "wall_time_s": None,
                           "params_trainable": None})
    return split


def _checked_records(file: Path, records: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """What the report reads of each epoch record (epoch, stage, val/acc1), checked: a val/acc1 that is no number is
    left out, a non-finite one kept for the figures but left out of the plot, and one missing or non-text stage
    leaves the run's stage boundaries undrawn; one note per kind of problem, naming the file and its first epoch."""
    problems = {
        "has a val/acc1 that is not a number: left out": [
            r["epoch"] for r in records if r.get("val/acc1") is not None and not _is_number(r["val/acc1"])],
        f"has a val/acc1 that is not finite: shown as {NON_FINITE}, left out of the means and the plot": [
            r["epoch"] for r in records if _is_number(r.get("val/acc1")) and not math.isfinite(r["val/acc1"])],
        "has no stage name: the run's stage boundaries are not drawn": [
            r["epoch"] for r in records if not isinstance(r.get("stage"), str)],
    }
    for what, epochs in problems.items():
        if epochs:
            more = f" (and {len(epochs) - 1} more)" if len(epochs) > 1 else ""
            notes.append(f"{file}: epoch {epochs[0]}{more} {what}")
    staged = not any(not isinstance(r.get("stage"), str) for r in records)
    return [{"epoch": r["epoch"], "stage": r["stage"] if staged else None,
             **{key: float(r[key]) for key in READ if _is_number(r.get(key))}} for r in records]


def _load_yaml(path: Path, kind: type) -> Any:
    """The parsed file (a `kind`), None where it is missing or empty."""
    if not path.is_file():
        return None
    try:
        check_bounded_yaml(path)  # an alias bomb would keep the report busy for ever
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TransferError(f"{path} is not valid YAML: {error}".replace("\n", " ")) from error
    except RecursionError as error:
        raise TransferError(f"{path} is nested too deeply to be a run's file") from error
    if tree is not None and not isinstance(tree, kind):
        raise TransferError(f"{path} is damaged: it holds a {type(tree).__name__}, not a {kind.__name__}")
    return tree


def load_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """Every readable run, and one line per unreadable one (its path and what is wrong), so one
    damaged run never blocks the report of the others."""
    runs, unreadable = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except TransferError as error:
            unreadable.append(f"{path}: {error}" if str(path) not in str(error) else str(error))
    if not runs:
        raise TransferError(f"no readable run among {len(paths)} run director{'y' if len(paths) == 1 else 'ies'}: "
                            f"{unreadable[0]}{' (and more)' if len(unreadable) > 1 else ''}")
    return runs, unreadable
