"""`transfer bench`: CPU benchmarks against their targets (`make bench`), GPU images/s (`--gpu`), or how one
epoch's cost grows with the data (`--scaling`)."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from transfer_cli.benchmarks.cpu import FULL, QUICK, child_env, format_table, machine_info, run_cpu
from transfer_cli.benchmarks.gpu import gpu_figures
from transfer_cli.benchmarks.inputs import PEER_TIMM_ENV, PHOTOS_ENV, BenchInputs
from transfer_cli.benchmarks.scaling import LITE0_SCALING, QUICK_SCALING, format_scaling, run_scaling
from transfer_cli.core.args import CommandParser
from transfer_cli.runs.runlog import write_json


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="transfer bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small workload (tests): figures are not comparable")
    parser.add_argument("--gpu", action="store_true", help="only the GPU benchmark (needs CUDA)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--data-root", help="GPU: a JPEG folder of class subfolders instead of random JPEGs")
    parser.add_argument("--scaling", action="store_true",
                        help="only one epoch's wall time and peak memory at 1x, 4x and 16x the photos (--photos)")
    parser.add_argument("--peer-timm", help=f"timm's train.py, raced on the same fine-tuning job (or {PEER_TIMM_ENV})")
    parser.add_argument("--photos", help=f"a folder with train/ and val/ class folders for the races and --scaling "
                                         f"(or {PHOTOS_ENV})")
    parser.add_argument("--hf-home", help="the Hugging Face cache holding tf_efficientnet_lite0.in1k's weights, read "
                                          "offline (or HF_HOME)")
    parser.add_argument("--out", default="outputs/bench", help="where bench.json (bench_gpu.json, "
                                                               "bench_scaling.json) goes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = BenchInputs.resolve(args.peer_timm, args.photos, args.hf_home)
    if args.scaling:
        return _scaling(inputs, out, args.quick)
    if args.gpu:
        gpu = gpu_figures(args.data_root, **({"batch": 32, "warmup": 3, "steps": 5} if args.quick else {}))
        if not gpu["available"]:
            print(f"transfer bench --gpu: {gpu['reason']}: nothing to measure", file=sys.stderr)
            return 1
        write_json(out / "bench_gpu.json", gpu)
        print(format_table({"gpu": gpu}))
        print(f"wrote {out / 'bench_gpu.json'}")
        return 0
    report = run_cpu(QUICK if args.quick else FULL, args.data_root, inputs)
    write_json(out / "bench.json", report)
    print(format_table(report))
    print(f"wrote {out / 'bench.json'} in {report['total_seconds']:.0f}s "
          f"(load average {report['machine']['load_average'][0]:.1f} at start)")
    return 1 if args.check and not report["all_targets_met"] else 0


def _scaling(inputs: BenchInputs, out: Path, quick: bool) -> int:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report = {"timestamp": started, "machine": machine_info(),
              "scaling": run_scaling(QUICK_SCALING if quick else LITE0_SCALING, inputs, child_env())}
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write_json(out / "bench_scaling.json", report)
    print(format_scaling(report["scaling"]))
    print(f"wrote {out / 'bench_scaling.json'} (load average {report['machine']['load_average'][0]:.1f} at start)")
    return 0
