"""`transfer report DIR...`: one table and one plot comparing the runs found below DIRs (report_runs.py), and
each row's val accuracy epoch by epoch (report_epochs.py).

Above the table, one "Shared:" line names what every row has in common, so the columns show only what
differs; each row names its stages with the epochs it ran in each (report_figure.py draws the rows).
It reads only the files `transfer train` leaves behind, so it imports neither torch nor Hydra;
matplotlib is imported only to draw val_acc.png. A value that is not a finite number
is shown as `n/a (non-finite)` or unknown and left out of the means; CSV cells that start
like a spreadsheet formula are escaped (core/files.py: csv_cell).
"""

from __future__ import annotations

import csv
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from transfer_cli.config.checks import machinery_keys
from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import atomic_file, csv_cell, write_text
from transfer_cli.core.tables import markdown
from transfer_cli.runs.report_epochs import epochs_table
from transfer_cli.runs.report_figure import curve, plot_val_acc
from transfer_cli.runs.report_runs import NON_FINITE, Run, find_run_dirs, load_runs


SEED = "trainer.seed"
# Keys that name a config group's choice: their siblings follow from the choice.
IDENTITY_LEAVES = ("name", "kind")
# Named on the "Shared:" line whenever every row has the same value, besides group choices and overridden keys.
HEADLINE = ("trainer.epochs", "transforms.image_size", "trainer.batch_size", SEED)
# metric -> (markdown header, number format)
METRICS = {
    "reported_val_acc": ("val acc (best.pt)", ".4f"),
    "selected_acc": ("chosen on (acc)", ".4f"),
    "final_val_acc": ("final val acc", ".4f"),
    "epochs": ("epochs", "g"),
    "wall_time_s": ("wall time (s)", ".1f"),
    "params_trainable": ("trainable params", ",.0f"),
}
# Counts the config fixes: "± 0" over seeds says nothing there. For measured figures it says the seeds agree.
COUNTS = {"epochs", "params_trainable"}


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

    def nonfinite(self, metric: str) -> bool:
        return any(metric in run.figures.nonfinite for run in self.runs)

    @property
    def selected_on(self) -> str:
        """Where the row's best.pt were chosen (runs/selection.py), "?" for a run that does not say."""
        return ", ".join(dict.fromkeys(run.selected_on or "?" for run in self.runs))

    @property
    def names(self) -> str:
        return ", ".join(run.name for run in self.runs)

    @property
    def rates(self) -> str:
        """Each distinct sequence of stage rates (peak / mean lr) of the row's runs."""
        return ", ".join(dict.fromkeys(run.rates for run in self.runs))

    @property
    def stages(self) -> str:
        """Each distinct stage sequence of the row's runs (seeds stopped early at different epochs differ)."""
        return ", ".join(dict.fromkeys(stage_changes(run) for run in self.runs))

    def label(self, keys: list[str]) -> str:
        """The row in the figure's legend: its differing values, keyed by their last name (`strategy=fine_tune`)."""
        return ", ".join(f"{_short(key)}={self.key_value(key)}" for key in keys if key != SEED) or self.names

    def note(self, keys: list[str]) -> str:
        """What the legend adds to a row's label: its seeds and, for a run that did not finish, its status."""
        seeds = [f"n={len(self.runs)}"] if len(self.runs) > 1 else [f"seed {self.key_value(SEED)}"] * (SEED in keys)
        return ", ".join(seeds + [self.status] * (self.status != "finished"))


def _titled(row: Row, keys: list[str]) -> str:
    """The row as epochs.md names it: its legend label and note (`strategy=fine_tune (n=3)`), or its runs where
    nothing but the seed tells the rows apart (`runs 0, 1, 2 (n=3)`)."""
    label, note = row.label(keys), row.note(keys)
    label = f"runs {label}" if label == row.names else label
    return f"{label} ({note})" if note else label


def _short(key: str) -> str:
    """strategy.name -> strategy, strategy.lr -> lr: a legend names the choice, the table the full key."""
    parts = key.split(".")
    return parts[-2] if parts[-1] in IDENTITY_LEAVES and len(parts) > 1 else parts[-1]


