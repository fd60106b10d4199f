"""A trained run's network back from its directory: its config, the checkpoint's weights, its preprocessing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from transfer_cli.config.loading import load_run_config
from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.transforms import Preprocessing, resolve_preprocessing
from transfer_cli.models.model import TransferModel, build_model
from transfer_cli.runs.checkpoint import misfit
from transfer_cli.runs.rundir import read_checkpoint_file, require_run_dir


CHECKPOINTS = ("best", "last")


def load_trained_model(run_dir: str | Path, checkpoint: str = "best") -> tuple[TrainConfig, TransferModel, list[str]]:
    """The run's config, its network holding the checkpoint's weights (in eval mode, on the CPU), and its class names.

    The network is built with pretrained=False: the checkpoint replaces every weight, so
    nothing is downloaded and a `backbone.checkpoint` file used to start the run may be gone.
    """
    path = require_run_dir(run_dir)
    cfg = load_run_config(path)
    file = path / "checkpoints" / f"{checkpoint}.pt"
    state, classes = _read_checkpoint(file, checkpoint)
    model = build_model(replace(cfg.backbone, checkpoint=None), cfg.head, len(classes), pretrained=False)
    problem = misfit(model.model.state_dict(), state)
    if problem:
        raise TransferError(f"checkpoint {file} does not fit this run's model ({cfg.backbone.name}, "
                            f"{len(classes)} classes): {problem}; was it saved by another run? Retrain it")
    model.model.load_state_dict(state, strict=True)
    model.model.eval()
    return cfg, model, classes


def preprocessing_of(cfg: TrainConfig, model: TransferModel) -> Preprocessing:
    """The preprocessing the run trained with: the architecture's own plus the run's `transforms.*`.

    pretrained=False only silences the mean/std warning, which the run already gave.
    """
    return resolve_preprocessing(model.preprocessing, cfg.transforms, pretrained=False)


def _read_checkpoint(file: Path, checkpoint: str) -> tuple[dict[str, Any], list[str]]:
    """The model state dict and class names of a checkpoint, or a one-line error."""
    if checkpoint not in CHECKPOINTS:
        raise TransferError(f"checkpoint={checkpoint}: use {' or '.join(CHECKPOINTS)}")
    if not file.is_file():
        raise TransferError(f"{file} does not exist: the run saved no checkpoint (did it finish an epoch?)")
    payload = read_checkpoint_file(file)
    if not isinstance(payload.get("model"), dict) or not payload.get("classes"):
        raise TransferError(f"{file} is not a `transfer train` checkpoint (it needs 'model' and 'classes')")
    state = payload["model"]
    if isinstance(payload.get("ema"), dict):  # trainer.ema_decay: the averaged weights are the ones validated
        ema = payload["ema"]
        state = {key.removeprefix("module."): value for key, value in ema.items() if key.startswith("module.")}
    return state, [str(name) for name in payload["classes"]]
