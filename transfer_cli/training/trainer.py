"""`fit`: stages, epochs, schedules, checkpoints, early stopping, interrupts and resume.

Everything needed to continue a run exactly lives in `Progress` plus the states saved
beside it (model, optimizer, scheduler, scaler, EMA, RNGs), so a run killed at any
checkpoint and resumed ends with the same metrics as one never interrupted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.config.schema import EarlyStoppingConfig, SchedulerConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.loaders import steps_per_epoch
from transfer_cli.models.model import TransferModel
from transfer_cli.parallel import distributed
from transfer_cli.runs import checkpoint, runlog
from transfer_cli.training.engine import NonFiniteLoss, StepRunner, Tally, evaluate, topk_for, train_one_epoch
from transfer_cli.training.feature_cache import CachedSplits
from transfer_cli.training.interrupts import InterruptFlag
from transfer_cli.training.optim import StagedOptimizer, build_scheduler
from transfer_cli.training.progress import FitResult, Progress
from transfer_cli.training.runtime import Precision
from transfer_cli.training.strategies import Stage, apply_stage, hold_frozen_batchnorm, reestimate_batchnorm


log = logging.getLogger(__name__)


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
    compile: bool = False  # DDP: compile the wrapped model at each stage boundary
    logger: Any = None  # loggers.Loggers: TensorBoard, MLflow (rank 0); metrics.jsonl is written regardless


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _stop_requested(setup: FitSetup, interrupt: InterruptFlag) -> bool:
    """Ctrl-C or SIGTERM seen here or, under DDP, by any rank (a collective there: every rank calls it at the same point)."""
    return distributed.any_true(interrupt.requested, setup.runner.precision.device)


def _stage_start(setup: FitSetup, index: int) -> int:
    return sum(stage.epochs for stage in setup.stages[:index])


def _eval_model(setup: FitSetup) -> nn.Module:
    """What validation runs: the EMA, else the training forward (without its DDP wrapper: shards are uneven)."""
    return setup.runner.ema.module if setup.runner.ema is not None else distributed.unwrap(setup.runner.model)


def _save(setup: FitSetup, scheduler: Any, progress: Progress, tally: Tally | None, name: str) -> None:
    """Checkpoint `name`: every rank calls it (DDP sums the tally, gathers RNG states); rank 0 writes."""
    tally = tally.reduced() if tally is not None else None
    rng_by_rank = distributed.gather_objects(checkpoint.rng_state()) if distributed.active() else None
    if not distributed.is_main():
        return
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
        **({"rng_by_rank": rng_by_rank, "world_size": len(rng_by_rank)} if rng_by_rank else {}),
        **setup.checkpoint_extra,
    }
    checkpoint.save_atomic(payload, setup.run_dir / "checkpoints" / name)


def _enter_stage(setup: FitSetup, progress: Progress, index: int, fresh: bool = True) -> Any:
    """Freeze and unfreeze for stage `index`; `fresh` (not rebuilding a resumed run, whose
    checkpoint holds the BatchNorm stats) re-estimates them where the stage's policy says so."""
    stage = setup.stages[index]
    apply_stage(setup.model, stage, setup.train_bn)
    if fresh and stage.bn == "reestimate":
        loader = setup.train_loader
        count, images = reestimate_batchnorm(setup.model, loader.dataset, loader.batch_size, loader.num_workers,
                                             setup.runner.precision)
        log.info("stage '%s': re-estimated the running stats of %d BatchNorm layers on %d training images",
                 stage.name, count, images)
    setup.optimizer.enter(stage)
    progress.params_trainable[stage.name] = count_trainable(setup.model.model)
    if distributed.active():  # wrap after freezing: DDP syncs only the parameters that now require grad
        wrapped = distributed.wrap(setup.model.model, setup.runner.precision.device)
        setup.runner.model = torch.compile(wrapped) if setup.compile else wrapped
    log.info("stage %d/%d '%s': %d epochs, trainable %s (%d params)", index + 1, len(setup.stages), stage.name,
             stage.epochs, ", ".join(f"{g}@{lr:g}" for g, lr in stage.lrs.items()), progress.params_trainable[stage.name])
    return build_scheduler(setup.optimizer.optimizer, setup.scheduler_cfg, stage.epochs * steps_per_epoch(setup.train_loader))


def restore(setup: FitSetup, state: dict[str, Any]) -> tuple[Progress, Any, Tally | None]:
    """Rebuild the optimizer's groups stage by stage, then load every saved state."""
    progress = Progress.restored(state["progress"])
    scheduler = None
    for index in range(progress.stage + 1):
        scheduler = _enter_stage(setup, Progress(), index, fresh=False)
    progress.params_trainable = dict(state["progress"]["params_trainable"])
    problem = checkpoint.misfit(setup.model.model.state_dict(), state["model"])
    if problem:  # e.g. saved by a version that named the classifier otherwise
        raise TransferError(f"checkpoints/last.pt does not fit the model this version builds for the run "
                            f"({problem}): it cannot be resumed; start a new run")
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
        if distributed.is_main():  # the saved tally is the sum over ranks: the others start from zero
            tally.load_state_dict(state["tally"])
    checkpoint.restore_rng_state(_rng_of_this_rank(state))
    return progress, scheduler, tally


