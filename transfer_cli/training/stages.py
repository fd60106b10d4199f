"""A run's fixed parts (`FitSetup`, assembled once) and entering a stage (`enter_stage`: what fit, resume
and the benchmarks all do at a stage boundary), which returns the frozen `StageRun` its epochs use."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.config.schema import EarlyStoppingConfig, SchedulerConfig
from transfer_cli.data.loaders import steps_per_epoch
from transfer_cli.models.model import TransferModel
from transfer_cli.parallel import distributed
from transfer_cli.runs.frozen import FrozenStore
from transfer_cli.training.compiled import CompileWatch, compile_for_stage
from transfer_cli.training.feature_cache import CachedSplits
from transfer_cli.training.loop import StepRunner
from transfer_cli.training.optim import StagedOptimizer, build_scheduler
from transfer_cli.training.state import Progress
from transfer_cli.training.strategies import Stage, apply_stage, reestimate_batchnorm


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSetup:
    """Everything `fit` needs, built once by assemble.py and never changed."""

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
    log_every: int = 50  # progress lines where no terminal shows a bar
    limit_train_batches: int | None = None  # debug=fast: at most this many steps per epoch
    limit_val_batches: int | None = None  # debug=fast: at most this many val batches
    accumulate_steps: int = 1  # batches per optimizer step (trainer.accumulate_steps)
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # config, classes: saved with weights
    stage_data: Callable[[Stage], CachedSplits | None] = lambda stage: None  # cached features for a head-only stage
    compile: bool = False  # torch.compile the network (DDP: its wrapper) afresh at each stage's start
    frozen_store: FrozenStore = field(default_factory=FrozenStore)  # the untrained tensors, written once per run


@dataclass(frozen=True)
class StageRun:
    """One stage as its epochs run it: the runner (DDP-wrapped, or the head alone on cached features),
    the data it trains on, and the stage's schedule."""

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
    features are computed from them); with trainer.compile, the runner's forward is compiled afresh here."""
    stage, runner, train_loader = setup.stages[index], setup.runner, setup.train_loader
    if distributed.active():  # wrap after freezing: DDP syncs only the parameters that now require grad
        runner = replace(runner, model=distributed.wrap(setup.model.model, runner.precision.device))
    cached = setup.stage_data(stage)
    watch = None
    if cached is not None:  # the head alone, on features computed once
        precision = replace(runner.precision, channels_last=False)
        head = distributed.wrap(cached.head, precision.device) if distributed.active() else cached.head
        runner, train_loader = replace(runner, model=head, precision=precision), cached.train_loader
    elif setup.compile:  # a fresh compile per stage, after its freezing (compiled.py says why)
        forward, watch = compile_for_stage(runner.model, stage.name)
        runner = replace(runner, model=forward)
    return StageRun(index, stage, runner, train_loader, scheduler, cached, watch)


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
    steps = stage.epochs * optimizer_steps(setup, epoch_batches(setup, setup.train_loader))
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


def epoch_batches(setup: FitSetup, loader: DataLoader) -> int:
    """Batches in an epoch over `loader`: all of them, or trainer.limit_train_batches (debug=fast)."""
    full = steps_per_epoch(loader)
    return min(full, setup.limit_train_batches) if setup.limit_train_batches else full


def optimizer_steps(setup: FitSetup, batches: int) -> int:
    """Optimizer steps in an epoch of `batches`: one per trainer.accumulate_steps batches, and one for a
    shorter last group, so schedules count the steps that move the weights."""
    return -(-batches // setup.accumulate_steps)
