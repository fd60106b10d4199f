"""Where a run stands (saved in every checkpoint) and what `fit` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    epoch_lrs: dict[str, float] = field(default_factory=dict)  # lrs at the first step of the epoch in progress
    step_lrs: dict[str, float] | None = None  # lrs of the last step completed (None: unknown, a resumed old checkpoint)
    # per stage entered: each group's highest lr at any of its steps (None: unknown, a resumed old checkpoint)
    peak_lrs: list[dict[str, float] | None] = field(default_factory=list)

    @classmethod
    def restored(cls, saved: dict[str, Any]) -> "Progress":
        """A checkpoint's progress; one saved before lrs were noted per step has no peaks for the stages it began."""
        progress = cls(**saved)
        if "peak_lrs" not in saved:
            progress.peak_lrs = [None] * (progress.stage + 1)
        return progress

    def step_ran(self, lrs: dict[str, float]) -> None:
        """Note the lrs a step of the current stage ran with: the epoch's last so far, and the stage's peaks."""
        self.step_lrs = lrs
        self.peak_lrs.extend({} for _ in range(self.stage + 1 - len(self.peak_lrs)))
        peak = self.peak_lrs[self.stage]
        if peak is not None:
            for group, lr in lrs.items():
                peak[group] = max(peak.get(group, lr), lr)


@dataclass
class FitResult:
    records: list[dict[str, Any]]
    progress: Progress
    error: str | None = None  # why training stopped abnormally (non-finite loss)
