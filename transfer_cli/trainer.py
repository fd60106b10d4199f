"""`fit`: stages, epochs, schedules, checkpoints, early stopping, interrupts and resume.

Everything needed to continue a run exactly lives in `Progress` plus the states saved
beside it (model, optimizer, scheduler, scaler, EMA, RNGs), so a run killed at any
checkpoint and resumed ends with the same metrics as one never interrupted.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli import checkpoint, runlog
from transfer_cli.config import EarlyStoppingConfig, SchedulerConfig
from transfer_cli.data.loaders import steps_per_epoch
from transfer_cli.errors import TransferError
from transfer_cli.feature_cache import CachedSplits
from transfer_cli.engine import NonFiniteLoss, StepRunner, Tally, evaluate, topk_for, train_one_epoch
from transfer_cli.models import TransferModel
from transfer_cli.optim import StagedOptimizer, build_scheduler
from transfer_cli.strategies import Stage, apply_stage, hold_frozen_batchnorm

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Ctrl-C: a resumable checkpoint was saved; the CLI exits with 130."""


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    stage: int = 0
    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the epoch in progress
    best_val_acc: float = -1.0
    best_epoch: int = 0
    best_monitor: float | None = None
    bad_epochs: int = 0
    stop_reason: str | None = None
    params_trainable: dict[str, int] = field(default_factory=dict)


@dataclass
class FitSetup:
    """Everything `fit` needs, built once by train.py."""

    model: TransferModel
    stages: list[Stage]
    optimizer: StagedOptimizer
    scheduler_cfg: SchedulerConfig
    runner: StepRunner
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    run_dir: Path
    train_bn: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint_every_steps: int | None = None
    check_every: int = 1
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # config, classes: saved with weights
    head_only: Callable[[Stage], CachedSplits | None] = lambda stage: None  # feature-cache path for a stage


@dataclass
class FitResult:
    records: list[dict[str, Any]]
    progress: Progress
    error: str | None = None  # why training stopped abnormally (non-finite loss)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _InterruptFlag:
    """First Ctrl-C asks the loop to checkpoint and stop at the next step; a second one is immediate."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: saving a resumable checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _stage_start(setup: FitSetup, index: int) -> int:
    return sum(stage.epochs for stage in setup.stages[:index])


def _eval_model(setup: FitSetup) -> nn.Module:
    return setup.runner.ema.module if setup.runner.ema is not None else setup.runner.model


def _save(setup: FitSetup, scheduler: Any, progress: Progress, tally: Tally | None, name: str) -> None:
    payload = {
        "model": setup.model.model.state_dict(),
        "optimizer": setup.optimizer.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": setup.runner.scaler.state_dict() if setup.runner.scaler is not None else None,
        "ema": setup.runner.ema.state_dict() if setup.runner.ema is not None else None,
        "progress": asdict(progress),
        "stage": progress.stage,
        "stage_name": setup.stages[progress.stage].name,
        "epoch": progress.epoch,
        "tally": tally.state_dict() if tally is not None else None,
        "rng": checkpoint.rng_state(),
        **setup.checkpoint_extra,
    }
    checkpoint.save_atomic(payload, setup.run_dir / "checkpoints" / name)


def _enter_stage(setup: FitSetup, progress: Progress, index: int) -> Any:
    stage = setup.stages[index]
    apply_stage(setup.model, stage, setup.train_bn)
    setup.optimizer.enter(stage)
    progress.params_trainable[stage.name] = count_trainable(setup.model.model)
    log.info("stage %d/%d '%s': %d epochs, trainable %s (%d params)", index + 1, len(setup.stages), stage.name,
             stage.epochs, ", ".join(f"{g}@{lr:g}" for g, lr in stage.lrs.items()), progress.params_trainable[stage.name])
    return build_scheduler(setup.optimizer.optimizer, setup.scheduler_cfg, stage.epochs * steps_per_epoch(setup.train_loader))


def restore(setup: FitSetup, state: dict[str, Any]) -> tuple[Progress, Any, Tally | None]:
    """Rebuild the optimizer's groups stage by stage, then load every saved state."""
    progress = Progress(**state["progress"])
    scheduler = None
    for index in range(progress.stage + 1):
        scheduler = _enter_stage(setup, Progress(), index)
    progress.params_trainable = dict(state["progress"]["params_trainable"])
    setup.model.model.load_state_dict(state["model"])
    setup.optimizer.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if setup.runner.scaler is not None and state.get("scaler"):
        setup.runner.scaler.load_state_dict(state["scaler"])
    if setup.runner.ema is not None and state.get("ema"):
        setup.runner.ema.load_state_dict(state["ema"])
    tally = None
    if state.get("tally") is not None and progress.step:
        tally = Tally(setup.runner.precision.device, topk_for(setup.num_classes))
        tally.load_state_dict(state["tally"])
    checkpoint.restore_rng_state(state["rng"])
    return progress, scheduler, tally


