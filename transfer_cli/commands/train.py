"""`transfer train`: compose, claim the run directory, let Hydra run each job, say how they ended.

A sweep (`-m`) can be re-run into the same `hydra.sweep.dir`: a job whose directory holds a
finished run (summary.json) is skipped and reports its stored result, a job that had
started (config.yaml, maybe checkpoints/last.pt) is resumed the way `transfer resume` does
it, and a directory holding a run with another config, or files of the user's, is refused
before Hydra writes anything (sweep_rerun.py), never overwritten.

A run directory belongs to one run (see runs/runlock.py): a single run's directory is
resolved, checked and locked before Hydra writes anything in it, so a directory that holds
a run, or holds an entry a run writes (train.log, .hydra, ...) that would be the user's, is
refused with every file left as it was, and a clock-made name (`${now:}`) taken by a run
started in the same second gets a suffix. A sweep job locks its own directory. User
mistakes (TransferError) become one line on stderr and exit code 2; a bug (any other
exception) ends with one line naming it and a file with its traceback (exit 1); a run that
saved no checkpoint leaves nothing behind but what its directory held before it started,
one that did stays resumable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transfer_cli.commands.sweep_rerun import another_config, check_rerun, previous_attempt
from transfer_cli.config.compose import (
    SWEEP_FLAGS,
    HydraJob,
    composition_error,
    planned_dir,
    register_configs,
    run_hydra_main,
)
from transfer_cli.config.stage_epochs import as_run
from transfer_cli.core.errors import (
    INTERRUPT_EXIT,
    USER_ERROR_EXIT,
    Interrupted,
    TransferError,
    failure,
    report_user_error,
)
from transfer_cli.core.extras import missing_plugin
from transfer_cli.core.files import NotOwnFile
from transfer_cli.parallel import distributed
from transfer_cli.runs import runlock
from transfer_cli.runs.rundir import format_result, resume_point, resume_position


HYDRA_ONLY_FILES = {".hydra", "train.log", "config.yaml"}  # written before the run itself starts


def _discard_unstarted(run_dir: Path, keep: frozenset[str]) -> None:
    """Remove what a new run that saved no checkpoint wrote, keeping the entries in `keep` (what the
    directory held before it); the directory goes too when nothing else is left. A run with
    checkpoints/last.pt or summary.json is kept: it can be resumed or read."""
    if not run_dir.is_dir() or (run_dir / "checkpoints" / "last.pt").is_file() or (run_dir / "summary.json").exists():
        return
    for entry in run_dir.iterdir():
        if entry.name not in keep:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only when empty


def _entries_before(run_dir: Path) -> frozenset[str]:
    """What a sweep job's directory held before this run: Hydra's own files and the lock are the run's (a
    directory that held a train.log or .hydra/ of the user's was refused before Hydra started)."""
    names = {entry.name for entry in run_dir.iterdir()} if run_dir.is_dir() else set()
    return frozenset(names - HYDRA_ONLY_FILES - {runlock.LOCK_NAME})


def main(argv: list[str]) -> int:
    """`transfer train` with Hydra's own argument handling (overrides, -m, --help, --cfg)."""
    outcomes = _Outcomes()
    try:
        train_jobs(argv, outcomes)
    except TransferError as error:  # refused before any job started: one line, as a job's mistake is
        outcomes.user_error(error)
    return outcomes.report()


def train_jobs(argv: list[str], outcomes: Any) -> list[Path]:
    """The command but its exit code (also what `transfer_cli.train` runs): the checks, the claim of the
    directory, each job under Hydra, however it ends told to `outcomes`; returns the jobs' directories."""
    missing = missing_plugin(argv)
    if missing:
        raise TransferError(missing)
    register_configs()
    problem = composition_error(argv)
    if problem:
        raise TransferError(problem)
    distributed.init_from_env()  # torchrun: before Hydra composes, so rank 0 picks the run dir for every rank
    where, lock = _claim_dir(argv)
    launcher_pid = os.getpid()
    trained: list[Path] = []

    held_before = lock.held_before if lock else None

    def job(started: HydraJob) -> float | None:
        trained.append(started.run_dir)
        distributed.init_from_env()  # a launcher's job process (submitit, several tasks) joins here
        return _job(started, outcomes, worker=os.getpid() != launcher_pid, held_before=held_before)

    with lock or contextlib.nullcontext():  # a single run's directory stays locked until Hydra is done with it
        run_hydra_main([*argv, *where], job)
    return trained


