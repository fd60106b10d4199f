"""Stage lengths as a run runs them: the strategy's epochs rescaled to `trainer.epochs` when the config is
composed (config.yaml records them so, and reading it back rescales nothing)."""

from __future__ import annotations

from transfer_cli.core.apportion import apportion
from transfer_cli.core.errors import TransferError


def scale_epochs(epochs: list[int], total: int | None, per_stage: int | None = None) -> list[int]:
    """Stage lengths rescaled to `total` in proportion (largest remainder, each >= 1), or `per_stage` each
    (trainer.epochs_per_stage: debug=fast's one epoch a stage, whatever the strategy's stage count)."""
    if any(count <= 0 for count in epochs):
        raise TransferError(f"stage epochs must be positive, got {epochs}: fix the stages' epochs "
                            "(strategy.stages.i.epochs, i from 0)")
    if per_stage is not None:
        if total is not None and total != per_stage * len(epochs):
            raise TransferError(f"trainer.epochs={total} and trainer.epochs_per_stage={per_stage} disagree: set "
                                "one of them to null (trainer.epochs_per_stage=null or trainer.epochs=null)")
        return [per_stage] * len(epochs)
    if total is None or total == sum(epochs):
        return list(epochs)
    if total < len(epochs):
        raise TransferError(
            f"trainer.epochs={total} is fewer than the strategy's {len(epochs)} stages: give at least {len(epochs)}"
        )
    return apportion(epochs, total)
