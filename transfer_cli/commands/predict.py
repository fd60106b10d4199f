"""`transfer predict RUN_DIR PATH...`: the top-k classes of new images, with a trained run's model."""

from __future__ import annotations

import sys
from pathlib import Path

from transfer_cli.core.args import CommandParser
from transfer_cli.inference.load import CHECKPOINTS
from transfer_cli.inference.predict import check_out, format_table, predict_images, render, write_out


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="transfer predict",
                           description="Top-k classes, with softmax probabilities, for image files and folders "
                                       "(searched recursively), using a trained run's checkpoint.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory `transfer train` wrote")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image (default 5)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write FILE.csv or FILE.json")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="which checkpoint (default best)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default: the run's trainer.device)")
    args = parser.parse_args(argv)
    check_out(args.out)
    predictions = predict_images(args.run_dir, args.paths, args.top_k, args.checkpoint, args.device)
    if args.out is not None:
        write_out(args.out, render(predictions, args.out.suffix.lower()))
    print(format_table(predictions))
    if args.out is not None:
        print(f"wrote {len(predictions)} predictions to {args.out}", file=sys.stderr)
    return 0