def fit(setup: FitSetup, resume: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None) -> FitResult:
    """Train every stage in order (from `resume`'s position if given), checkpointing as it goes."""
    records = list(history or [])
    progress, scheduler, tally = restore(setup, resume) if resume else (Progress(), None, None)
    first = progress.stage
    with _InterruptFlag() as interrupt:
        for index in range(first, len(setup.stages)):
            if index != first or scheduler is None:
                progress.stage = index
                scheduler = _enter_stage(setup, progress, index)
            while progress.epoch < _stage_start(setup, index + 1) and progress.stop_reason is None:
                try:
                    record = _epoch(setup, scheduler, progress, tally, interrupt)
                except NonFiniteLoss as error:
                    return FitResult(records, progress, error=str(error))
                tally = None
                records.append(record)
                if interrupt.requested:
                    raise Interrupted(f"interrupted after epoch {progress.epoch}")
            if progress.stop_reason is not None:
                break
    return FitResult(records, progress)


def _epoch(setup: FitSetup, scheduler: Any, progress: Progress, tally: Tally | None,
           interrupt: _InterruptFlag) -> dict[str, Any]:
    """Train one epoch (or its rest), evaluate, record, checkpoint, update early stopping."""
    start = time.perf_counter()
    stage = setup.stages[progress.stage]
    epoch = progress.epoch + 1
    tally = tally or Tally(setup.runner.precision.device, topk_for(setup.num_classes))
    lrs = setup.optimizer.lrs_by_group()

    def on_step(step: int) -> None:
        progress.step = step
        every = setup.checkpoint_every_steps
        if interrupt.requested or (every and step % every == 0):
            _save(setup, scheduler, progress, tally, "last.pt")
        if interrupt.requested:
            raise Interrupted(f"interrupted in epoch {epoch} at step {step}")

    runner, train_loader, eval_model, val_loader = setup.runner, setup.train_loader, _eval_model(setup), setup.val_loader
    cached = setup.head_only(stage)
    if cached is not None:
        precision = replace(runner.precision, channels_last=False)
        runner = replace(runner, model=cached.head, precision=precision)
        train_loader, eval_model, val_loader = cached.train_loader, cached.head, cached.val_loader
    setup.model.model.train()
    hold_frozen_batchnorm(setup.model, stage)
    train_loader.sampler.set_epoch(progress.epoch, skip=progress.step * train_loader.batch_size)
    try:
        train = train_one_epoch(runner, train_loader, scheduler, tally, start_step=progress.step,
                                on_step=on_step, check_every=setup.check_every, description=f"epoch {epoch}")
    except NonFiniteLoss as error:
        progress.stop_reason = f"{error} of epoch {epoch}"
        raise NonFiniteLoss(
            f"{error} of epoch {epoch}: training stopped; checkpoints/last.pt keeps epoch {progress.epoch}. "
            "Lower the lr, set trainer.grad_clip, or check the data"
        ) from None
    val = evaluate(eval_model, val_loader, nn.CrossEntropyLoss(), runner.precision, setup.num_classes)
    progress.epoch, progress.step = epoch, 0
    record = {"epoch": epoch, "stage": stage.name, "lr": {g.name: lrs.get(g.name, 0.0) for g in setup.model.groups},
              **train, **val, "seconds": time.perf_counter() - start}
    runlog.append_metrics(setup.run_dir, record)
    improved = record["val/acc1"] > progress.best_val_acc
    if improved:
        progress.best_val_acc, progress.best_epoch = record["val/acc1"], epoch
    _update_early_stopping(setup.early_stopping, progress, record)
    _save(setup, scheduler, progress, None, "last.pt")
    if improved:
        _save(setup, scheduler, progress, None, "best.pt")
    log.info("epoch %d [%s] train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1fs", epoch, stage.name,
             record["train/loss"], record["train/acc1"], record["val/loss"], record["val/acc1"], record["seconds"])
    return record


def _update_early_stopping(cfg: EarlyStoppingConfig, progress: Progress, record: dict[str, Any]) -> None:
    if cfg.patience is None:
        return
    if cfg.monitor not in record:
        known = ", ".join(k for k in record if k.startswith("val/"))
        raise TransferError(f"trainer.early_stopping.monitor='{cfg.monitor}' is not a metric: use one of {known}")
    value = record[cfg.monitor]
    sign = -1.0 if "loss" in cfg.monitor else 1.0
    if progress.best_monitor is None or sign * (value - progress.best_monitor) > cfg.min_delta:
        progress.best_monitor, progress.bad_epochs = value, 0
        return
    progress.bad_epochs += 1
    if progress.bad_epochs >= cfg.patience:
        progress.stop_reason = (f"early stopping: {cfg.monitor} did not improve by more than {cfg.min_delta} "
                                f"for {cfg.patience} epochs (best {progress.best_monitor:.4f})")
        log.info(progress.stop_reason)
