"""`fit`: stages, epochs, schedules, checkpoints, early stopping, interrupts and resume; `Callback`, its hooks.

A run is assembled once into a `FitSetup`; entering a stage (stages.py) returns a `StageRun`: the
runner, the data and the schedule of that stage. A head-only stage may ask the
setup's `stage_data` for cached features; it then trains the head on them instead of images.
Everything needed to continue a run exactly lives in `Progress` plus the states saved
beside it (model, optimizer, scheduler, scaler, EMA, RNGs), so a run killed at any
checkpoint and resumed ends with the same metrics as one never interrupted.

`fit(setup, callbacks=[...])` (and `run.train(cfg, run_dir, callbacks=[...])`) calls each `Callback`'s
hooks as the run goes: `on_epoch_start(stage, epoch)`, `on_step(epoch, step)`, `on_epoch_end(record)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import remove_temp_files
from transfer_cli.inference.topk import topk_for
from transfer_cli.models.runtime import Precision
from transfer_cli.parallel import distributed
from transfer_cli.runs import checkpoint, runlog
from transfer_cli.training.epoch_progress import EpochProgress
from transfer_cli.training.freezing import Stage, hold_frozen_batchnorm
from transfer_cli.training.interrupts import InterruptFlag
from transfer_cli.training.loop import Accumulation, NonFiniteLoss, Tally, evaluate, train_one_epoch
from transfer_cli.training.stages import FitSetup, StageRun, enter_stage, prepare_stage, stage_run, validation_target
from transfer_cli.training.state import FitResult, Progress, improves, keep_best, update_early_stopping


log = logging.getLogger(__name__)


class Callback:
    """A hook into `fit`: subclass it and override the hooks you need (the others do nothing). A hook that
    raises stops the run there: the exception leaves `fit` (and `train`, which closes the loggers first), and
    the last checkpoint stays resumable. Under DDP every rank calls its hooks at the same points."""

    def on_epoch_start(self, stage: Stage, epoch: int) -> None:
        """Before the first batch of epoch `epoch` (1-based, counted over the run) of `stage`, or of its rest
        where a run resumes mid-epoch."""

    def on_step(self, epoch: int, step: int) -> None:
        """After each optimizer step: `step` batches of epoch `epoch` done, and saved in last.pt where
        trainer.checkpoint_every_steps falls on this step."""

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        """After an epoch: its record (what metrics.jsonl keeps) logged, its checkpoints saved, early stopping
        updated."""


def _stop_requested(setup: FitSetup, interrupt: InterruptFlag) -> bool:
    """Ctrl-C or SIGTERM seen here or, under DDP, by any rank (a collective there: every rank calls it at the
    same point)."""
    return distributed.any_true(interrupt.requested, setup.runner.precision.device)


def _stage_start(setup: FitSetup, index: int) -> int:
    return sum(stage.epochs for stage in setup.stages[:index])


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
        # elapsed_s: this process's seconds so far added, so a resume counts them
        "progress": {**asdict(progress), "elapsed_s": progress.elapsed_s + time.perf_counter() - setup.started},
        "stage": progress.stage,
        "stage_name": setup.stages[progress.stage].name,
        "epoch": progress.epoch,
        "tally": tally.state_dict() if tally is not None else None,
        "rng": checkpoint.rng_state(),
        **({"rng_by_rank": rng_by_rank, "world_size": len(rng_by_rank)} if rng_by_rank else {}),
        **setup.checkpoint_extra,
    }
    if name == "best.pt":  # what eval, predict and export read: the weights, never the state a resume needs
        payload = {key: value for key, value in payload.items() if key not in RESUME_ONLY}
    folder = setup.run_dir / "checkpoints"
    checkpoint.save_atomic(setup.frozen_store.shrink(payload, setup.model.model, folder), folder / name)
    setup.frozen_store.remove_unreferenced(folder, ("last.pt", "best.pt"))


# what only a resume reads; "splits": which images the run trains and validates on (datasets.split_identity)
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "tally", "rng", "rng_by_rank", "world_size", "splits")


def restore(setup: FitSetup, state: dict[str, Any]) -> tuple[Progress, StageRun, Tally | None]:
    """Rebuild the optimizer's groups stage by stage, then load every saved state."""
    progress = Progress.restored(state["progress"], setup.run_dir / "checkpoints" / "last.pt")
    for index in range(progress.stage + 1):
        scheduler = prepare_stage(setup, Progress(), index, fresh=False)
    progress.params_trainable = dict(state["progress"]["params_trainable"])
    problem = checkpoint.misfit(setup.model.model.state_dict(), state["model"])
    if problem:  # e.g. a classifier whose keys or shapes differ from the network built here
        raise TransferError(f"checkpoints/last.pt does not fit the model built for the run "
                            f"({problem}): it cannot be resumed; start a new run")
    setup.model.model.load_state_dict(state["model"])
    setup.frozen_store.adopt(state)
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
    run = stage_run(setup, progress.stage, scheduler)
    checkpoint.restore_rng_state(_rng_of_this_rank(state))
    return progress, run, tally


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


