"""`transfer train`: compose once, claim the run directory, run the job under Hydra, say how it ended.

A single run is composed once (config/compose.py), its directory claimed and locked before
anything is written (runs/runlock.py: a directory that holds a run, or an entry a run writes,
is refused untouched; a clock-made name taken in the same second gets a suffix), and run as
Hydra runs a job (logging, `.hydra/`). A sweep (`-m`) and Hydra's own flags (--help, --cfg,
...) go through `hydra.main`; a sweep re-run into the same `hydra.sweep.dir` skips finished
jobs, resumes partial ones and refuses another config's or the user's files before Hydra
writes (sweep_rerun.py). How each run ends is one line on stderr and the exit code: an
interruption's (130, 143) before a bug's (1) before a user mistake's (2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from transfer_cli.commands.sweep_rerun import another_config, check_rerun, previous_attempt
from transfer_cli.config.compose import (
    SWEEP_FLAGS,
    Composed,
    HydraJob,
    compose,
    composition_error,
    quoted,
    run_as_hydra_job,
    run_hydra_main,
    save_config,
    sweep_dir,
)
from transfer_cli.core.errors import TransferError
from transfer_cli.core.extras import missing_plugin
from transfer_cli.core.files import NotOwnFile
from transfer_cli.parallel import distributed
from transfer_cli.runs import runlock
from transfer_cli.runs.rundir import format_result, resume_point, resume_position
from transfer_cli.training.job import Outcome, train_in


HYDRA_ONLY_FILES = {".hydra", "train.log", "config.yaml"}  # written before the run itself starts


def main(argv: list[str]) -> int:
    """`transfer train [overrides] [-m] [Hydra flags]`."""
    outcomes = _Outcomes()
    try:
        missing = missing_plugin(argv)
        if missing:
            raise TransferError(missing)
        flags = [arg for arg in argv if arg.startswith("-")]
        if not flags:
            composed = compose(argv)
            if not composed.multirun:
                outcomes.add(_single_run(composed))
                return outcomes.report()
        _under_hydra_main(argv, flags, outcomes)
    except TransferError as error:  # refused before any job started
        outcomes.add(Outcome(error=error, code=2, line=f"transfer: error: {error}"))
    return outcomes.report()


def _single_run(composed: Composed) -> Outcome:
    """One run: rank 0 claims its directory (every torchrun rank then runs in it), Hydra runs the job."""
    distributed.init_from_env()
    main = distributed.is_main()
    claimed, lock = None, None
    if main:
        try:
            lock = runlock.claim_new(composed.run_dir, composed.from_clock, "transfer train")
            claimed = lock.run_dir
        except TransferError as error:
            claimed = error
    claimed = distributed.broadcast_object(claimed)
    if isinstance(claimed, TransferError):
        raise claimed
    run_dir = Path(claimed)
    with lock or contextlib.nullcontext():
        def job() -> Outcome:
            return _announced(run_dir, train_in(composed.config, run_dir, lock.held_before if lock else frozenset(),
                                                lambda: save_config(composed.ran, run_dir)))
        return run_as_hydra_job(composed, run_dir, job, writes_record=main)


def _announced(run_dir: Path, outcome: Outcome) -> Outcome:
    """A finished run's directory and figures on stdout (a dry run printed its plan)."""
    summary = outcome.summary
    if summary is not None and not summary.get("dry_run"):
        print(f"run dir: {run_dir}")
        print(format_result(summary))
    return outcome


class _Outcomes:
    """How the runs of one `transfer train` ended, said on stderr once Hydra is done, and its exit code:
    an interruption's (130, 143) before a bug's (1) before a user mistake's (2)."""

    def __init__(self) -> None:
        self.ended: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            self.ended.append(outcome)

    def report(self) -> int:
        for outcome in self.ended:
            print(outcome.line, file=sys.stderr)
        codes = [outcome.code for outcome in self.ended]
        return sorted(codes, key=lambda code: (code in (1, 2), code))[0] if codes else 0


# --------------------------------------------------------------------------- sweeps and Hydra's own flags


