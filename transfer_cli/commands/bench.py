"""`transfer bench`: CPU benchmarks against their targets (`make bench`), or GPU images/s (`--gpu`)."""

from __future__ import annotations

import sys
from pathlib import Path

from transfer_cli.benchmarks.cpu import FULL, QUICK, format_table, run_cpu
from transfer_cli.benchmarks.gpu import gpu_figures
from transfer_cli.core.args import CommandParser
from transfer_cli.runs.runlog import write_json


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="transfer bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small workload (tests): figures are not comparable")
    parser.add_argument("--gpu", action="store_true", help="only the GPU benchmark (needs CUDA)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--data-root", help="GPU: a JPEG folder of class subfolders instead of random JPEGs")
    parser.add_argument("--out", default="outputs/bench", help="where bench.json (bench_gpu.json) goes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        gpu = gpu_figures(args.data_root, **({"batch": 32, "warmup": 3, "steps": 5} if args.quick else {}))
        if not gpu["available"]:
            print(f"transfer bench --gpu: {gpu['reason']}: nothing to measure", file=sys.stderr)
            return 1
        write_json(out / "bench_gpu.json", gpu)
        print(format_table({"gpu": gpu}))
        print(f"wrote {out / 'bench_gpu.json'}")
        return 0
    report = run_cpu(QUICK if args.quick else FULL, args.data_root)
    write_json(out / "bench.json", report)
    print(format_table(report))
    print(f"wrote {out / 'bench.json'} in {report['total_seconds']:.0f}s "
          f"(load average {report['machine']['load_average'][0]:.1f} at start)")
    return 1 if args.check and not report["all_targets_met"] else 0
