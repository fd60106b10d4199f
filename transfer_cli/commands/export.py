"""`transfer export RUN_DIR`: a trained run's network as an inference model (TorchScript, ONNX or safetensors),
with model.json describing its classes and the preprocessing its input needs."""

from __future__ import annotations

import sys
from pathlib import Path

from transfer_cli.core.args import CommandParser
from transfer_cli.inference.export import FORMATS, export_run
from transfer_cli.inference.load import CHECKPOINTS


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="transfer export",
                           description="Write a trained run's model for inference (eval mode, logits over the "
                                       "run's classes) and model.json beside it: classes, input size, mean, std, "
                                       "interpolation, crop_pct, backbone, the run's best metrics.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory `transfer train` wrote")
    parser.add_argument("--format", choices=FORMATS, default="torchscript",
                        help="torchscript (default), onnx (needs the `export` extra) or safetensors (a state dict)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="which checkpoint (default best)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write (default RUN_DIR/export/FORMAT/)")
    args = parser.parse_args(argv)
    exported = export_run(args.run_dir, args.format, args.checkpoint, args.out)
    verified = exported.metadata["verified"]["max_abs_diff"]
    print(f"wrote {exported.model_file} and {exported.metadata_file.name} ({args.format}, {args.checkpoint} "
          f"checkpoint, {exported.metadata['num_classes']} classes; logits within {verified:.2g} of the run's model)",
          file=sys.stderr)
    print(exported.model_file)
    return 0
