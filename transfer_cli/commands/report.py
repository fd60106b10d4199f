"""`transfer report DIR ...`: the runs below DIRs as one table (results.md, results.csv), each row epoch by epoch
(epochs.md) and val_acc.png."""

from __future__ import annotations

import sys
from pathlib import Path

from transfer_cli.core.args import CommandParser
from transfer_cli.runs.report import build_report


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="transfer report",
        description="Compare the runs below DIRs: one row per run (seeds of the same config share a row, "
                    "mean ± sample std), written as results.md, results.csv, epochs.md (val accuracy per epoch) "
                    "and val_acc.png.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run dirs, sweep dirs or any folder above "
                                                                          "them")
    parser.add_argument("--out", type=Path, metavar="OUTDIR", help="where to write the report (default: the first DIR)")
    args = parser.parse_args(argv)
    table, notes = build_report(args.dirs, args.out or args.dirs[0])
    print(table)
    for line in notes:
        print(f"transfer: {line}", file=sys.stderr)
    print(f"wrote results.md, results.csv, epochs.md and val_acc.png to {args.out or args.dirs[0]}", file=sys.stderr)
    return 0
