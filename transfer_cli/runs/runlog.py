"""The run directory: metrics.jsonl, summary.json and curves.png.

JSON has no NaN or Infinity: every writer here refuses a non-finite number instead of
writing a file strict parsers reject (a metric that can be undefined is written as null
by whoever computes it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transfer_cli.core.errors import TransferError, first_line
from transfer_cli.core.files import append_own, write_text
from transfer_cli.core.plotting import pyplot, save_figure


log = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job logging, as `transfer train`'s


def train_log(run_dir: Path) -> logging.Handler:
    """A handler appending to RUN_DIR/train.log in `transfer train`'s format, never through a symbolic link
    (NotOwnFile): for runs whose logging Hydra does not set up (`transfer resume`, the Python API)."""
    handler = logging.FileHandler(run_dir / "train.log", delay=True)
    handler.stream = append_own(run_dir / "train.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def console_handler() -> logging.Handler:
    """The package's lines on stdout, as `transfer train` prints them; stderr keeps the one line of a mistake."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] - %(message)s"))
    return handler


@contextlib.contextmanager
def package_log(handler: logging.Handler) -> Iterator[None]:
    """The package's INFO lines (stages, epochs, the feature cache) through `handler` while the block runs, on the
    package's logger alone: the caller's root logger, its handlers and its level are left as they are."""
    logger = logging.getLogger("transfer_cli")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def hub_lines_once() -> None:
    """huggingface_hub gives its logger a console handler of its own (on its first import) and lets its lines
    propagate to the root logger too: where the root has handlers (the commands' console and train.log), each
    hub line (a download's retries) printed twice. Its own handler goes, so they print once, through the root's."""
    if not logging.getLogger().handlers:
        return
    import huggingface_hub.utils.logging  # noqa: F401 - its first import adds that handler

    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        if type(handler) is logging.StreamHandler:  # its console handler, not a file a caller added
            hub.removeHandler(handler)


def _dumps(payload: Any, path: Path, **options: Any) -> str:
    """`json.dumps` that refuses NaN and infinities, naming the file and the key that holds one."""
    try:
        return json.dumps(payload, allow_nan=False, **options)
    except ValueError as error:
        raise ValueError(f"refusing to write {path}: {_nonfinite_key(payload) or 'a value'} is not a finite "
                         f"number, which JSON cannot hold") from error


