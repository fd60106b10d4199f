"""`transfer report DIR...`: one table and one plot comparing the runs found below DIRs.

It reads only the files `transfer train` leaves behind, so it imports neither torch nor
Hydra; matplotlib is imported only to draw val_acc.png.
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import atomic_file, write_text
from transfer_cli.core.plotting import pyplot, save_figure
from transfer_cli.core.tables import markdown
from transfer_cli.runs import runlog
from transfer_cli.runs.loggers import flatten
from transfer_cli.runs.rundir import read_summary


SEED = "trainer.seed"
# Keys that name a config group's choice: their siblings follow from the choice.
IDENTITY_LEAVES = ("name", "kind")
# metric -> (markdown header, number format)
METRICS = {
    "best_val_acc": ("best val acc", ".4f"),
    "final_val_acc": ("final val acc", ".4f"),
    "epochs": ("epochs", "g"),
    "wall_time_s": ("wall time (s)", ".1f"),
    "params_trainable": ("trainable params", ",.0f"),
}
# Counts the config fixes: "± 0" over seeds says nothing there. For measured figures it says the seeds agree.
COUNTS = {"epochs", "params_trainable"}


@dataclass
class Run:
    """One run directory, read once."""

    path: Path
    config: dict[str, str]
    overrides: list[str]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    name: str = ""  # its path relative to the folder all reported runs share
    repeat_of: "Run | None" = None  # an earlier run with the same config and seed: not another seed

    @property
    def status(self) -> str:
        if self.summary is not None:
            return "finished"
        return "unfinished" if self.records else "failed"

    @property
    def metrics(self) -> dict[str, float | None]:
        """Figures from summary.json; an unfinished run still shows what its epochs reached."""
        if self.summary is not None:
            trainable = self.summary.get("params_trainable") or {}
            get = self.summary.get
            return {"best_val_acc": get("best_val_acc"), "final_val_acc": get("final_val_acc"),
                    "epochs": get("epochs_run"), "wall_time_s": get("wall_time_s"),
                    "params_trainable": max(trainable.values(), default=None)}
        accs = [record["val/acc1"] for record in self.records if "val/acc1" in record]
        return {"best_val_acc": max(accs, default=None), "final_val_acc": accs[-1] if accs else None,
                "epochs": len(self.records) or None, "wall_time_s": None, "params_trainable": None}


@dataclass
class Row:
    """Runs that differ only in their seed (finished ones, one per seed), or a single run."""

    runs: list[Run] = field(default_factory=list)

    @property
    def status(self) -> str:
        first = self.runs[0]
        return f"repeat of {first.repeat_of.name}" if first.repeat_of is not None else first.status

    def key_value(self, key: str) -> str:
        return ", ".join(dict.fromkeys(run.config.get(key, "-") for run in self.runs))

    def values(self, metric: str) -> list[float]:
        return [value for run in self.runs if (value := run.metrics[metric]) is not None]

    @property
    def names(self) -> str:
        return ", ".join(run.name for run in self.runs)


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

    A damaged file is a TransferError naming it (metrics.jsonl: runlog drops a torn last line).
    """
    resolved = path / "config.yaml"
    config = _load_yaml(resolved if resolved.is_file() else path / ".hydra" / "config.yaml", dict) or {}
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml", list) or []
    summary_path = path / "summary.json"
    summary = read_summary(summary_path) if summary_path.is_file() else None
    flat = {key: value if isinstance(value, str) else json.dumps(value, allow_nan=False)
            for key, value in flatten(config, sep=".").items()}  # comparable strings
    return Run(path, flat, [str(o) for o in overrides], runlog.read_metrics(path), summary)


def _load_yaml(path: Path, kind: type) -> Any:
    """The parsed file (a `kind`), None where it is missing or empty."""
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TransferError(f"{path} is not valid YAML: {error}".replace("\n", " ")) from error
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