def _rng_of_this_rank(state: dict[str, Any]) -> dict[str, Any]:
    """A DDP checkpoint keeps every rank's RNG state; rank r resumes its own when the world size matches."""
    by_rank = state.get("rng_by_rank")
    if not distributed.active():
        return state["rng"]
    if by_rank and len(by_rank) == distributed.world_size():
        return by_rank[distributed.rank()]
    if distributed.is_main():
        log.warning("resuming with %d processes a run checkpointed with %s: the data order is kept, random "
                    "augmentation streams are not", distributed.world_size(), len(by_rank) if by_rank else 1)
    return state["rng"]


def fit(setup: FitSetup, resume: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None) -> FitResult:
    """Train every stage in order (from `resume`'s position if given), checkpointing as it goes."""
    records = list(history or [])
    progress, scheduler, tally = restore(setup, resume) if resume else (Progress(), None, None)
    if distributed.is_main():
        _remove_temp_files(setup.run_dir)
    first = progress.stage
    with InterruptFlag() as interrupt:
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
                if _stop_requested(setup, interrupt):
                    raise interrupt.stopped(f"after epoch {progress.epoch}")
            if progress.stop_reason is not None:
                break
    return FitResult(records, progress)


def check_history(run_dir: Path, records: list[dict[str, Any]], epochs_done: int) -> None:
    """A resumed run's metrics.jsonl must hold exactly the epochs its checkpoint completed, or the run's
    history would silently lack epochs (a damaged line, a file edited or replaced)."""
    logged = [record["epoch"] for record in records]
    if logged != list(range(1, epochs_done + 1)):
        shown = ", ".join(map(str, logged[:10])) + (", ..." if len(logged) > 10 else "") or "none"
        raise TransferError(f"{run_dir / 'metrics.jsonl'} holds epochs [{shown}] but checkpoints/last.pt completed "
                            f"epochs 1 to {epochs_done}: the run's history is incomplete; start a new run")


def _remove_temp_files(run_dir: Path) -> None:
    """Temp files of writes a kill interrupted (SIGKILL, a second SIGTERM): their finished files are intact."""
    removed = checkpoint.remove_orphans(run_dir / "checkpoints") + runlog.remove_temp_files(run_dir)
    if removed:
        log.info("removed %d temp file(s) of writes interrupted by a kill: %s", len(removed),
                 ", ".join(str(path.relative_to(run_dir)) for path in removed))


def _epoch(setup: FitSetup, scheduler: Any, progress: Progress, tally: Tally | None,
           interrupt: InterruptFlag) -> dict[str, Any]:
    """Train one epoch (or its rest), evaluate, record, checkpoint, update early stopping."""
    start = time.perf_counter()
    stage = setup.stages[progress.stage]
    epoch = progress.epoch + 1
    tally = tally or Tally(setup.runner.precision.device, topk_for(setup.num_classes))
    if progress.step == 0:  # a run resumed mid-epoch records the lrs its epoch started with
        progress.epoch_lrs = setup.optimizer.lrs_by_group()
    upcoming = {"lrs": setup.optimizer.lrs_by_group()}  # what the next step runs with (the scheduler steps after it)

    saved = {"step": progress.step}  # where last.pt stands within this epoch (0: at its start)

    def checkpoint_and_stop() -> NoReturn:
        _save(setup, scheduler, progress, tally, "last.pt")
        raise interrupt.stopped(f"in epoch {epoch} at step {progress.step}")

    def on_step(step: int) -> None:
        progress.step = step
        progress.step_ran(upcoming["lrs"])
        upcoming["lrs"] = setup.optimizer.lrs_by_group()
        every = setup.checkpoint_every_steps
        # DDP: every rank must stop (and checkpoint) at the same step, so ranks agree every check_every steps
        if (not distributed.active() or step % setup.check_every == 0) and _stop_requested(setup, interrupt):
            checkpoint_and_stop()
        if every and step % every == 0:
            _save(setup, scheduler, progress, tally, "last.pt")
            saved["step"] = step

    runner, train_loader = setup.runner, setup.train_loader
    cached = setup.head_only(stage)
    if cached is not None:
        precision = replace(runner.precision, channels_last=False)
        head = distributed.wrap(cached.head, precision.device) if distributed.active() else cached.head
        runner = replace(runner, model=head, precision=precision)
        train_loader = cached.train_loader
    setup.model.model.train()
    hold_frozen_batchnorm(setup.model, stage)
    train_loader.sampler.set_epoch(progress.epoch, skip=progress.step * train_loader.batch_size)
    # make_loader's loaders have a generator of their own; the feature cache's does not, and would
    # draw its base seed from the global RNG (dropout, MixUp) once more in an epoch resumed mid-way.
    train_loader.generator = torch.Generator().manual_seed(train_loader.sampler.seed * 1_000_003 + progress.epoch)
    try:
        train = train_one_epoch(runner, train_loader, scheduler, tally, start_step=progress.step,
                                on_step=on_step, check_every=setup.check_every, description=f"epoch {epoch}")
    except NonFiniteLoss as error:
        progress.stop_reason = f"{error} of epoch {epoch}"
        raise NonFiniteLoss(
            f"{error} of epoch {epoch}: training stopped; checkpoints/last.pt keeps epoch {progress.epoch}. "
            "Lower the lr, set trainer.grad_clip, or check the data"
        ) from None
    kept = f"step {saved['step']} of epoch {epoch}" if saved["step"] else f"epoch {progress.epoch}"
    val = _validate(setup, progress, *_validation_target(setup, cached), interrupt, checkpoint_and_stop, kept)
    progress.epoch, progress.step = epoch, 0
    record = {"epoch": epoch, "stage": stage.name, **_lr_record(setup, progress), **train, **val,
              "seconds": time.perf_counter() - start}
    if distributed.is_main():
        runlog.append_metrics(setup.run_dir, record)
        if setup.logger is not None:
            setup.logger.log_metrics(record, epoch)
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