class _Outcomes:
    """How the jobs of one `transfer train` ended, said on stderr once Hydra is done, and its exit code:
    an interruption's (130, 143) before a bug's (1) before a user mistake's (2)."""
    def __init__(self) -> None:
        self.codes: list[int] = []
        self._say: list[Callable[[], object]] = []

    def add(self, code: int, line: str) -> None:
        self.codes.append(code)
        self._say.append(lambda: print(line, file=sys.stderr))

    def user_error(self, error: Exception) -> None:

        self.codes.append(USER_ERROR_EXIT)
        self._say.append(lambda: report_user_error(error))

    def report(self) -> int:
        for say in self._say:
            say()
        return sorted(self.codes, key=lambda code: (code in (1, 2), code))[0] if self.codes else 0


def _claim_dir(argv: list[str]) -> tuple[list[str], Any]:
    """Before Hydra writes anything, rank 0 picks the directory (see runlock.claim_new) and locks a single
    run's; every rank gets the Hydra override that names it, and rank 0 the lock. Hydra's own flags
    (--help, --cfg, ...) write no run: nothing to claim."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in SWEEP_FLAGS for flag in flags):
        return [], None
    overrides = [arg for arg in argv if not arg.startswith("-")]
    claimed, lock = None, None
    if distributed.is_main():
        try:
            claimed, lock = _claim_on_main(overrides, sweep=bool(flags))
        except TransferError as error:
            claimed = error
    claimed = distributed.broadcast_object(claimed)
    if isinstance(claimed, TransferError):
        raise claimed
    return ([claimed] if claimed else []), lock


def _claim_on_main(overrides: list[str], sweep: bool) -> tuple[str | None, Any]:
    """The override naming a new run's directory, locked (and that lock), or a sweep's clock-made dir, made unique."""
    empty = next((o.partition("=")[0] for o in overrides if re.fullmatch(r"hydra\.(run|sweep)\.dir=\s*(''|\"\")?", o)),
                 None)
    if empty:  # Hydra would take the current directory, whatever it holds
        raise TransferError(f"{empty} is empty: give a directory, or leave it out (each run then gets its own under "
                            "outputs/)")
    planned, from_clock, sweep = planned_dir(overrides, sweep)
    if sweep:  # its jobs lock their own dirs; a fixed sweep dir is a re-run's to skip or resume
        if from_clock:
            return f"hydra.sweep.dir={quoted(str(runlock.unused_dir(planned)))}", None
        check_rerun(overrides, planned)
        return None, None
    lock = runlock.claim_new(planned, from_clock, "transfer train")
    return f"hydra.run.dir={quoted(str(lock.run_dir))}", lock


def quoted(value: str) -> str:
    """`value` as a quoted Hydra override value: any path, spaces, commas and quotes included. In Hydra's
    quoted strings a backslash is literal except in a run before a quote or the closing quote: such runs double."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def _job(started: HydraJob, outcomes: _Outcomes, worker: bool, held_before: frozenset[str] | None) -> float | None:
    """One job in its locked directory (a sweep job locks its own here); however it ends goes to `outcomes`.
    A launcher's worker (`worker`) also fails where its launcher sees it. `held_before`: what a single run's
    directory held before its claim (None for a sweep job: read here), all of it kept when the run is discarded."""
    run_dir, sweep_job = started.run_dir, started.sweep_job
    main = distributed.is_main()
    finished = (run_dir / "summary.json").exists() if main else None  # a re-run's skip reads only: no lock
    locked = sweep_job and not distributed.broadcast_object(finished)
    try:
        with runlock.hold_on_main(run_dir, "a transfer train -m job") if locked else contextlib.nullcontext():
            keep = held_before if held_before is not None else _entries_before(run_dir)
            new = not (run_dir / "config.yaml").is_file()
            discard = (lambda: _discard_unstarted(run_dir, keep)) if main and new else (lambda: None)
            try:
                return _train_job(started, discard)
            except BaseException as error:  # noqa: BLE001 - each ending is settled in one place
                _settle(error, run_dir, discard, outcomes, worker)
                return None
    except (runlock.RunDirBusy, NotOwnFile) as error:  # another process's run, or a link in it: left alone
        outcomes.user_error(error)
        if worker:
            report_user_error(error)
            raise
        return None


