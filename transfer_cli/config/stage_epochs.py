"""Stage lengths as a run runs them: the strategy's epochs rescaled to `trainer.epochs` when the config is
composed (config.yaml records them so, and reading it back rescales nothing)."""

from __future__ import annotations

from transfer_cli.core.apportion import apportion
from transfer_cli.core.errors import TransferError


def scale_epochs(epochs: list[int], total: int | None) -> list[int]:
    """Stage lengths rescaled to `total` in proportion (largest remainder, each >= 1)."""
    if any(count <= 0 for count in epochs):
        raise TransferError(f"stage epochs must be positive, got {epochs}: fix the stages' epochs "
                            "(strategy.stages.i.epochs, i from 0)")
    if total is None or total == sum(epochs):
        return list(epochs)
    if total < len(epochs):
        raise TransferError(
            f"trainer.epochs={total} is fewer than the strategy's {len(epochs)} stages: give at least {len(epochs)}"
        )
    return apportion(epochs, total)
