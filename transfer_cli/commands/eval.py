"""`transfer eval RUN_DIR [key=value ...]`: score a run's checkpoint on one split, class by class.

The per-epoch top-1 in metrics.jsonl says how often a model is right; per-class accuracy,
macro-F1 and the confusion matrix say which classes it mixes up. Results are written to
RUN_DIR/eval/<split>/<checkpoint>/ so each split and checkpoint keeps its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transfer_cli.core.args import CommandParser
from transfer_cli.inference.evaluate import evaluate_run, format_table


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="transfer eval",
        description="Evaluate a run's checkpoint on a split: top-1, top-5, per-class accuracy, macro-F1 and the "
                    "confusion matrix, written to RUN_DIR/eval/<split>/<checkpoint>/.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory `transfer train` wrote")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="checkpoint=best|last (default best), dataset.val_split=test (the split to evaluate), "
                             "trainer.device=cpu, or any other dataset.*, transforms.* or trainer.* key")
    args = parser.parse_args(argv)
    metrics, out = evaluate_run(args.run_dir, args.overrides)
    print(format_table(metrics))
    print(f"wrote metrics.json, confusion_matrix.json and confusion_matrix.png to {out}", file=sys.stderr)
    return 0