def _settle(error: BaseException, run_dir: Path, discard: Callable[[], None], outcomes: _Outcomes,
            worker: bool) -> None:
    """A job's failure as one line: a user mistake (2), an interruption (130, 143), a bug (1, its traceback in a
    file); a new run without a checkpoint is discarded. Anything else (SystemExit) goes on up."""
    if isinstance(error, Interrupted):
        outcomes.add(getattr(error, "exit_code", INTERRUPT_EXIT),
                     f"transfer: {error}; continue with: {runlock.resume_command(run_dir)}")
        return
    if not isinstance(error, (Exception, KeyboardInterrupt)):
        raise error
    discard()
    resumable = runlock.holds_run(run_dir) and not (run_dir / "summary.json").exists()
    then = f"; continue with: {runlock.resume_command(run_dir)}" if resumable else ""
    if isinstance(error, TransferError):
        outcomes.user_error(error)
        if worker:
            report_user_error(error)
            raise error
    elif isinstance(error, KeyboardInterrupt):
        outcomes.add(INTERRUPT_EXIT, f"transfer: interrupted{then or ' before the first checkpoint: nothing kept'}")
    else:
        code, line = failure(error, run_dir / "error.log" if runlock.holds_run(run_dir) else None, then, run_dir)
        outcomes.add(code, line)  # a full disk: 2, a bug: 1
        if worker:
            print(line, file=sys.stderr)
            raise error


def _train_job(started: HydraJob, discard: Callable[[], None]) -> float | None:
    """Train one job (a sweep re-run: skip a finished one, resume a partial one); its objective for a sweeper."""


    run_dir, sweep_job = started.run_dir, started.sweep_job
    main = distributed.is_main()
    cfg = started.config()
    resume = None
    if sweep_job:
        found = distributed.broadcast_object(previous_attempt(run_dir, cfg) if main else None)
        if found["kind"] == "other":
            raise TransferError(another_config(run_dir, found["differences"]))
        if found["kind"] == "done":
            return _report_done(run_dir, found["summary"])
        if found["kind"] == "partial":
            cfg, resume = resume_point(run_dir)
            logging.getLogger(__name__).info("resuming %s from %s", run_dir, resume_position(resume))
    from transfer_cli.training.run import train  # torch: only a job that trains loads it

    if resume is None:
        cfg = as_run(cfg)  # the stages as they run (trainer.epochs rescales them): what config.yaml records
        if main:
            started.save_config([stage.epochs for stage in cfg.strategy.stages] or None)

    summary = train(cfg, run_dir, resume=resume)
    if summary.get("dry_run"):
        discard()
        return None
    print(f"run dir: {run_dir}")
    print(format_result(summary))
    return _objective(summary)


def _objective(summary: dict[str, Any]) -> float | None:
    """What a sweeper (Optuna: direction maximize) optimizes: the best validation top-1 accuracy, a float."""
    value = summary.get("best_val_acc")
    return float(value) if value is not None else None


def _report_done(run_dir: Path, summary: dict[str, Any]) -> float | None:
    status = summary.get("status", "finished")
    print(f"run dir: {run_dir} ({status} before: skipped)")
    if status != "finished":
        return None
    print(format_result(summary))
    return _objective(summary)
