"""`transfer resume RUN_DIR`: continue an interrupted run in place from checkpoints/last.pt."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from transfer_cli.errors import TransferError, report_user_error


def _log_to(run_dir: Path) -> None:
    """Console and the run's train.log, as Hydra sets up for `transfer train`."""
    formatter = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
        handler.setFormatter(formatter)
        root.addHandler(handler)


def resume(run_dir_arg: str) -> int:
    """Resume one run; a finished run is reported and left unchanged."""
    from transfer_cli.rundir import load_run_config, require_run_dir

    run_dir = require_run_dir(run_dir_arg)  # before torch loads: a mistyped path fails at once

    from transfer_cli import checkpoint, distributed
    from transfer_cli.hydra_app import format_result
    from transfer_cli.train import train
    from transfer_cli.errors import Interrupted

    distributed.init_from_env()  # `torchrun ... -m transfer_cli resume RUN_DIR` continues a DDP run
    main = distributed.is_main()
    if (run_dir / "summary.json").is_file():
        if main:
            print(f"{run_dir} already finished (summary.json exists): nothing to resume")
        return 0
    cfg = load_run_config(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    state = checkpoint.load(last) if last.is_file() else None
    if main:
        _log_to(run_dir)
    logging.getLogger(__name__).info(
        "resuming %s from %s", run_dir,
        f"epoch {state['progress']['epoch']} step {state['progress']['step']}" if state else "the start (no checkpoint yet)")
    try:
        summary = train(cfg, run_dir, resume=state)
    except Interrupted as stop:
        if main:
            print(f"transfer: {stop}; continue with: transfer resume {run_dir}", file=sys.stderr)
        return 130
    if main:
        print(f"run dir: {run_dir}")
        print(format_result(summary))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="transfer resume", description=__doc__)
    parser.add_argument("run_dir", help="the run directory `transfer train` printed")
    args = parser.parse_args(argv)
    try:
        return resume(args.run_dir)
    except TransferError as error:
        return report_user_error(error)
