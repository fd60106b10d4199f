"""The Python API: `transfer_cli.train(overrides)`, `transfer_cli.lr_find(overrides)` and
`transfer_cli.load_run(run_dir)`, for notebooks and scripts.

`train` is `transfer train` run in this process: the same composition and validation, the same
run directory (clock-made under outputs/runs/, made unique, or the one given, refused when it
holds a run), the same files; it returns summary.json as a dict. `load_run` gives a trained
run's model, classes, eval transform and config, with `predict` (what `transfer predict` gives)
and `evaluate` (what `transfer eval` computes). A mistake raises TransferError instead of
printing a line and returning an exit code; a bug or an interruption raises the exception that
ended the run (a note names the run's error.log or its `transfer resume` command).

`import transfer_cli` stays cheap: this module, and torch with it, loads on first use of its names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfer_cli.config.compose import Composed, compose, quoted, record_job, save_config
from transfer_cli.core.errors import TransferError
from transfer_cli.inference.loaded_run import LoadedRun, load_run
from transfer_cli.inference.predict import Prediction
from transfer_cli.runs import runlock
from transfer_cli.runs.rundir import read_summary
from transfer_cli.runs.runlog import package_log, train_log
from transfer_cli.training.fit import Callback
from transfer_cli.training.job import train_in
from transfer_cli.training.lr_find import RangeTest
from transfer_cli.training.lr_find_job import SWEEP_HINT as LR_FIND_SWEEP_HINT
from transfer_cli.training.lr_find_job import lr_find as range_test


__all__ = ["Callback", "LoadedRun", "Prediction", "RunSummary", "load_run", "lr_find", "train"]

SWEEP_HINT = "train() runs a single run: for a sweep use the command, `transfer train -m key=a,b ...`"


class RunSummary(dict):
    """A run's summary.json as a dict, with `run_dir`: the directory the run wrote."""

    def __init__(self, summary: dict[str, Any], run_dir: Path | None) -> None:
        super().__init__(summary)
        self.run_dir = run_dir


# --------------------------------------------------------------------------- train


def train(overrides: Sequence[str] = (), run_dir: str | Path | None = None,
          callbacks: Sequence[Callback] = ()) -> RunSummary:
    """Train one run as `transfer train <overrides>` does and return its summary.json (`.run_dir` says where).

    `run_dir=None` gives the command's own clock-made directory under outputs/runs/; a given
    one that already holds a run is refused as the command refuses it, with nothing written.
    Raises TransferError for a mistake (a bad override, missing data, a sweep: use the command).
    With `dry_run=true` nothing is kept: the plan is printed and {"dry_run": True} returned.
    `callbacks` (transfer_cli.Callback subclasses) see the run as it goes: each epoch's start, each optimizer
    step, each epoch's record; one that raises stops the run, its last checkpoint resumable.
    sys.argv, Hydra's global state and the caller's logging setup are left as they are.
    """
    composed = compose(_overrides(overrides, run_dir))
    if composed.multirun:  # hydra.mode=MULTIRUN, in an override or a config
        raise TransferError(SWEEP_HINT)
    with runlock.claim_new(composed.run_dir, composed.from_clock, "transfer_cli.train") as lock:
        where = lock.run_dir
        with package_log(train_log(where)):
            outcome = train_in(composed.config, where, lock.held_before, lambda: _record(composed, where),
                               callbacks=callbacks)
    if outcome.error is not None:
        if outcome.line and not isinstance(outcome.error, TransferError):
            outcome.error.add_note(outcome.line.removeprefix("transfer: "))  # where the traceback went, how to resume
        raise outcome.error
    if outcome.summary.get("dry_run"):
        return RunSummary({"dry_run": True}, None)  # its directory is discarded, as the command discards it
    return RunSummary(read_summary(where / "summary.json"), where)


def _overrides(overrides: Sequence[str], run_dir: str | Path | None, caller: str = "train",
               sweep_hint: str = SWEEP_HINT) -> list[str]:
    """The overrides `transfer train` would get; flags (-m, --cfg, ...) are the command's alone."""
    if isinstance(overrides, (str, bytes)):
        raise TransferError(f"{caller}() takes a list of key=value overrides, not one string: [{overrides!r}]")
    given = [str(arg) for arg in overrides]
    for arg in given:
        if arg in {"-m", "--multirun"}:
            raise TransferError(sweep_hint)
        if arg.startswith("-"):
            raise TransferError(f"{caller}() takes key=value overrides; '{arg}' is a flag of the command "
                                f"`transfer train {arg}`: run that instead")
    if run_dir is not None:
        if any(arg.lstrip("+~").startswith("hydra.run.dir=") for arg in given):
            raise TransferError("give the run directory once: run_dir=... or a hydra.run.dir override, not both")
        given.append(f"hydra.run.dir={quoted(str(Path(run_dir).expanduser()))}")
    return given


def lr_find(overrides: Sequence[str] = (), run_dir: str | Path | None = None, *, start_lr: float = 1e-7,
            end_lr: float = 10.0, steps: int = 100) -> dict[str, Any]:
    """`transfer lr-find <overrides>` in this process: the learning-rate range test on the first stage of the run
    `train(overrides)` would train (docs/lr-find.md), its files written into `run_dir` (None: a clock-made one).
    Returns lr_find.json as a dict, with `run_dir` and `line` (the result the command prints); a mistake, or a
    test too short for a suggestion, raises TransferError with nothing written."""
    given = _overrides(overrides, run_dir, "lr_find", LR_FIND_SWEEP_HINT)
    return range_test(given, RangeTest(start_lr, end_lr, steps), "transfer_cli.lr_find")


def _record(composed: Composed, run_dir: Path) -> None:
    """config.yaml and the `.hydra/` record, as the command's Hydra job leaves them."""
    record_job(composed, run_dir)
    save_config(composed.ran, run_dir)