# how a run was carried out, not what it is: never a difference between experiments
MACHINERY = ("logger", "trainer.num_workers", "trainer.device", "trainer.cache_dir", "trainer.cache_features",
             "trainer.log_every", "trainer.checkpoint_every_steps", "dataset.cache_images", "dataset.cache_budget_mb",
             "dataset.download", "trainer.normalize_on_device")


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run that has a config (the machinery left out)."""
    configs = [run.config for run in runs if run.config]
    keys = list(dict.fromkeys(key for config in configs for key in config if not key.startswith(MACHINERY)))
    return [key for key in keys if len({config.get(key) for config in configs}) > 1]


def shown_keys(runs: list[Run], keys: list[str]) -> list[str]:
    """Drop keys implied by a group choice (strategy.lr when strategy.name differs) unless overridden."""
    overridden = {o.split("=", 1)[0].lstrip("+~") for run in runs for o in run.overrides}
    identities = {key.rsplit(".", 1)[0] for key in keys if key.rsplit(".", 1)[-1] in IDENTITY_LEAVES}

    def implied(key: str) -> bool:
        parents = [key[:i] for i, char in enumerate(key) if char == "."]
        return any(p in identities for p in parents) and key.rsplit(".", 1)[-1] not in IDENTITY_LEAVES

    return [key for key in keys if key in overridden or not implied(key)]


def group_rows(runs: list[Run], keys: list[str]) -> list[Row]:
    """Finished runs whose configs differ only in trainer.seed share a row, one run per seed, so `n` counts
    seeds; a run with the config and seed of one already in its row (a repeat) and any other run stand alone."""
    rows: dict[tuple[str | None, ...], Row] = {}
    for run in runs:
        ident: tuple[str | None, ...] = (run.status, str(run.path))
        if run.status == "finished" and run.config:
            shared = (run.status, *(run.config.get(key) for key in keys if key != SEED))
            seed = run.config.get(SEED)
            same_seed = [other for other in rows.get(shared, Row()).runs if other.config.get(SEED) == seed]
            if same_seed:
                run.repeat_of = same_seed[0]
            else:
                ident = shared
        rows.setdefault(ident, Row()).runs.append(run)
    return list(rows.values())


def repeat_note(rows: list[Row]) -> str:
    """The line under the table that says how repeated runs are shown ('' when there are none)."""
    repeats = sum(1 for row in rows if row.runs[0].repeat_of is not None)
    if not repeats:
        return ""
    return (f"{repeats} run(s) repeat the config and trainer.seed of an earlier run: each has a row of its own "
            "(status 'repeat of RUN') and is not counted in n, which counts distinct seeds.")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _format(values: list[float], spec: str, count: bool = False) -> str:
    """mean ± sample std over a row's seeds (± 0.0000 too: seeds that agree exactly), the value alone for one run."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:{spec}}" if std is None or (count and std == 0) else f"{mean:{spec}} ± {std:{spec}}"


def markdown_table(rows: list[Row], keys: list[str]) -> str:
    """The table for people: formatted numbers, only the keys that tell the rows apart."""
    header = [*keys, "n", *(title for title, _ in METRICS.values()), "status", "run"]
    return markdown(header, [[*(row.key_value(k) for k in keys), str(len(row.runs)),
                              *(_format(row.values(m), spec, m in COUNTS) for m, (_, spec) in METRICS.items()),
                              row.status, row.names] for row in rows])


def write_csv(path: Path, rows: list[Row], keys: list[str]) -> None:
    """Raw numbers (mean and sample std per metric) and every differing key, for further analysis."""
    stats = [column for metric in METRICS for column in (metric, f"{metric}_std")]
    with atomic_file(path) as file:
        writer = csv.writer(file)
        writer.writerow([*keys, "n", *stats, "status", "runs"])
        for row in rows:
            numbers = [value for metric in METRICS for value in mean_std(row.values(metric))]
            writer.writerow([*(row.key_value(k) for k in keys), len(row.runs),
                             *("" if v is None else v for v in numbers),
                             row.status, row.names])


def plot_val_acc(path: Path, runs: list[Run], keys: list[str]) -> None:
    """Val accuracy per epoch, one line per run; its stage boundaries dotted in the line's colour."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(9, 5), layout="constrained")  # room for the legend beside the plot
    for run in runs:
        points = [(r["epoch"], r["val/acc1"]) for r in run.records if "val/acc1" in r]
        if not points:
            continue
        label = " ".join(f"{key}={run.config.get(key, '-')}" for key in keys) or run.name
        (line,) = axis.plot(*zip(*points), "-o", markersize=3, label=f"{label} ({run.status})")
        for boundary in runlog.stage_boundaries(run.records):
            axis.axvline(boundary, color=line.get_color(), linestyle=":", linewidth=1)
    axis.set(xlabel="epoch", ylabel="val top-1 accuracy", ylim=(0, 1), title="val accuracy (dotted: stage changes)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    if axis.lines:  # beside the plot, never over its lines; long labels wrap instead of clipping
        handles, labels = axis.get_legend_handles_labels()
        axis.legend(handles, [textwrap.fill(label, 40) for label in labels], fontsize="small", loc="upper left",
                    bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    save_figure(figure, path)


def build_report(paths: list[Path], out: Path) -> tuple[str, list[str]]:
    """Find and read the runs, write results.md, results.csv and val_acc.png into `out`; return the
    table and the notes under it in results.md: how repeated runs are shown, then the unreadable runs."""
    runs, unreadable = load_runs(find_run_dirs(paths))
    keys = differing_keys(runs)
    shown = shown_keys(runs, keys)
    rows = group_rows(runs, keys)
    base = Path(os.path.commonpath([run.path.resolve().parent for run in runs]))
    for run in runs:
        run.name = run.path.resolve().relative_to(base).as_posix()
    table = markdown_table(rows, shown)
    repeats = repeat_note(rows)
    try:
        out.mkdir(parents=True, exist_ok=True)
        skipped = "".join(f"\n- {line}" for line in unreadable)
        write_text(out / "results.md", table + "\n" + (f"\n{repeats}\n" if repeats else "")
                   + (f"\nUnreadable runs, not reported:{skipped}\n" if skipped else ""))
        write_csv(out / "results.csv", rows, keys)
        plot_val_acc(out / "val_acc.png", runs, shown)
    except OSError as error:
        raise TransferError(f"cannot write the report into {out}: {error.strerror or error}") from error
    return table, [f"note: {repeats}"] * bool(repeats) + [f"skipped an unreadable run: {line}" for line in unreadable]


