"""`transfer eval RUN_DIR [key=value ...]`: score a run's checkpoint on one split, class by class and image by image.

The per-epoch top-1 in metrics.jsonl says how often a model is right; per-class accuracy, balanced accuracy,
macro-F1 and the confusion matrix say which classes it mixes up; predictions.csv and the top-losses galleries say
which images. Results are written to RUN_DIR/eval/<split>/<checkpoint>/ so each split and checkpoint keeps its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transfer_cli.core.args import CommandParser
from transfer_cli.inference.evaluate import evaluate_run, format_table


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="transfer eval",
        description="Evaluate a run's checkpoint on a split: top-1, top-5, balanced accuracy, per-class accuracy, "
                    "macro-F1 and the confusion matrix (metrics.json, confusion_matrix.json/.png), every image's "
                    "prediction (predictions.csv) and the highest-loss images (top_losses.png, with Grad-CAM heat maps "
                    "in top_losses_cam.png where the backbone has a spatial feature map), written to "
                    "RUN_DIR/eval/<split>/<checkpoint>/.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory `transfer train` wrote")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="checkpoint=best|last (default best), top_losses=N (images in the gallery, default 16, "
                             "0: none), tta=none|flip|five_crop (test-time augmentation, reported beside the plain "
                             "figures), dataset.val_split=test (the split to evaluate), trainer.device=cpu, or any "
                             "other dataset.*, transforms.* or trainer.* key")
    args = parser.parse_args(argv)
    metrics, out = evaluate_run(args.run_dir, args.overrides)
    print(format_table(metrics))
    written = ["metrics.json", "predictions.csv", "confusion_matrix.json", "confusion_matrix.png"]
    written += ["top_losses.png"] if metrics["top_losses"] else []
    written += [metrics["grad_cam"]["file"]] if metrics["grad_cam"]["file"] else []
    print(f"wrote {', '.join(written)} to {out}", file=sys.stderr)
    return 0
