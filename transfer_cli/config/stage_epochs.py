"""Stage lengths as a run runs them: the strategy's epochs rescaled to `trainer.epochs`.

config.yaml records a run's stages this way, so reading it back rescales nothing (the stages already sum to
trainer.epochs). Torch-free: a re-run sweep job compares its config with a finished run's config.yaml without
loading torch.
"""

from __future__ import annotations

from dataclasses import replace

from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.apportion import apportion
from transfer_cli.core.errors import TransferError


def scale_epochs(epochs: list[int], total: int | None) -> list[int]:
    """Stage lengths rescaled to `total` in proportion (largest remainder, each >= 1)."""
    if any(count <= 0 for count in epochs):
        raise TransferError(f"stage epochs must be positive, got {epochs}: fix strategy.stages[*].epochs")
    if total is None or total == sum(epochs):
        return list(epochs)
    if total < len(epochs):
        raise TransferError(
            f"trainer.epochs={total} is fewer than the strategy's {len(epochs)} stages: give at least {len(epochs)}"
        )
    return apportion(epochs, total)


def as_run(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its strategy's stage epochs as they run (rescaled to `trainer.epochs`). A size-table strategy
    (`auto`) has no stages of its own until the data picks them: plan.json and summary.json show those."""
    stages = cfg.strategy.stages
    if not stages:
        return cfg
    epochs = scale_epochs([stage.epochs for stage in stages], cfg.trainer.epochs)
    return replace(cfg, strategy=replace(cfg.strategy, stages=[replace(stage, epochs=count)
                                                                for stage, count in zip(stages, epochs)]))