def _lr_record(setup: FitSetup, progress: Progress) -> dict[str, dict[str, float | None]]:
    """Every group's lr at the epoch's last step (`lr`) and first (`lr_start`); 0 for groups not yet trained.
    A OneCycle stage's first epoch starts at max_lr/25: its end says more. An old checkpoint resumed
    after its epoch's last step does not know that step's lrs: null, not a made-up number."""
    start, end = progress.epoch_lrs, progress.step_lrs
    return {"lr": {g.name: None if end is None else end.get(g.name, 0.0) for g in setup.model.groups},
            "lr_start": {g.name: start.get(g.name, 0.0) for g in setup.model.groups}}


def _validation_target(setup: FitSetup, cached: CachedSplits | None) -> tuple[nn.Module, DataLoader, Precision]:
    """What the epoch validates (the EMA where there is one), on which data, at which precision.

    On cached features the head runs alone. The EMA's head may use them only while the EMA's backbone
    equals the live one (an average of weights frozen since the EMA began is those weights); after a stage
    that trained the backbone it lags behind, and the whole EMA runs on the images.
    """
    ema, images = setup.runner.ema, setup.runner.precision
    if cached is None:
        return _eval_model(setup), setup.val_loader, images
    features = replace(images, channels_last=False)
    if ema is None:
        return cached.head, cached.val_loader, features
    if _same_backbone(setup.model, ema.module):
        return ema.module.get_submodule(setup.model.head_path), cached.val_loader, features
    return ema.module, setup.val_loader, images


def _same_backbone(model: TransferModel, other: nn.Module) -> bool:
    """Whether `other` (the same architecture) computes the head's input as `model` does: every floating-point
    tensor outside the head equal (integer buffers, BatchNorm's batch counter, never enter an eval forward)."""
    head = model.head_path + "."
    theirs = other.state_dict()
    return all(torch.equal(tensor, theirs[name]) for name, tensor in model.model.state_dict().items()
               if not name.startswith(head) and tensor.is_floating_point())


def _validate(setup: FitSetup, progress: Progress, model: nn.Module, loader: DataLoader, precision: Precision,
              interrupt: InterruptFlag, stop: Callable[[], NoReturn], kept: str) -> dict[str, float]:
    """The epoch's val pass. A stop request before or during it checkpoints the trained steps, so a long
    pass never delays a preempted job (resume re-runs only the pass); under DDP the ranks' val shards
    differ in length, so there they agree on stopping before the pass only. A non-finite val loss stops
    the run like a non-finite train loss, before this epoch is recorded or checkpointed."""
    distributed.sync_buffers(model)  # DDP: rank 0's BatchNorm statistics, validated and saved by all
    if _stop_requested(setup, interrupt):
        stop()
    alone = not distributed.active()

    def on_batch() -> None:
        if alone and interrupt.requested:
            stop()

    epoch = progress.epoch + 1
    try:
        return evaluate(model, loader, nn.CrossEntropyLoss(), precision, setup.num_classes, on_batch=on_batch)
    except NonFiniteLoss as error:
        progress.stop_reason = f"{error} after epoch {epoch}"
        raise NonFiniteLoss(f"{error} after epoch {epoch}: training stopped; checkpoints/last.pt keeps {kept}. "
                            "Lower the lr, set trainer.grad_clip, or check the data") from None


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
