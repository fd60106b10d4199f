"""`transfer exercise normalization`: the lesson's exercise 5 (lesson/exercise5.py does the work)."""

from __future__ import annotations

import sys
from pathlib import Path

from transfer_cli.core.args import CommandParser
from transfer_cli.core.errors import TransferError
from transfer_cli.lesson.doc_tables import rewrite
from transfer_cli.lesson.exercise5 import DEFAULT_OUT, run_normalization
from transfer_cli.lesson.normalizations import DEFAULT_NORMS, NORMALIZATIONS
from transfer_cli.lesson.quick_assets import ensure_quick_assets


USAGE = """usage: transfer exercise assets
       transfer exercise normalization [--out DIR] [--norms imagenet,none,half] [--samples N] [--seeds 0,1,2]
                                    [key=value ...]
       transfer exercise tables [--from outputs/exercises] [--into docs/exercises.md] [--assets DIR]

Lesson exercise 5: score a pretrained network with its own 1000-way ImageNet head on a small
evaluation set under several input normalizations; writes results.md, results.csv,
results.json and normalization.png into DIR (default outputs/exercises/ex5). --seeds draws one
evaluation subset per dataset.split_seed and reports mean ± std over them.
Overrides compose on experiment=exercise5 (EfficientNet-B0, 100 Imagenette val images):
  transfer exercise normalization backbone=tf_efficientnet_lite0 dataset=folder dataset.root=DIR
Folder classes are ImageNet classes named by index (310), WordNet id or name (ant, ants).
The other exercises are experiment configs: see docs/exercises.md and `make help`.

`transfer exercise assets` fetches the quick exercises' data (hymenoptera, eurosat5: every file
checked against the shipped manifests) and weights once, and prints the assets folder
(`make exerciseN QUICK=1` runs it when ASSETS / TRANSFER_ASSETS give no local copy).

`transfer exercise tables` rewrites the quick-mode tables of docs/exercises.md from the results the
targets wrote (`make docs-exercises`)."""


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]; each once, in order."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TransferError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    return list(dict.fromkeys(seeds))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "assets":
        CommandParser(prog="transfer exercise assets", usage="transfer exercise assets").parse_args(rest)
        print(ensure_quick_assets())
        return 0
    if name == "tables":
        parser = CommandParser(prog="transfer exercise tables", usage=USAGE.splitlines()[3].strip())
        parser.add_argument("--from", dest="source", type=Path, default=DEFAULT_OUT.parent,
                            help="where the exercises wrote their results (outputs/exercises)")
        parser.add_argument("--into", type=Path, default=Path("docs/exercises.md"), help="the document to rewrite")
        parser.add_argument("--assets", help="the assets folder, written as $ASSETS in the tables")
        args = parser.parse_args(rest)
        used = rewrite(args.into, args.source, args.assets)
        print(f"rewrote {len(used)} tables of {args.into} from {args.source}: {', '.join(used)}")
        return 0
    if name not in {"normalization", "5"}:
        raise TransferError(f"unknown exercise '{name}': `transfer exercise normalization` (exercise 5) is the "
                            "one with its own command (`transfer exercise assets` fetches the quick exercises' "
                            "data, `transfer exercise tables` rewrites the docs' quick-mode tables); exercises 1-4 "
                            "run as `make exercise1` .. `make exercise4`")
    parser = CommandParser(prog="transfer exercise normalization", usage=USAGE.splitlines()[1].strip())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the results")
    parser.add_argument("--norms", default=",".join(DEFAULT_NORMS),
                        help=f"comma-separated, from {', '.join([*NORMALIZATIONS, 'weights'])}")
    parser.add_argument("--samples", type=int, default=4, help="sample images in normalization.png (0: no figure)")
    parser.add_argument("--seeds", default="", help="comma-separated dataset.split_seed values, one evaluation "
                        "subset each (mean ± std over them; default: the config's split_seed)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(rest)
    table = run_normalization(args.overrides, args.out, [k for k in args.norms.split(",") if k],
                              max(args.samples, 0), parse_seeds(args.seeds))
    print(table)
    print(f"wrote results.md, results.csv, results.json and normalization.png to {args.out}", file=sys.stderr)
    return 0