def _under_hydra_main(argv: list[str], flags: list[str], outcomes: _Outcomes) -> None:
    """A sweep, checked value by value and its directory claimed before Hydra writes; Hydra's own flags
    (--help, --cfg, ...) answered by Hydra."""
    sweep = all(flag in SWEEP_FLAGS for flag in flags)
    overrides = [arg for arg in argv if not arg.startswith("-")]
    where = []
    if sweep:
        problem = composition_error(argv)
        if problem:
            raise TransferError(problem)
        distributed.init_from_env()
        where = distributed.broadcast_object(_sweep_dir_override(overrides) if distributed.is_main() else None)
        if isinstance(where, TransferError):
            raise where
    launcher_pid = os.getpid()

    def job(started: HydraJob) -> float | None:
        distributed.init_from_env()  # a launcher's job process (submitit, several tasks) joins here
        return _sweep_job(started, outcomes, worker=os.getpid() != launcher_pid)

    run_hydra_main([*argv, *where], job)


def _sweep_dir_override(overrides: list[str]) -> list[str] | TransferError:
    """A clock-made sweep dir made unique (as an override naming it), or a chosen one checked as a re-run."""
    try:
        planned, from_clock = sweep_dir(overrides)
        if from_clock:
            return [f"hydra.sweep.dir={quoted(str(runlock.unused_dir(planned)))}"]
        check_rerun(overrides, planned)
        return []
    except TransferError as error:
        return error


def _sweep_job(started: HydraJob, outcomes: _Outcomes, worker: bool) -> float | None:
    """One job of a sweep in its own locked directory: a finished one skipped, a partial one resumed, another
    config's refused. A launcher's worker (`worker`) also fails where its launcher sees it."""
    run_dir, main = started.run_dir, distributed.is_main()
    try:
        cfg = started.config()
        if distributed.broadcast_object((run_dir / "summary.json").exists() if main else None):
            return _skip_finished(run_dir, cfg)  # reads only: no lock
        with runlock.hold_on_main(run_dir, "a transfer train -m job"):
            found = distributed.broadcast_object(previous_attempt(run_dir, cfg) if main else None)
            if found["kind"] == "other":
                raise TransferError(another_config(run_dir, found["differences"]))
            resume = None
            if found["kind"] == "partial":
                cfg, resume = resume_point(run_dir)
                logging.getLogger(__name__).info("resuming %s from %s", run_dir, resume_position(resume))
            outcome = _announced(run_dir, train_in(cfg, run_dir, _entries_before(run_dir),
                                                   started.save_config, resume))
    except (TransferError, NotOwnFile) as error:  # another process's run, a link in it, another config
        outcome = Outcome(error=error, code=2, line=f"transfer: error: {error}")
    outcomes.add(outcome)
    if worker and outcome.error is not None and outcome.code in (1, 2):
        print(outcome.line, file=sys.stderr)
        raise outcome.error
    return _objective(outcome.summary) if outcome.summary else None


def _entries_before(run_dir: Path) -> frozenset[str]:
    """What a sweep job's directory held before this run: Hydra's own files and the lock are the run's (a
    directory that held a train.log or .hydra/ of the user's was refused before Hydra started)."""
    names = {entry.name for entry in run_dir.iterdir()} if run_dir.is_dir() else set()
    return frozenset(names - HYDRA_ONLY_FILES - {runlock.LOCK_NAME})


def _objective(summary: dict[str, Any]) -> float | None:
    """What a sweeper (Optuna: direction maximize) optimizes: the top-1 best.pt was chosen by (on the selection
    split where the run holds one out, so a search does not tune on the split it reports), a float."""
    value = summary.get("selected_acc")
    return float(value) if value is not None else None


def _skip_finished(run_dir: Path, cfg: Any) -> float | None:
    """A job whose directory holds a finished run of its own config: its stored result, not a second run."""
    found = distributed.broadcast_object(previous_attempt(run_dir, cfg) if distributed.is_main() else None)
    if found["kind"] != "done":
        raise TransferError(another_config(run_dir, found["differences"]))
    summary = found["summary"]
    status = summary.get("status", "finished")
    print(f"run dir: {run_dir} ({status} before: skipped)")
    if status != "finished":
        return None
    print(format_result(summary))
    return _objective(summary)
