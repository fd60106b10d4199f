"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's `lr_find`, Lightning's
`Tuner.lr_find`) on a run's first stage, and the lr it suggests.

The run is assembled as training assembles it (assemble.prepare) and its first stage entered as
fit enters it (stages.enter_stage): the same data and augmentation, freezing, BatchNorm policy,
AMP, gradient accumulation, and cached features where a head-only stage would train on them.
Then, instead of the strategy's scheduler, one common factor ramps every trained group's lr
exponentially from `start_lr` to `end_lr` (the stage's top lr follows the ramp; a group at 0.1x
of it stays at 0.1x) over `steps` optimizer steps, cycling through the train loader in the
seeded order training uses. Each step's loss is smoothed (an exponential moving average,
bias-corrected), and the test stops once the smoothed loss exceeds 4x the best seen, or a loss
is non-finite. Nothing is validated and nothing is saved: the caller writes the curve.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.optim.lr_scheduler import LambdaLR

from transfer_cli.config.schema import StrategyConfig, TrainConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.inference.topk import topk_for
from transfer_cli.training.assemble import Prepared, RunnerAdapter, prepare
from transfer_cli.training.freezing import hold_frozen_batchnorm
from transfer_cli.training.loop import Accumulation, NonFiniteLoss, Tally, train_one_epoch
from transfer_cli.training.stages import FitSetup, StagedOptimizer, StageRun, enter_stage
from transfer_cli.training.state import Progress


log = logging.getLogger(__name__)

BETA = 0.98  # the loss average's memory: about the last 50 steps
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its best
MIN_POINTS = 10  # fewer recorded steps than this suggest nothing


@dataclass(frozen=True)
class RangeTest:
    """The ramp: the stage's top lr from `start_lr` to `end_lr`, geometrically, over `steps` optimizer steps."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100

    def check(self) -> None:
        """One line for settings that make no ramp."""
        if not (math.isfinite(self.start_lr) and self.start_lr > 0 and math.isfinite(self.end_lr)):
            raise TransferError(f"--start-lr {self.start_lr:g} and --end-lr {self.end_lr:g} must be positive, finite "
                                "numbers")
        if self.end_lr <= self.start_lr:
            raise TransferError(f"--end-lr {self.end_lr:g} must be above --start-lr {self.start_lr:g}: the lr ramps "
                                "up from one to the other")
        if self.steps < MIN_POINTS:
            raise TransferError(f"--steps {self.steps} is too few for a curve: give at least {MIN_POINTS}")

    def lr_at(self, step: int) -> float:
        """The stage's top lr at optimizer step `step` (from 0): start * (end / start) ** (step / (steps - 1))."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.steps - 1))


@dataclass
class LrCurve:
    """What the test recorded: per optimizer step, every trained group's lr, the loss and its smoothed value."""

    stage: str
    stated_lrs: dict[str, float]  # the stage's own lr per trained group (the ratios the ramp keeps)
    test: RangeTest
    strategy: StrategyConfig  # the one whose first stage ran (strategy=auto: the one it picked)
    chosen: str = ""  # why strategy=auto picked it ("" for a strategy given by name)
    lrs: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stop_reason: str = ""
    average: float = 0.0  # the moving average before its bias correction

    @property
    def top_lrs(self) -> list[float]:
        """The stage's top lr at each recorded step: the lr the suggestion speaks of."""
        return [max(step.values()) for step in self.lrs]

    def record(self, lrs: dict[str, float], loss: float) -> None:
        """One step's lrs and loss, with the loss's bias-corrected moving average."""
        self.average = BETA * self.average + (1 - BETA) * loss
        self.lrs.append(dict(lrs))
        self.losses.append(loss)
        self.smoothed.append(self.average / (1 - BETA ** len(self.losses)))

    def diverged(self) -> bool:
        """The last smoothed loss is above DIVERGED x the best before it."""
        return len(self.smoothed) > 1 and self.smoothed[-1] > DIVERGED * min(self.smoothed[:-1])


@dataclass(frozen=True)
class Suggestion:
    """The steepest descent of the smoothed loss (`lr`, at step `index`), and the lr of its minimum."""

    lr: float
    index: int
    min_loss_lr: float


