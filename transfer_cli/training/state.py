"""Where a run stands (saved in every checkpoint), when it stops early, and what `fit` returns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transfer_cli.config.schema import EarlyStoppingConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.runs.selection import beats, selected_on


log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    stage: int = 0
    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the epoch in progress
    # the best epoch's top-1 and loss on the split it is chosen on (selected_on: select, or val without one)
    best_acc: float = -1.0
    best_loss: float | None = None
    best_epoch: int = 0
    best_monitor: float | None = None
    bad_epochs: int = 0
    stop_reason: str | None = None
    params_trainable: dict[str, int] = field(default_factory=dict)
    epoch_lrs: dict[str, float] = field(default_factory=dict)  # lrs at the first step of the epoch in progress
    step_lrs: dict[str, float] | None = None  # lrs of the last step completed (None: no step yet)
    # per stage entered: each group's highest lr at any of its steps, the sum of its lrs, and the steps run
    peak_lrs: list[dict[str, float]] = field(default_factory=list)
    lr_sums: list[dict[str, float]] = field(default_factory=list)
    stage_steps: list[int] = field(default_factory=list)
    # wall seconds the run's earlier processes spent up to their last checkpoint (a resumed run counts them)
    elapsed_s: float = 0.0

    @classmethod
    def restored(cls, saved: dict[str, Any], where: Path) -> "Progress":
        """A checkpoint's progress; a record lacking a field (not one `fit` wrote) is refused, never guessed."""
        missing = sorted({spec.name for spec in fields(cls)} - set(saved))
        if missing:
            raise TransferError(f"{where}'s progress record lacks {', '.join(missing)}: it is not a checkpoint "
                                "`transfer train` wrote whole; restore it from a copy, or train a new run")
        return cls(**saved)

    def step_ran(self, lrs: dict[str, float]) -> None:
        """Note the lrs a step of the current stage ran with: the epoch's last so far, the stage's peaks and sums."""
        self.step_lrs = lrs
        for per_stage in (self.peak_lrs, self.lr_sums):
            per_stage.extend({} for _ in range(self.stage + 1 - len(per_stage)))
        self.stage_steps.extend(0 for _ in range(self.stage + 1 - len(self.stage_steps)))
        peak, sums = self.peak_lrs[self.stage], self.lr_sums[self.stage]
        for group, lr in lrs.items():
            peak[group] = max(peak.get(group, lr), lr)
            sums[group] = sums.get(group, 0.0) + lr
        self.stage_steps[self.stage] += 1

    def mean_lrs(self, index: int) -> dict[str, float] | None:
        """Each group's lr averaged over the steps stage `index` ran (None for a stage never run)."""
        if index >= len(self.stage_steps) or not self.stage_steps[index]:
            return None
        return {group: total / self.stage_steps[index] for group, total in self.lr_sums[index].items()}


@dataclass
class FitResult:
    records: list[dict[str, Any]]
    progress: Progress
    error: str | None = None  # why training stopped abnormally (non-finite loss)


def check_history(run_dir: Path, records: list[dict[str, Any]], epochs_done: int) -> None:
    """A resumed run's metrics.jsonl must hold exactly the epochs its checkpoint completed, or the run's
    history would silently lack epochs (a damaged line, a file edited or replaced)."""
    logged = [record["epoch"] for record in records]
    if logged != list(range(1, epochs_done + 1)):
        shown = ", ".join(map(str, logged[:10])) + (", ..." if len(logged) > 10 else "") or "none"
        raise TransferError(f"{run_dir / 'metrics.jsonl'} holds epochs [{shown}] but checkpoints/last.pt completed "
                            f"epochs 1 to {epochs_done}: the run's history is incomplete; start a new run")


def improves(progress: Progress, record: dict[str, Any]) -> bool:
    """Whether this epoch beats the best so far on its selection split (runs/selection.py)."""
    return beats(record, progress.best_acc, progress.best_loss)


def keep_best(progress: Progress, record: dict[str, Any]) -> None:
    split = selected_on(record)
    progress.best_acc, progress.best_loss = record[f"{split}/acc1"], record[f"{split}/loss"]
    progress.best_epoch = record["epoch"]


def monitored(cfg: EarlyStoppingConfig, selecting: bool) -> str:
    """The metric early stopping watches: the one named, or the selection split's top-1 (val's without one)."""
    return cfg.monitor or ("select/acc1" if selecting else "val/acc1")


def check_monitor(cfg: EarlyStoppingConfig, num_classes: int, selecting: bool) -> None:
    """Before training: an epoch records top-5 accuracy only with more than 5 classes (the schema allows the
    names), and select/* only where dataset.select_fraction holds a selection split out."""
    if cfg.patience is None:
        return
    monitor = monitored(cfg, selecting)
    if monitor.startswith("select/") and not selecting:
        raise TransferError(f"trainer.early_stopping.monitor={monitor}: dataset.select_fraction=0 holds no selection "
                            f"split out: monitor {monitor.replace('select/', 'val/')}, or set dataset.select_fraction")
    if monitor.endswith("/acc5") and num_classes <= 5:
        split = monitor.split("/")[0]
        raise TransferError(f"trainer.early_stopping.monitor={monitor}: the data has {num_classes} classes, and top-5 "
                            f"accuracy is recorded only with more than 5: monitor {split}/acc1 or {split}/loss")


def update_early_stopping(cfg: EarlyStoppingConfig, progress: Progress, record: dict[str, Any]) -> None:
    """After each epoch (check_monitor and the schema made sure the record holds the monitored metric)."""
    if cfg.patience is None:
        return
    monitor = monitored(cfg, selected_on(record) == "select")
    value = record[monitor]
    sign = -1.0 if "loss" in monitor else 1.0
    if progress.best_monitor is None or sign * (value - progress.best_monitor) > cfg.min_delta:
        progress.best_monitor, progress.bad_epochs = value, 0
        return
    progress.bad_epochs += 1
    if progress.bad_epochs >= cfg.patience:
        progress.stop_reason = (f"early stopping: {monitor} did not improve by more than {cfg.min_delta} "
                                f"for {cfg.patience} epochs (best {progress.best_monitor:.4f})")
        log.info(progress.stop_reason)
