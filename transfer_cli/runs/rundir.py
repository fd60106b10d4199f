"""Reading a finished or interrupted run directory back: its config, checkpoints and summary.

Every reader turns a damaged file into one TransferError line naming the file and what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer_cli.config.loading import load_run_config
from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError, first_line, torch_file_problem
from transfer_cli.runs.lr_find_files import holds_lr_find


def require_run_dir(path: str | Path) -> Path:
    """`path` as a run directory (one with config.yaml), or a one-line error saying what is wrong."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise TransferError(f"run directory '{path}' does not exist: give the directory `transfer train` printed")
    if not (run_dir / "config.yaml").is_file():
        raise TransferError(f"'{path}' is not a run directory (no config.yaml): give the directory `transfer train` "
                            "printed")
    if holds_lr_find(run_dir):  # its config.yaml is what the range test ran: nothing was trained
        raise TransferError(f"'{path}' holds an lr range test (`transfer lr-find`), not a trained run: give the "
                            "directory `transfer train` printed")
    return run_dir


def require_writable(run_dir: Path) -> None:
    """Resume writes its lock, metrics and checkpoints into the run directory: one it cannot write is refused
    before training, not after an epoch's work (a temp file without a name is made and dropped at once)."""
    import tempfile

    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            try:
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as error:
                raise TransferError(f"{folder} is not writable: {error.strerror or first_line(error)}; make it "
                                    "writable (or copy the run somewhere writable), then `transfer resume` it "
                                    "again") from error


def resume_point(run_dir: Path) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The saved config and checkpoints/last.pt (None: none saved yet), as resume and a sweep re-run load them."""
    return load_run_config(run_dir), load_last_checkpoint(run_dir)


def resume_position(state: dict[str, Any] | None) -> str:
    """Where a resumed run continues, for its log: the epoch in progress counted from 1 (as the log lines count
    epochs) and the steps of it already done."""
    if state is None:
        return "the start (no checkpoint yet)"
    progress = state["progress"]
    return f"epoch {progress['epoch'] + 1} after step {progress['step']}"


RESUME_KEYS = ("model", "optimizer", "scheduler", "progress", "rng", "classes")


def load_last_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """checkpoints/last.pt, the state a resume continues from (None: the run saved none yet), or a
    one-line error where the file is damaged or is not a resumable `transfer train` checkpoint."""
    file = run_dir / "checkpoints" / "last.pt"
    if not file.is_file():
        return None
    payload = read_checkpoint_file(file)
    progress = payload.get("progress")
    missing = [key for key in RESUME_KEYS if key not in payload]
    positions = isinstance(progress, dict) and all(isinstance(progress.get(k), int) for k in ("epoch", "step"))
    if missing or not positions:
        what = f"no {', '.join(missing)}" if missing else "no progress (epoch, step)"
        raise TransferError(f"{file} is not a resumable `transfer train` checkpoint ({what}): "
                            "move it aside to restart the run from its first epoch")
    return payload


def read_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json, or one line saying the file is torn or not a summary."""
    import json

    if not path.is_file():  # a folder; a FIFO, which would block the read
        what = "a directory" if path.is_dir() else "not a plain file"
        raise TransferError(f"{path} is {what}, not a run summary (a JSON file): move it aside, then run the "
                            "command again")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TransferError(f"{path} is not valid JSON ({first_line(error)}): was its write cut short?") from error
    if not isinstance(summary, dict):
        raise TransferError(f"{path} is not a run summary (a JSON object): it holds a {type(summary).__name__}")
    return summary


def read_checkpoint_file(file: Path) -> dict[str, Any]:
    """A checkpoint's payload (a dict), or a one-line error for a truncated, foreign or unsafe file."""
    from transfer_cli.runs import checkpoint as checkpoints
    try:
        payload = checkpoints.load(file)
    except TransferError:  # its bytes or its frozen file's changed, the frozen file missing: already one line
        raise
    except Exception as error:  # noqa: BLE001 - truncated, not a zip, pickled code: the same user-facing problem
        raise TransferError(f"cannot read checkpoint {file}: {torch_file_problem(file, error)}") from error
    if not isinstance(payload, dict):
        raise TransferError(f"{file} is not a `transfer train` checkpoint: it holds a {type(payload).__name__}")
    return payload


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_result(summary: dict) -> str:
    """The final figures `transfer train` and `transfer resume` print."""
    reported, selected = summary["reported_val_acc"], summary["selected_acc"]
    chosen = (f"chosen on the selection split at {selected:.4f}" if summary["selected_on"] == "select" else
              "selected on val: optimistic") if selected is not None else ""
    text = (f"val acc {_number(reported)} (best.pt, epoch {summary['best_epoch']}, {chosen}), "
            f"final val acc {_number(summary['final_val_acc'])}, {summary['epochs_run']} epochs, "
            f"{summary['wall_time_s']:.1f}s")
    if summary.get("limited_val_batches"):
        text += f" (val: {summary['limited_val_batches']} batches only, trainer.limit_val_batches)"
    if summary.get("stop_reason") not in (None, "completed all stages"):
        text += f"; stopped: {summary['stop_reason']}"
    return text
