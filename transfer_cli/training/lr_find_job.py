"""`transfer lr-find` (and `transfer_cli.lr_find`) from overrides to files: compose as `transfer train` composes,
claim the run directory as training claims one, run the range test, write its files; a test that ends any other
way leaves nothing of its own behind.

The directory is Hydra's run directory for the composed config (outputs/runs/<time>, or
`hydra.run.dir=...`), claimed and locked by runlock.claim_new: a directory that holds a run
or files a run writes is refused, and so is one another process is writing. The files go in
at the end, config.yaml last, so a directory with a config.yaml always holds a whole result.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from transfer_cli.config.compose import compose, save_config
from transfer_cli.config.schema import StrategyConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.runs import runlock
from transfer_cli.runs.lr_find_files import CURVE, PLOT, RESULT, plot_curve, write_curve
from transfer_cli.runs.runlog import write_json
from transfer_cli.training.assemble import RunnerAdapter
from transfer_cli.training.job import discard_unstarted
from transfer_cli.training.lr_find import BETA, DIVERGED, LrCurve, RangeTest, Suggestion, find_lr, ignored_ends, suggest


SWEEP_HINT = "lr-find runs one range test: drop -m and give each key one value (a sweep is `transfer train -m`)"
RULE = "steepest descent: the minimum of d(smoothed loss)/d(log10 lr), the first {} and last {} points ignored"


def lr_find(overrides: Sequence[str], test: RangeTest, command: str = "transfer lr-find",
            adapt_runner: RunnerAdapter | None = None) -> dict[str, Any]:
    """Run the range test `transfer train <overrides>` would train through first and write its files; returns
    lr_find.json's content with `run_dir` (where they are) and `line` (the result in one line)."""
    test.check()  # before anything is composed or claimed
    composed = compose(list(overrides))
    if composed.multirun:
        raise TransferError(SWEEP_HINT)
    with runlock.claim_new(composed.run_dir, composed.from_clock, command) as lock:
        run_dir = lock.run_dir
        try:
            curve = find_lr(composed.config, run_dir, test, adapt_runner)
            suggestion = suggest(curve)
            result = _result(curve, suggestion, composed.config.optimizer.lr_scale, composed.config.trainer.seed)
            write_curve(run_dir / CURVE, list(curve.stated_lrs), curve.lrs, curve.losses, curve.smoothed)
            plot_curve(run_dir / PLOT, curve.top_lrs, curve.losses, curve.smoothed, suggestion.index,
                       result["second_opinion_lr"], f"{composed.config.backbone.name} / {curve.strategy.name} / "
                       f"stage '{curve.stage}': lr range test")
            write_json(run_dir / RESULT, result)
            save_config(composed.ran, run_dir)  # last: a directory with config.yaml holds a whole result
        except BaseException:
            discard_unstarted(run_dir, lock.held_before)
            raise
    return {**result, "run_dir": str(run_dir), "line": result_line(result)}


def _result(curve: LrCurve, suggestion: Suggestion, lr_scale: float, seed: int) -> dict[str, Any]:
    """lr_find.json: the suggestion and its second opinion, the overrides that set it, and how the test ran."""
    top = max(curve.stated_lrs.values())
    head, tail = ignored_ends(len(curve.losses))
    return {
        "suggested_lr": suggestion.lr,
        "rule": RULE.format(head, tail),
        "min_loss_lr": suggestion.min_loss_lr,
        "second_opinion_lr": suggestion.min_loss_lr / 10,
        "overrides": first_stage_overrides(curve.strategy, bool(curve.chosen), suggestion.lr / top),
        "lr_scale": lr_scale,
        "strategy": curve.strategy.name,
        "strategy_choice": curve.chosen or None,
        "stage": curve.stage,
        "groups": {group: {"stated_lr": lr, "ratio": lr / top} for group, lr in curve.stated_lrs.items()},
        "start_lr": curve.test.start_lr,
        "end_lr": curve.test.end_lr,
        "steps": curve.test.steps,
        "steps_run": len(curve.losses),
        "stop_reason": curve.stop_reason,
        "smoothing": {"beta": BETA, "bias_corrected": True},
        "diverged_above": DIVERGED,
        "seed": seed,
    }


def first_stage_overrides(strategy: StrategyConfig, picked: bool, scale: float) -> list[str]:
    """The overrides of `transfer train` that multiply every lr of the first stage of `strategy` by `scale` (each
    group's lr is proportional to the value they set, optimizer.lr_scale and lr_decay included); a strategy
    `strategy=auto` picked is named first, since stages cannot be given to auto."""
    stage = strategy.stages[0]
    picks = [f"strategy={strategy.name}"] if picked else []
    if stage.lrs is not None:
        rates = ",".join(f"{key.replace(':', chr(92) + ':')}:{lr * scale:.1e}" for key, lr in stage.lrs.items())
        return picks + [f"strategy.stages.0.lrs={{{rates}}}"]  # one map: keys may hold '.' or ':'
    stated = stage.lr if stage.lr is not None else strategy.lr
    return picks + [f"strategy.stages.0.lr={stated * scale:.1e}"]


def result_line(result: dict[str, Any]) -> str:
    """`suggested lr 3.2e-03 (steepest descent); set strategy.stages.0.lr=3.2e-03`."""
    scaled = f" (x optimizer.lr_scale={result['lr_scale']:g})" if result["lr_scale"] != 1 else ""
    return (f"suggested lr {result['suggested_lr']:.1e} (steepest descent); set "
            f"{shlex.join(result['overrides'])}{scaled}")
