"""One run in the directory claimed for it, however it ends: what `transfer train` (each job, under Hydra)
and `transfer_cli.train` (directly) both call.

A new run that saved no checkpoint leaves nothing behind but what its directory held before
it started; one that did stays resumable, and the way it ended says how to continue. The
ending is returned as an `Outcome` (the command says its line and exits with its code; the
API raises its exception), never raised from here, so Hydra's job runner sees every job end.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import INTERRUPT_EXIT, USER_ERROR_EXIT, Interrupted, TransferError, failure
from transfer_cli.parallel import distributed
from transfer_cli.runs import runlock, runlog


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its summary (finished, or a dry run's), or the exception that ended it with the exit
    code and the one line the command says for it."""
    summary: dict[str, Any] | None = None
    error: BaseException | None = None
    code: int = 0
    line: str | None = None


def train_in(cfg: TrainConfig, run_dir: Path, keep: frozenset[str], save_config: Callable[[], None],
             resume: dict[str, Any] | None = None, callbacks: Sequence[Any] = ()) -> Outcome:
    """Train `cfg` into `run_dir` (claimed and locked by the caller), saving its config.yaml first (a new run's,
    rank 0 only); `keep`: what the directory held before this run, all of it kept when the run is discarded.
    Continues from checkpoint `resume` when given; `callbacks` (fit.Callback) see the run as it goes."""
    from transfer_cli.training.run import train  # torch: only a job that trains loads it

    runlog.hub_lines_once()
    main = distributed.is_main()
    new = not (run_dir / "config.yaml").is_file()
    discard = (lambda: discard_unstarted(run_dir, keep)) if main and new else (lambda: None)
    try:
        if resume is None and main:
            save_config()
        summary = train(cfg, run_dir, resume=resume, callbacks=callbacks)
    except BaseException as error:  # noqa: BLE001 - each ending is settled in one place
        return _ended(error, run_dir, discard)
    if summary.get("dry_run"):
        discard()
    return Outcome(summary=summary)


def _ended(error: BaseException, run_dir: Path, discard: Callable[[], None]) -> Outcome:
    """A run's failure as one line: a user mistake (2), an interruption (130, 143), a bug (1, its traceback in a
    file); a new run without a checkpoint is discarded. Anything else (SystemExit) goes on up."""
    if isinstance(error, Interrupted):
        return Outcome(error=error, code=getattr(error, "exit_code", INTERRUPT_EXIT),
                       line=f"transfer: {error}; continue with: {runlock.resume_command(run_dir)}")
    if not isinstance(error, (Exception, KeyboardInterrupt)):
        raise error
    discard()
    resumable = runlock.holds_run(run_dir) and not (run_dir / "summary.json").exists()
    then = f"; continue with: {runlock.resume_command(run_dir)}" if resumable else ""
    if isinstance(error, TransferError):
        return Outcome(error=error, code=USER_ERROR_EXIT, line=f"transfer: error: {error}")
    if isinstance(error, KeyboardInterrupt):
        return Outcome(error=error, code=INTERRUPT_EXIT,
                       line=f"transfer: interrupted{then or ' before the first checkpoint: nothing kept'}")
    code, line = failure(error, run_dir / "error.log" if runlock.holds_run(run_dir) else None, then, run_dir)
    return Outcome(error=error, code=code, line=line)  # a full disk: 2, a bug: 1


def discard_unstarted(run_dir: Path, keep: frozenset[str]) -> None:
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