def stage_changes(run: Run) -> str:
    """The stages a run went through with the epochs it ran in each, from its metrics: `head 3 → all 5`;
    '-' without epochs or stage names."""
    spans: list[list] = []
    for record in run.records:
        if record["stage"] is None:
            return "-"
        if not spans or spans[-1][0] != record["stage"]:
            spans.append([record["stage"], 0])
        spans[-1][1] += 1
    return " → ".join(f"{name} {epochs}" for name, epochs in spans) or "-"


# how a run was carried out, not what it is (the schema's fields marked MACHINERY): never a difference between
# experiments
MACHINERY = machinery_keys(TrainConfig)


def is_machinery(key: str) -> bool:
    """Whether the flat config key `key` is a MACHINERY field or lies below one (logger.mlflow.experiment)."""
    return any(key == marked or key.startswith(f"{marked}.") for marked in MACHINERY)


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run that has a config (the machinery left out)."""
    configs = [run.config for run in runs if run.config]
    keys = list(dict.fromkeys(key for config in configs for key in config if not is_machinery(key)))
    return [key for key in keys if len({config.get(key) for config in configs}) > 1]


def overridden_keys(runs: list[Run]) -> set[str]:
    """The config keys any run's command line set (Hydra's overrides.yaml)."""
    return {o.split("=", 1)[0].lstrip("+~") for run in runs for o in run.overrides}


def shown_keys(runs: list[Run], keys: list[str]) -> list[str]:
    """Drop keys implied by a group choice (strategy.lr when strategy.name differs) unless overridden."""
    overridden = overridden_keys(runs)
    identities = {key.rsplit(".", 1)[0] for key in keys if key.rsplit(".", 1)[-1] in IDENTITY_LEAVES}

    def implied(key: str) -> bool:
        parents = [key[:i] for i, char in enumerate(key) if char == "."]
        return any(p in identities for p in parents) and key.rsplit(".", 1)[-1] not in IDENTITY_LEAVES

    return [key for key in keys if key in overridden or not implied(key)]


def shared_keys(runs: list[Run]) -> dict[str, str]:
    """What every run that has a config holds with one value, as far as it says what the experiment is: group
    choices (backbone.name, dataset.name, ...), keys a command line set, and HEADLINE (epochs, image size, ...);
    the machinery left out."""
    configs = [run.config for run in runs if run.config]
    overridden = overridden_keys(runs)
    return {key: value for key, value in (configs[0] if configs else {}).items()
            if not is_machinery(key) and all(config.get(key) == value for config in configs)
            and (key in HEADLINE or key in overridden or ("." in key and key.rsplit(".", 1)[1] in IDENTITY_LEAVES))}


# per-row columns that leave the table for the "Shared:" line where every row has the same: Row attribute -> title
ROW_COLUMNS = {"stages": "stages", "rates": "lr peak / mean"}


def common_columns(rows: list[Row]) -> dict[str, str]:
    """The ROW_COLUMNS every row has alike (attribute -> value), which then leave the table for the "Shared:" line."""
    common = {}
    for attribute in ROW_COLUMNS:
        values = {getattr(row, attribute) for row in rows}
        if len(values) == 1:
            common[attribute] = values.pop()
    return common


def shared_line(runs: list[Run], common: dict[str, str]) -> str:
    """`Shared: backbone.name=..., dataset.name=..., stages=head 3 → all 5`: what the table leaves out because
    every row has it ('' when nothing is shared)."""
    shared = [f"{key}={value}" for key, value in shared_keys(runs).items()]
    shared += [f"{ROW_COLUMNS[attribute]}={value}" for attribute, value in common.items() if value != "-"]
    return f"Shared: {', '.join(shared)}" if shared else ""


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


def _format(row: Row, metric: str, spec: str) -> str:
    """mean ± sample std over a row's seeds (± 0.0000 too: seeds that agree exactly), the value alone for one run;
    NON_FINITE where the only values are NaN or infinite, "-" where there is none."""
    mean, std = mean_std(row.values(metric))
    if mean is None:
        return NON_FINITE if row.nonfinite(metric) else "-"
    if std is None or (metric in COUNTS and std == 0):
        text = f"{mean:{spec}}"
    else:
        text = f"{mean:{spec}} ± {std:{spec}}"
    if metric == "selected_acc":
        return f"{row.selected_on}: {text}"
    if metric == "reported_val_acc" and "val" in row.selected_on.split(", "):
        return f"{text} (selected on val)"
    return text


def markdown_table(rows: list[Row], keys: list[str], common: dict[str, str] | None = None) -> str:
    """The table for people: formatted numbers, only the keys that tell the rows apart (and the stages and their
    rates, unless every row has the same: `common`)."""
    columns = [attribute for attribute in ROW_COLUMNS if attribute not in (common or {})]
    header = [*keys, *(ROW_COLUMNS[c] for c in columns), "n", *(title for title, _ in METRICS.values()),
              "status", "run"]
    return markdown(header, [[*(row.key_value(k) for k in keys), *(getattr(row, c) for c in columns),
                              str(len(row.runs)), *(_format(row, m, spec) for m, (_, spec) in METRICS.items()),
                              row.status, row.names] for row in rows])


def write_csv(path: Path, rows: list[Row], keys: list[str]) -> None:
    """Raw numbers (mean and sample std of the finite values per metric) and every differing key, for further
    analysis; text that starts like a spreadsheet formula is escaped."""
    stats = [column for metric in METRICS for column in (metric, f"{metric}_std")]
    with atomic_file(path) as file:
        writer = csv.writer(file)
        writer.writerow([*keys, "stages", "lr_peak_mean", "n", *stats, "selected_on", "status", "runs"])
        for row in rows:
            numbers = [value for metric in METRICS for value in mean_std(row.values(metric))]
            writer.writerow([*(csv_cell(row.key_value(k)) for k in keys), csv_cell(row.stages), csv_cell(row.rates),
                             len(row.runs),
                             *("" if v is None else v for v in numbers), row.selected_on,
                             csv_cell(row.status), csv_cell(row.names)])


def build_report(paths: list[Path], out: Path) -> tuple[str, list[str]]:
    """Find and read the runs, write results.md, results.csv, epochs.md and val_acc.png into `out`; return the
    table with its "Shared:" line and the notes under it in results.md: how repeated runs are shown, the values
    not shown as read, then the unreadable runs."""
    runs, unreadable = load_runs(find_run_dirs(paths))
    keys = differing_keys(runs)
    shown = shown_keys(runs, keys)
    rows = group_rows(runs, keys)
    base = Path(os.path.commonpath([run.path.resolve().parent for run in runs]))
    for run in runs:
        run.name = run.path.resolve().relative_to(base).as_posix()
    common = common_columns(rows)
    shared = shared_line(runs, common)
    table = (f"{shared}\n\n" if shared else "") + markdown_table(rows, shown, common)
    repeats = repeat_note(rows)
    warnings = [note for run in runs for note in run.figures.notes]
    try:
        out.mkdir(parents=True, exist_ok=True)
        skipped = "".join(f"\n- {line}" for line in unreadable)
        odd = "".join(f"\n- {line}" for line in warnings)
        write_text(out / "results.md", table + "\n" + (f"\n{repeats}\n" if repeats else "")
                   + (f"\nValues not shown as read:{odd}\n" if odd else "")
                   + (f"\nUnreadable runs, not reported:{skipped}\n" if skipped else ""))
        write_csv(out / "results.csv", rows, keys)
        write_text(out / "epochs.md", epochs_table([(_titled(row, shown), row.runs) for row in rows]) + "\n")
        plot_val_acc(out / "val_acc.png", [curve(row.runs, row.label(shown), row.note(shown)) for row in rows])
    except OSError as error:
        raise TransferError(f"cannot write the report into {out}: {error.strerror or error}") from error
    return table, ([f"note: {repeats}"] * bool(repeats) + [f"warning: {line}" for line in warnings]
                   + [f"skipped an unreadable run: {line}" for line in unreadable])


