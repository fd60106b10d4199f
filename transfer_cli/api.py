"""The Python API: `transfer_cli.train(overrides)` and `transfer_cli.load_run(run_dir)`, for notebooks and scripts.

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

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transfer_cli.core.errors import TransferError
from transfer_cli.inference.loaded_run import LoadedRun, load_run
from transfer_cli.inference.predict import Prediction
from transfer_cli.runs.rundir import read_summary


__all__ = ["LoadedRun", "Prediction", "RunSummary", "load_run", "train"]

SWEEP_HINT = "train() runs a single run: for a sweep use the command, `transfer train -m key=a,b ...`"


class RunSummary(dict):
    """A run's summary.json as a dict, with `run_dir`: the directory the run wrote."""

    def __init__(self, summary: dict[str, Any], run_dir: Path | None) -> None:
        super().__init__(summary)
        self.run_dir = run_dir


# --------------------------------------------------------------------------- train


def train(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> RunSummary:
    """Train one run as `transfer train <overrides>` does and return its summary.json (`.run_dir` says where).

    `run_dir=None` gives the command's own clock-made directory under outputs/runs/; a given
    one that already holds a run is refused as the command refuses it, with nothing written.
    Raises TransferError for a mistake (a bad override, missing data, a sweep: use the command).
    With `dry_run=true` nothing is kept: the plan is printed and {"dry_run": True} returned.
    """
    argv = _train_argv(overrides, run_dir)
    with _process_state_kept():
        trained = _train_like_the_command(argv)
    if trained is None or not (trained / "summary.json").is_file():
        return RunSummary({"dry_run": True}, None)  # a dry run's directory is discarded by the command
    return RunSummary(read_summary(trained / "summary.json"), trained)


def _train_argv(overrides: Sequence[str], run_dir: str | Path | None) -> list[str]:
    """The command line `transfer train` would get; flags (-m, --cfg, ...) are the command's alone."""
    if isinstance(overrides, (str, bytes)):
        raise TransferError(f"train() takes a list of key=value overrides, not one string: [{overrides!r}]")
    argv = [str(arg) for arg in overrides]
    for arg in argv:
        if arg in {"-m", "--multirun"}:
            raise TransferError(SWEEP_HINT)
        if arg.startswith("-"):
            raise TransferError(f"train() takes key=value overrides; '{arg}' is a flag of the command "
                                f"`transfer train {arg}`: run that instead")
    if run_dir is not None:
        if any(arg.lstrip("+~").startswith("hydra.run.dir=") for arg in argv):
            raise TransferError("give the run directory once: run_dir=... or a hydra.run.dir override, not both")
        from transfer_cli.commands.train import quoted

        argv.append(f"hydra.run.dir={quoted(str(Path(run_dir).expanduser()))}")
    return argv


def _train_like_the_command(argv: list[str]) -> Path | None:
    """`transfer train`'s own jobs (commands/train.py), for a single run; a job's failure is raised here
    rather than said on stderr."""
    from transfer_cli.commands import train as command
    from transfer_cli.config.compose import planned_dir

    if planned_dir(argv, sweep=False)[2]:  # hydra.mode=MULTIRUN, in an override or a config
        raise TransferError(SWEEP_HINT)
    outcomes = _RaisedOutcomes()
    try:
        trained = command.train_jobs(argv, outcomes)
    except SystemExit as stop:  # Hydra's own report of a problem it found (already on stderr)
        if stop.code not in (0, None):
            raise TransferError(f"Hydra stopped the run (exit {stop.code}): its message is above") from stop
        trained = []
    outcomes.raise_first()
    return trained[0] if trained else None


class _RaisedOutcomes:
    """The API's record of how its job ended (commands/train.py tells it through `add` and `user_error`):
    the exceptions to raise instead of lines to print."""

    def __init__(self) -> None:
        self.errors: list[tuple[BaseException, str | None]] = []

    def add(self, code: int, line: str) -> None:
        error = sys.exc_info()[1]  # called while the job's exception is being handled
        self.errors.append((error if error is not None else RuntimeError(line), line))

    def user_error(self, error: Exception) -> None:
        self.errors.append((error, None))

    def raise_first(self) -> None:
        if not self.errors:
            return
        error, line = self.errors[0]
        if line and hasattr(error, "add_note"):
            error.add_note(line.removeprefix("transfer: "))  # where the traceback went, how to resume
        raise error


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Hydra sets sys.argv and gives the root logger its console and train.log handlers, and a caller's own
    Hydra state would stop ours from starting: each undone or set aside, then given back."""
    from transfer_cli.config.compose import callers_hydra_set_aside

    argv, root = sys.argv, logging.getLogger()
    args, handlers, level = list(argv), list(root.handlers), root.level
    try:
        with callers_hydra_set_aside():
            yield
    finally:
        argv[:] = args
        sys.argv = argv  # the same list object, as it was
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
