"""A run's parts (`FitSetup`, assembled once), entering a stage (`enter_stage`: what fit, resume and the
benchmarks all do at a stage boundary), which returns the `StageRun` its epochs use, and what an epoch
validates (`validation_target`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.config.schema import SchedulerConfig, TrainerConfig
from transfer_cli.data.loaders import steps_per_epoch
from transfer_cli.models.model import TransferModel
from transfer_cli.models.runtime import Precision
from transfer_cli.parallel import distributed
from transfer_cli.runs.frozen import FrozenStore
from transfer_cli.training.compiled import CompileWatch, compile_for_stage
from transfer_cli.training.feature_cache import CachedSplits
from transfer_cli.training.loop import Accumulation, StepRunner
from transfer_cli.training.optim import StagedOptimizer, build_scheduler
from transfer_cli.training.state import Progress
from transfer_cli.training.strategies import Stage, apply_stage, reestimate_batchnorm


log = logging.getLogger(__name__)


@dataclass
class FitSetup:
    """Everything `fit` needs, built once by assemble.py. Not frozen: its parts are live training state (weights,
    optimizer groups, the frozen store), though which parts they are never changes."""

    model: TransferModel
    stages: list[Stage]
    optimizer: StagedOptimizer
    scheduler_cfg: SchedulerConfig
    runner: StepRunner
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    run_dir: Path
    train_bn: bool = False  # strategy.train_bn
    # limits, checkpoints, accumulation, early stopping, compile, log_every
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # config, classes: saved with weights
    stage_data: Callable[[Stage], CachedSplits | None] = lambda stage: None  # cached features for a head-only stage
    frozen_store: FrozenStore = field(default_factory=FrozenStore)  # the untrained tensors, written once per run

    @property
    def check_every(self) -> int:
        """Steps between the host syncs that check the loss is finite: every step on the CPU (a sync costs
        nothing there), else trainer.log_every."""
        return 1 if self.runner.precision.device.type == "cpu" else max(1, self.trainer.log_every)

    def accumulation(self, loader: DataLoader) -> Accumulation:
        """An epoch over `loader`: its batches (all, or trainer.limit_train_batches) and their optimizer steps."""
        full, limit = steps_per_epoch(loader), self.trainer.limit_train_batches
        return Accumulation(min(full, limit) if limit else full, self.trainer.accumulate_steps)


@dataclass
class StageRun:
    """One stage as its epochs run it: the runner (DDP-wrapped, compiled, or the head alone on cached
    features), the data it trains on, and the stage's schedule (which steps as the epochs run)."""

    index: int
    stage: Stage
    runner: StepRunner
    train_loader: DataLoader
    scheduler: Any
    cached: CachedSplits | None = None
    compiled: CompileWatch | None = None  # trainer.compile=true: what torch.compile did in this stage


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def enter_stage(setup: FitSetup, progress: Progress, index: int, fresh: bool = True) -> StageRun:
    """Freeze and unfreeze for stage `index` and return how its epochs run; `fresh` (not rebuilding a
    resumed run, whose checkpoint holds the BatchNorm stats) re-estimates them where the stage's policy says so."""
    return stage_run(setup, index, prepare_stage(setup, progress, index, fresh))


def stage_run(setup: FitSetup, index: int, scheduler: Any) -> StageRun:
    """The runner and data of an entered stage (a resumed one's after its weights are loaded: the cached
    features are computed from them)."""
    stage = setup.stages[index]
    cached = setup.stage_data(stage)
    forward, watch = _stage_forward(setup, stage, cached)
    # cached features are (batch, channels) tensors: no memory format to choose
    precision = setup.runner.precision if cached is None else replace(setup.runner.precision, channels_last=False)
    runner = replace(setup.runner, model=forward, precision=precision)
    train_loader = setup.train_loader if cached is None else cached.train_loader
    return StageRun(index, stage, runner, train_loader, scheduler, cached, watch)


def _stage_forward(setup: FitSetup, stage: Stage, cached: CachedSplits | None) -> tuple[nn.Module, CompileWatch | None]:
    """What the stage's steps run forward: the head on cached features, else the network; DDP-wrapped after the
    stage's freezing (DDP syncs only the parameters that now require grad); with trainer.compile, compiled
    afresh (compiled.py says why)."""
    device = setup.runner.precision.device
    if cached is not None:
        return (distributed.wrap(cached.head, device) if distributed.active() else cached.head), None
    forward = distributed.wrap(setup.model.model, device) if distributed.active() else setup.runner.model
    if setup.trainer.compile:
        return compile_for_stage(forward, stage.name)
    return forward, None


def prepare_stage(setup: FitSetup, progress: Progress, index: int, fresh: bool) -> Any:
    """The part of entering a stage that a resume repeats for every stage before its own: the frozen
    groups, the BatchNorm policy, the optimizer's groups; returns the stage's scheduler."""
    stage = setup.stages[index]
    apply_stage(setup.model, stage, setup.train_bn)
    if fresh and stage.bn == "reestimate":
        loader = setup.train_loader
        count, images = reestimate_batchnorm(setup.model, loader.dataset, loader.batch_size, loader.num_workers,
                                             setup.runner.precision)
        log.info("stage '%s': re-estimated the running stats of %d BatchNorm layers on %d training images",
                 stage.name, count, images)
    setup.optimizer.enter(stage)
    trainable = count_trainable(setup.model.model)
    progress.params_trainable[stage_labels(setup.stages)[index]] = trainable
    log.info("stage %d/%d '%s': %d epochs, trainable %s (%d params)", index + 1, len(setup.stages), stage.name,
             stage.epochs, ", ".join(f"{g}@{lr:g}" for g, lr in stage.lrs.items()), trainable)
    steps = stage.epochs * setup.accumulation(setup.train_loader).steps
    return build_scheduler(setup.optimizer.optimizer, setup.scheduler_cfg, steps)


def stage_labels(stages: list[Stage]) -> list[str]:
    """Each stage's key in params_trainable: its name, or, where an earlier stage took that name, the name with
    the first free `#k` (head, all, head#2), so a strategy that repeats a name keeps one count per stage."""
    labels: list[str] = []
    for stage in stages:
        label, k = stage.name, 1
        while label in labels:
            k += 1
            label = f"{stage.name}#{k}"
        labels.append(label)
    return labels


def validation_target(setup: FitSetup, run: StageRun) -> tuple[nn.Module, DataLoader, Precision]:
    """What an epoch of `run` validates (the EMA where there is one), on which data, at which precision.

    On cached features the head runs alone. The EMA's head may use them only while the EMA's backbone
    equals the live one (an average of weights frozen since the EMA began is those weights); after a stage
    that trained the backbone it lags behind, and the whole EMA runs on the images.
    """
    ema, cached = setup.runner.ema, run.cached
    if cached is None:
        return run.runner.eval_network(), setup.val_loader, setup.runner.precision
    if ema is None:
        return cached.head, cached.val_loader, run.runner.precision
    if _same_backbone(setup.model, ema.module):
        return ema.module.get_submodule(setup.model.head_path), cached.val_loader, run.runner.precision
    return ema.module, setup.val_loader, setup.runner.precision


def _same_backbone(model: TransferModel, other: nn.Module) -> bool:
    """Whether `other` (the same architecture) computes the head's input as `model` does: every floating-point
    tensor outside the head equal (integer buffers, BatchNorm's batch counter, never enter an eval forward)."""
    head = model.head_path + "."
    theirs = other.state_dict()
    return all(torch.equal(tensor, theirs[name]) for name, tensor in model.model.state_dict().items()
               if not name.startswith(head) and tensor.is_floating_point())
