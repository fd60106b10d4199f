"""`transfer lr-find [--start-lr A] [--end-lr B] [--steps N] [key=value ...]`: the learning-rate range test on the
first stage of the run `transfer train key=value ...` would train, and the lr it suggests (docs/lr-find.md)."""

from __future__ import annotations

from transfer_cli.core.args import CommandParser
from transfer_cli.core.errors import TransferError


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="transfer lr-find",
        description="The learning-rate range test (Smith 2017) on the first stage of the run `transfer train` "
                    "would train with the same overrides: the stage's lrs ramp up exponentially, keeping their "
                    "ratios, while each step's loss is recorded. Writes lr_find.csv, lr_find.json, lr_find.png and "
                    "config.yaml into the run directory and prints the suggested lr (the steepest descent of the "
                    "smoothed loss) as the override that sets it. Trains nothing else, saves no checkpoint.")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="the stage's top lr at the first step (1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="the stage's top lr at the last step (10)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps, at least 10 (100)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="what `transfer train` takes: experiment=smoke strategy=fine_tune hydra.run.dir=DIR ...")
    if any(arg in {"-m", "--multirun"} for arg in argv):
        from transfer_cli.training.lr_find_job import SWEEP_HINT
        raise TransferError(SWEEP_HINT)
    args = parser.parse_intermixed_args(argv)

    from transfer_cli.runs.runlog import console_handler, package_log
    from transfer_cli.training.lr_find import RangeTest  # torch: loaded once the arguments are known
    from transfer_cli.training.lr_find_job import lr_find

    with package_log(console_handler()):
        result = lr_find(args.overrides, RangeTest(args.start_lr, args.end_lr, args.steps))
    print(f"lr-find dir: {result['run_dir']}")
    print(result["line"])
    print(f"second opinion: {result['second_opinion_lr']:.1e} (the minimum-loss lr / 10); {result['steps_run']} "
          f"steps, {result['stop_reason']}")
    return 0