def fit(setup: FitSetup, resume: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
        logger: Any = None, callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train every stage in order (from `resume`'s position if given), checkpointing as it goes; `logger`
    (TensorBoard, MLflow: rank 0) gets each epoch's record, which metrics.jsonl keeps regardless, and every
    trainer.log_every optimizer steps of the run the epoch's running train loss and accuracy and the step's lrs
    (what the progress line shows); `callbacks` see each epoch start, each optimizer step and each epoch's record."""
    records = list(history or [])
    progress, run, tally = restore(setup, resume) if resume else (Progress(), None, None)
    if distributed.is_main():
        _remove_temp_files(setup.run_dir)
    first = progress.stage
    with InterruptFlag() as interrupt:
        for index in range(first, len(setup.stages)):
            if index != first or run is None:
                progress.stage = index
                run = enter_stage(setup, progress, index)
            while progress.epoch < _stage_start(setup, index + 1) and progress.stop_reason is None:
                try:
                    record = _epoch(setup, run, progress, tally, interrupt, logger, callbacks)
                except NonFiniteLoss as error:
                    return FitResult(records, progress, error=str(error))
                tally = None
                records.append(record)
                for callback in callbacks:
                    callback.on_epoch_end(record)
                if _stop_requested(setup, interrupt):
                    raise interrupt.stopped(f"after epoch {progress.epoch}")
            if progress.stop_reason is not None:
                break
    return FitResult(records, progress)


# the files of a run directory written through atomic_file (by folder): only their temp files are a run's to remove
TEMP_TARGETS = {".": ("metrics.jsonl", "summary.json", "plan.json", "curves.png"),
                "checkpoints": ("last.pt", "best.pt", "frozen-*.pt")}


def _remove_temp_files(run_dir: Path) -> None:
    """Temp files of writes a kill interrupted (SIGKILL, a second SIGTERM): their finished files are intact."""
    removed = [path for folder, targets in TEMP_TARGETS.items()
               for path in remove_temp_files(run_dir / folder, targets)]
    if removed:
        log.info("removed %d temp file(s) of writes interrupted by a kill: %s", len(removed),
                 ", ".join(str(path.relative_to(run_dir)) for path in removed))


def _epoch(setup: FitSetup, run: StageRun, progress: Progress, tally: Tally | None, interrupt: InterruptFlag,
           logger: Any, callbacks: Sequence[Callback]) -> dict[str, Any]:
    """Train one epoch (or its rest), evaluate, record, checkpoint, update early stopping."""
    start = time.perf_counter()
    stage, scheduler = run.stage, run.scheduler
    epoch = progress.epoch + 1
    for callback in callbacks:
        callback.on_epoch_start(stage, epoch)
    tally = tally or Tally(setup.runner.precision.device, topk_for(setup.num_classes))
    if progress.step == 0:  # a run resumed mid-epoch records the lrs its epoch started with
        progress.epoch_lrs = setup.optimizer.lrs_by_group()
    upcoming = {"lrs": setup.optimizer.lrs_by_group()}  # what the next step runs with (the scheduler steps after it)
    train_loader = _start_epoch(setup, run, progress)
    accumulation = setup.accumulation(train_loader)
    saved = {"step": progress.step}  # where last.pt stands within this epoch (0: at its start)

    def checkpoint_and_stop() -> NoReturn:
        _save(setup, scheduler, progress, tally, "last.pt")
        raise interrupt.stopped(f"in epoch {epoch} at step {progress.step}")

    def on_step(step: int) -> None:  # after each optimizer step: `step` batches done
        progress.step = step
        progress.step_ran(upcoming["lrs"])
        upcoming["lrs"] = setup.optimizer.lrs_by_group()
        if logger and (done := sum(progress.stage_steps)) % setup.trainer.log_every == 0:  # the run's optimizer steps
            logger.log_step({**tally.result("train_step"), "train_step/lr": progress.step_lrs}, done)
        every = setup.trainer.checkpoint_every_steps
        # DDP: every rank must stop (and checkpoint) at the same step, so ranks agree every check_every steps
        agreed = not distributed.active() or accumulation.reaches(step, setup.check_every)
        if agreed and _stop_requested(setup, interrupt):
            checkpoint_and_stop()
        if every and accumulation.reaches(step, every):
            _save(setup, scheduler, progress, tally, "last.pt")
            saved["step"] = step
        for callback in callbacks:
            callback.on_step(epoch, step)

    try:
        train = train_one_epoch(run.runner, train_loader, scheduler, tally, start_step=progress.step,
                                on_step=on_step, check_every=setup.check_every, description=f"epoch {epoch}",
                                progress=_epoch_progress(setup, run, epoch, progress, accumulation),
                                accumulation=accumulation)
    except NonFiniteLoss as error:
        progress.stop_reason = f"{error} of epoch {epoch}"
        where = f"step {saved['step']} of epoch {epoch}" if saved["step"] else f"epoch {progress.epoch}"
        raise NonFiniteLoss(f"{error} of epoch {epoch}: training stopped; {_kept(setup, where)}. Lower the lr, set "
                            "trainer.grad_clip, or check the data") from None
    if run.compiled is not None:  # what torch.compile did in the epoch's training steps
        run.compiled.report()
    kept = f"step {saved['step']} of epoch {epoch}" if saved["step"] else f"epoch {progress.epoch}"
    val = _validate(setup, progress, *validation_target(setup, run), interrupt, checkpoint_and_stop, kept)
    progress.epoch, progress.step = epoch, 0
    record = {"epoch": epoch, "stage": stage.name, **_lr_record(setup, progress), **train, **val,
              "seconds": time.perf_counter() - start}
    _settle_epoch(setup, scheduler, progress, record, logger)
    return record


def _settle_epoch(setup: FitSetup, scheduler: Any, progress: Progress, record: dict[str, Any], logger: Any) -> None:
    """A finished epoch: its record logged, the best epoch and early stopping updated, its checkpoints saved."""
    epoch = record["epoch"]
    if distributed.is_main():
        runlog.append_metrics(setup.run_dir, record)
        if logger is not None:
            logger.log_metrics(record, epoch)
    improved = improves(progress, record)
    if improved:
        keep_best(progress, record)
    update_early_stopping(setup.trainer.early_stopping, progress, record)
    _save(setup, scheduler, progress, None, "last.pt")
    if improved:
        _save(setup, scheduler, progress, None, "best.pt")
    select = (f" | select loss {record['select/loss']:.4f} acc {record['select/acc1']:.3f}"
              if "select/acc1" in record else "")
    log.info("epoch %d [%s] train loss %.4f acc %.3f%s | val loss %.4f acc %.3f | %.1fs%s", epoch, record["stage"],
             record["train/loss"], record["train/acc1"], select, record["val/loss"], record["val/acc1"],
             record["seconds"], " (best)" if improved else "")


def _kept(setup: FitSetup, where: str) -> str:
    """What a run stopped by a non-finite loss keeps: its last checkpoint (at `where`), or none yet."""
    if (setup.run_dir / "checkpoints" / "last.pt").is_file():
        return f"checkpoints/last.pt keeps {where}"
    return "no checkpoint was saved before it"


def _epoch_progress(setup: FitSetup, run: StageRun, epoch: int, progress: Progress,
                    accumulation: Accumulation) -> EpochProgress:
    """The bar or the log lines of this epoch: `epoch 3/20 [last_block] step 40/120 ...` (rank 0 only), its lr
    the one the last step ran with (the scheduler has stepped past it: at a OneCycle stage's end, far)."""
    total = _stage_start(setup, len(setup.stages))
    return EpochProgress(f"epoch {epoch}/{total} [{run.stage.name}]", accumulation.batches, progress.step,
                         run.train_loader.batch_size * distributed.world_size(), lambda: progress.step_lrs or {},
                         setup.trainer.log_every, bar=None if distributed.is_main() else False)


def _start_epoch(setup: FitSetup, run: StageRun, progress: Progress) -> Any:
    """Train mode (frozen groups held in eval), and the stage's loader positioned for this epoch (or its rest)."""
    train_loader = run.train_loader
    setup.model.model.train()
    hold_frozen_batchnorm(setup.model, run.stage)
    train_loader.sampler.set_epoch(progress.epoch, skip=progress.step * train_loader.batch_size)
    # the base seed DataLoader draws for this epoch's iterator: a function of (seed, epoch), so a resumed
    # epoch draws what the uninterrupted one drew (make_loader gives every loader a generator of its own)
    train_loader.generator.manual_seed(train_loader.sampler.seed * 1_000_003 + progress.epoch)
    return train_loader


def _lr_record(setup: FitSetup, progress: Progress) -> dict[str, dict[str, float | None]]:
    """Every group's lr at the epoch's last step (`lr`) and first (`lr_start`); 0 for groups not yet trained.
    A OneCycle stage's first epoch starts at max_lr/25: its end says more."""
    start, end = progress.epoch_lrs, progress.step_lrs
    return {"lr": {g.name: None if end is None else end.get(g.name, 0.0) for g in setup.model.groups},
            "lr_start": {g.name: start.get(g.name, 0.0) for g in setup.model.groups}}


def _validate(setup: FitSetup, progress: Progress, model: nn.Module, loaders: dict[str, DataLoader],
              precision: Precision, interrupt: InterruptFlag, stop: Callable[[], NoReturn],
              kept: str) -> dict[str, float]:
    """The epoch's evaluation passes (the selection split's, then val's). A stop request before or during them
    checkpoints the trained steps, so a long pass never delays a preempted job (resume re-runs only the passes);
    under DDP the ranks' shards differ in length, so there they agree on stopping before the passes only. A
    non-finite loss stops the run like a non-finite train loss, before this epoch is recorded or checkpointed."""
    distributed.sync_buffers(model)  # DDP: rank 0's BatchNorm statistics, validated and saved by all
    if _stop_requested(setup, interrupt):
        stop()
    alone = not distributed.active()

    def on_batch() -> None:
        if alone and interrupt.requested:
            stop()

    epoch = progress.epoch + 1
    metrics: dict[str, float] = {}
    try:
        for split, loader in loaders.items():
            metrics |= evaluate(model, loader, nn.CrossEntropyLoss(), precision, setup.num_classes, prefix=split,
                                on_batch=on_batch, max_batches=setup.trainer.limit_val_batches)
    except NonFiniteLoss as error:
        progress.stop_reason = f"{error} after epoch {epoch}"
        raise NonFiniteLoss(f"{error} after epoch {epoch}: training stopped; {_kept(setup, kept)}. Lower the lr, set "
                            "trainer.grad_clip, or check the data") from None
    return metrics
