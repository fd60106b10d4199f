"""`fit`: stages, epochs, schedules, checkpoints and the per-epoch record."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli import checkpoint, runlog
from transfer_cli.config import SchedulerConfig
from transfer_cli.engine import Precision, evaluate, train_one_epoch
from transfer_cli.models import TransferModel
from transfer_cli.optim import StagedOptimizer, build_scheduler
from transfer_cli.strategies import Stage, apply_stage, hold_frozen_batchnorm

log = logging.getLogger(__name__)


@dataclass
class FitSetup:
    """Everything `fit` needs, built once by train.py."""

    model: TransferModel
    stages: list[Stage]
    optimizer: StagedOptimizer
    scheduler_cfg: SchedulerConfig
    train_loader: DataLoader
    val_loader: DataLoader
    loss_fn: nn.Module
    precision: Precision
    num_classes: int
    run_dir: Path
    train_bn: bool = False
    grad_clip: float | None = None
    scaler: torch.amp.GradScaler | None = None
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # config, classes: saved with weights


@dataclass
class FitResult:
    records: list[dict[str, Any]]
    best_val_acc: float
    best_epoch: int
    params_trainable: dict[str, int]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _checkpoint_payload(setup: FitSetup, scheduler: Any, stage_index: int, epoch: int,
                        best: tuple[float, int]) -> dict[str, Any]:
    return {
        "model": setup.model.model.state_dict(),
        "optimizer": setup.optimizer.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": setup.scaler.state_dict() if setup.scaler is not None else None,
        "stage": stage_index,
        "stage_name": setup.stages[stage_index].name,
        "epoch": epoch,
        "best_val_acc": best[0],
        "best_epoch": best[1],
        "rng": checkpoint.rng_state(),
        **setup.checkpoint_extra,
    }


def fit(setup: FitSetup) -> FitResult:
    """Train every stage in order, evaluating and checkpointing after each epoch."""
    records: list[dict[str, Any]] = []
    best = (-1.0, 0)
    trainable: dict[str, int] = {}
    epoch = 0
    for stage_index, stage in enumerate(setup.stages):
        apply_stage(setup.model, stage, setup.train_bn)
        setup.optimizer.enter(stage)
        trainable[stage.name] = count_trainable(setup.model.model)
        log.info("stage %d/%d '%s': %d epochs, trainable %s (%d params)", stage_index + 1, len(setup.stages),
                 stage.name, stage.epochs, ", ".join(f"{g}@{lr:g}" for g, lr in stage.lrs.items()),
                 trainable[stage.name])
        scheduler = build_scheduler(setup.optimizer.optimizer, setup.scheduler_cfg,
                                    stage.epochs * len(setup.train_loader))
        for _ in range(stage.epochs):
            epoch += 1
            record = _run_epoch(setup, stage, scheduler, epoch)
            records.append(record)
            runlog.append_metrics(setup.run_dir, record)
            improved = record["val/acc1"] > best[0]
            if improved:
                best = (record["val/acc1"], epoch)
            payload = _checkpoint_payload(setup, scheduler, stage_index, epoch, best)
            checkpoint.save_atomic(payload, setup.run_dir / "checkpoints" / "last.pt")
            if improved:
                checkpoint.save_atomic(payload, setup.run_dir / "checkpoints" / "best.pt")
            log.info("epoch %d [%s] train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1fs",
                     epoch, stage.name, record["train/loss"], record["train/acc1"],
                     record["val/loss"], record["val/acc1"], record["seconds"])
    return FitResult(records, best[0], best[1], trainable)


def _run_epoch(setup: FitSetup, stage: Stage, scheduler: Any, epoch: int) -> dict[str, Any]:
    start = time.perf_counter()
    lrs = setup.optimizer.lrs_by_group()  # lrs at the epoch's first step
    train = train_one_epoch(
        setup.model.model, setup.train_loader, setup.optimizer.optimizer, scheduler, setup.loss_fn,
        setup.precision, setup.num_classes, scaler=setup.scaler, grad_clip=setup.grad_clip,
        before_epoch=lambda: hold_frozen_batchnorm(setup.model, stage), description=f"epoch {epoch} train",
    )
    val = evaluate(setup.model.model, setup.val_loader, setup.loss_fn, setup.precision, setup.num_classes)
    return {
        "epoch": epoch,
        "stage": stage.name,
        "lr": {group: lrs.get(group, 0.0) for group in (g.name for g in setup.model.groups)},
        **train,
        **val,
        "seconds": time.perf_counter() - start,
    }