def _nonfinite_key(value: Any, where: str = "") -> str | None:
    """The first key path (a/b/0) holding NaN or an infinity, None when there is none."""
    if isinstance(value, float):
        return where if not math.isfinite(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _nonfinite_key(item, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record as a JSON line, flushed so a crash keeps it; never through a symbolic link."""
    path = run_dir / "metrics.jsonl"
    line = _dumps(record, path) + "\n"
    with append_own(path) as file:
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `records` atomically (resume drops epochs past its checkpoint)."""
    path = run_dir / "metrics.jsonl"
    write_text(path, "".join(_dumps(record, path) + "\n" for record in records))


def read_metrics(run_dir: Path, complete: bool = False) -> list[dict[str, Any]]:
    """The epoch records of metrics.jsonl.

    A damaged last line is what a crash or a full disk during `append_metrics` leaves: it is
    dropped with a warning (that epoch was never checkpointed, so resume trains it again). A
    damaged line before the last one is not explained by a crash: a TransferError naming it.
    `complete` (resume) also wants in every record what the end of a run reads back (RESUMED),
    and drops only a last line cut short: a whole JSON line that is no such record was not torn.
    """
    path = run_dir / "metrics.jsonl"
    records, torn = _records(path, complete)
    if torn is not None:
        log.warning("%s: dropped its last line (line %d, %d bytes), cut short by a crash or a full disk "
                    "while it was written; that epoch was not checkpointed", path, *torn)
    return records


def check_metrics(run_dir: Path) -> None:
    """read_metrics(complete=True)'s refusals alone, for resume to make before it trains (the run itself
    drops, and reports, a torn last line)."""
    _records(run_dir / "metrics.jsonl", complete=True)


def _records(path: Path, complete: bool) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """The records of `path`, and (line number, bytes) of a torn last line dropped (None: none)."""
    if not os.path.lexists(path):
        return [], None
    if not path.is_file():  # a folder; a FIFO, which would block the read
        raise TransferError(f"{path} is not a plain file: restore the run's metrics file or start a new run")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TransferError(f"cannot read {path} ({error.strerror or first_line(error)}): restore the run's "
                            "metrics file or start a new run") from error
    lines = [(number, line) for number, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        value = _parse_record(line)
        problem = _record_problem(value, complete)
        if problem is None:
            records.append(value)
        elif position == len(lines) - 1 and (value is TORN or not complete):
            return records, (number, len(line))
        else:
            raise TransferError(f"{path} line {number} is damaged ({problem}): repair that line or start a new run")
    return records, None


TORN = object()  # a line that is not whole JSON
# what the end of a resumed run reads back from each earlier epoch (the summary, curves.png)
RESUMED = ("stage", "train/loss", "train/acc1", "train/images_per_s", "val/loss", "val/acc1")


def _parse_record(line: bytes) -> Any:
    """One metrics.jsonl line's JSON value, or TORN when the line is not whole JSON."""
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except ValueError:  # UnicodeDecodeError, JSONDecodeError and a bare NaN alike
        return TORN


def _record_problem(value: Any, complete: bool) -> str | None:
    """Why a line's value is not an epoch record (None: it is one); `complete`: one holding RESUMED too."""
    epoch = value.get("epoch") if isinstance(value, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return "not a JSON epoch record of finite numbers"
    if not complete:
        return None
    missing = [key for key in RESUMED if key not in value]
    if missing:
        return f"epoch {epoch} has no {', '.join(missing)}"
    wrong = next((key for key in RESUMED if not _fits(key, value[key])), None)
    return None if wrong is None else f"epoch {epoch}'s {wrong} is not {'text' if wrong == 'stage' else 'a number'}"


def _fits(key: str, value: Any) -> bool:
    if key == "stage":
        return isinstance(value, str)
    return is_float(value)


def is_float(value: Any) -> bool:
    """A JSON number a float holds (an integer past 1e308 does not: it would overflow where it is plotted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text(path, _dumps(payload, path, indent=2) + "\n")


def stage_boundaries(records: list[dict[str, Any]]) -> list[float]:
    """Epoch positions (between epochs) where the stage changes."""
    return [
        (previous["epoch"] + current["epoch"]) / 2
        for previous, current in zip(records, records[1:])
        if previous["stage"] != current["stage"]
    ]


def stage_spans(records: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Each stage run, in order, with the middle of its epochs (where its name goes on a plot)."""
    spans: list[tuple[str, list[int]]] = []
    for record in records:
        if not spans or spans[-1][0] != record["stage"]:
            spans.append((record["stage"], []))
        spans[-1][1].append(record["epoch"])
    return [(name, (epochs[0] + epochs[-1]) / 2) for name, epochs in spans]


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, stage boundaries as dashed vertical lines."""
    plt = pyplot()

    epochs = [r["epoch"] for r in records]
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("val", "-s")):
        loss_ax.plot(epochs, [r[f"{split}/loss"] for r in records], style, label=split, markersize=3)
        acc_ax.plot(epochs, [r[f"{split}/acc1"] for r in records], style, label=split, markersize=3)
    from matplotlib.ticker import MaxNLocator

    for axis, label in ((loss_ax, "loss"), (acc_ax, "top-1 accuracy")):
        for boundary in stage_boundaries(records):
            axis.axvline(boundary, color="grey", linestyle="--", linewidth=1)
        for name, middle in stage_spans(records):  # each stage's name above its span
            axis.annotate(name, (middle, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                          fontsize=8, color="grey")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    acc_ax.set_ylim(0, 1)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)