def ignored_ends(points: int) -> tuple[int, int]:
    """How many points the suggestion ignores at the start (the average has seen few losses) and at the end (where
    the loss turns up, or the one that stopped the test)."""
    return max(1, points // 10), max(1, points // 20)


def suggest(curve: LrCurve) -> Suggestion:
    """The top lr where the smoothed loss falls fastest per decade of lr (the minimum of its gradient with respect
    to log10 lr, its first and last few points ignored); one line where there are too few points or the loss
    never falls."""
    points = len(curve.smoothed)
    lrs, smoothed = np.array(curve.top_lrs), np.array(curve.smoothed)
    if points < MIN_POINTS:
        raise TransferError(f"the range test stopped after {points} steps ({curve.stop_reason}): too few points for "
                            f"a suggestion (at least {MIN_POINTS}); lower --start-lr, or check the data")
    head, tail = ignored_ends(points)
    slope = np.gradient(smoothed, np.log10(lrs))[head:points - tail]
    index = head + int(np.argmin(slope))
    if not slope[index - head] < 0:
        raise TransferError(f"the smoothed loss never falls between lr {lrs[head]:.1e} and {lrs[points - tail - 1]:.1e}"
                            ": no steepest descent to suggest; lower --start-lr")
    return Suggestion(float(lrs[index]), index, float(lrs[int(np.argmin(smoothed))]))


def find_lr(cfg: TrainConfig, run_dir: Path, test: RangeTest, adapt_runner: RunnerAdapter | None = None) -> LrCurve:
    """Assemble `cfg` as training does and run the range test on its first stage (nothing is written to
    `run_dir`); `adapt_runner` as in assemble.prepare."""
    test.check()
    if cfg.dry_run:
        raise TransferError("dry_run=true builds no weights, so the range test would measure another network: drop "
                            "dry_run (`transfer train ... dry_run=true` prints the plan)")
    prepared = prepare(cfg, run_dir, adapt_runner)
    return _ramp(prepared, enter_stage(prepared.setup, Progress(), 0), test)


def _ramp(prepared: Prepared, run: StageRun, test: RangeTest) -> LrCurve:
    """The test itself: epochs of the stage's loader, in training's seeded order, until `test.steps` optimizer
    steps or a divergence."""
    setup = prepared.setup
    setup.optimizer.enter(run.stage)  # every group back at its stated lr (entering built the stage's schedule)
    stated = setup.optimizer.lrs_by_group()
    top = max(group["lr"] for group in setup.optimizer.optimizer.param_groups)
    ramp = LambdaLR(setup.optimizer.optimizer, lambda step: test.lr_at(min(step, test.steps - 1)) / top)
    curve = LrCurve(run.stage.name, stated, test, prepared.strategy, prepared.strategy_choice)
    log.info("lr range test on stage '%s': top lr %.1e -> %.1e over %d steps (%s)", run.stage.name, test.start_lr,
             test.end_lr, test.steps, ", ".join(f"{g} x{lr / top:g}" for g, lr in stated.items()))
    epoch = 0
    while len(curve.losses) < test.steps and not curve.stop_reason:
        curve.stop_reason = _epoch(setup, run, ramp, curve, epoch)
        epoch += 1
    curve.stop_reason = curve.stop_reason or f"reached --end-lr after {test.steps} steps"
    return curve


class _Stop(Exception):
    """Ends an epoch of the test early, saying why."""


class _Recorder:
    """`train_one_epoch`'s on_step: after each optimizer step, the lrs it ran at and its mean loss (over its
    batches: the tally's growth since the step before) into the curve; raises _Stop where the test ends."""

    def __init__(self, curve: LrCurve, tally: Tally, optimizer: StagedOptimizer) -> None:
        self.curve, self.tally, self.optimizer = curve, tally, optimizer
        self.loss_sum, self.count = 0.0, 0
        self.lrs = optimizer.lrs_by_group()  # what the next step runs at (the ramp steps before on_step)

    def __call__(self, batches: int) -> None:
        loss_sum, count = self.tally.loss.item(), self.tally.count  # a host sync per step: the test needs every loss
        loss = (loss_sum - self.loss_sum) / (count - self.count)
        step = len(self.curve.losses) + 1
        if not math.isfinite(loss):
            raise _Stop(f"the loss became non-finite at step {step}")
        self.curve.record(self.lrs, loss)
        self.loss_sum, self.count, self.lrs = loss_sum, count, self.optimizer.lrs_by_group()
        if self.curve.diverged():
            raise _Stop(f"the smoothed loss passed {DIVERGED:g}x its best at step {step} "
                        f"(lr {self.curve.top_lrs[-1]:.1e})")


def _epoch(setup: FitSetup, run: StageRun, ramp: LambdaLR, curve: LrCurve, epoch: int) -> str:
    """One pass of the stage's loader (or the part of it the remaining steps need), set up as fit starts an
    epoch; returns why the test stopped in it ("" where it did not)."""
    loader = run.train_loader
    setup.model.model.train()
    hold_frozen_batchnorm(setup.model, run.stage)
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(loader.sampler.seed * 1_000_003 + epoch)  # as fit seeds each epoch's iterator
    full = setup.accumulation(loader)
    remaining = curve.test.steps - len(curve.losses)
    accumulation = Accumulation(min(full.batches, remaining * full.per_step), full.per_step)
    if not accumulation.batches:
        raise TransferError("the training split yields no batch: give more training images or a smaller "
                            "trainer.batch_size")
    tally = Tally(setup.runner.precision.device, topk_for(setup.num_classes))
    try:
        train_one_epoch(run.runner, loader, ramp, tally, on_step=_Recorder(curve, tally, setup.optimizer),
                        accumulation=accumulation, description=f"lr range test, pass {epoch + 1}")
    except _Stop as stop:
        return str(stop)
    except NonFiniteLoss:
        return f"the loss became non-finite at step {len(curve.losses) + 1}"
    return ""
