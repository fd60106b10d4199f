"""`transfer resume RUN_DIR`: continue an interrupted run in place from checkpoints/last.pt."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transfer_cli.core.args import CommandParser


def _log_to(run_dir: Path) -> None:
    """Console and the run's train.log, as Hydra sets up for `transfer train`; train.log is appended to only
    where it is the run's own file, never through a symbolic link (NotOwnFile)."""
    from transfer_cli.runs.runlog import LOG_FORMAT, train_log

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    for handler in (console, train_log(run_dir)):
        root.addHandler(handler)


def resume(run_dir_arg: str) -> int:
    """Resume one run; a finished run is reported and left unchanged."""
    from transfer_cli.runs.rundir import require_run_dir

    run_dir = require_run_dir(run_dir_arg)  # before torch loads: a mistyped path fails at once

    from transfer_cli.parallel import distributed
    from transfer_cli.runs import runlock
    distributed.init_from_env()  # `torchrun ... -m transfer_cli resume RUN_DIR` continues a DDP run
    main = distributed.is_main()
    if _finished(run_dir, main):
        return 0
    _check_resumable(run_dir)
    with runlock.hold_on_main(run_dir, "transfer resume"):  # one writer; a finished run is not even locked
        return _continue(run_dir, main)


def _finished(run_dir: Path, main: bool) -> bool:
    """A run with a (readable) summary.json is finished; a damaged one (or a folder of that name, which the
    finished run could not write its summary over) is a one-line error, not 'finished'."""
    from transfer_cli.runs.rundir import read_summary

    if (run_dir / "summary.json").exists():
        read_summary(run_dir / "summary.json")
        if main:
            print(f"{run_dir} already finished (summary.json exists): nothing to resume")
        return True
    return False


def _check_resumable(run_dir: Path) -> None:
    """Before the lock and any training: a run directory resume cannot write, or a metrics.jsonl record the end
    of the run would fail to read back, is refused now rather than after the remaining epochs."""
    from transfer_cli.runs.rundir import require_writable
    from transfer_cli.runs.runlog import check_metrics

    require_writable(run_dir)
    check_metrics(run_dir)


def _continue(run_dir: Path, main: bool) -> int:
    """Resume `run_dir`, locked by this process; every way it ends is one line on stderr."""
    from transfer_cli.runs.rundir import format_result, resume_point, resume_position
    from transfer_cli.training.job import train_in

    if _finished(run_dir, main):  # the writer this one waited for finished it
        return 0
    cfg, state = resume_point(run_dir)
    if main:
        _log_to(run_dir)
    logging.getLogger(__name__).info("resuming %s from %s", run_dir, resume_position(state))
    outcome = train_in(cfg, run_dir, frozenset(), lambda: None, resume=state)
    if not main:
        return outcome.code
    if outcome.error is not None:
        print(outcome.line, file=sys.stderr)
        return outcome.code
    print(f"run dir: {run_dir}")
    print(format_result(outcome.summary))
    return 0


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="transfer resume", description=__doc__)
    parser.add_argument("run_dir", help="the run directory `transfer train` printed")
    args = parser.parse_args(argv)
    return resume(args.run_dir)
