"""Reading a finished or interrupted run directory back: its config and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from transfer_cli.config import TrainConfig
from transfer_cli.errors import TransferError

if TYPE_CHECKING:
    from transfer_cli.data.transforms import Preprocessing
    from transfer_cli.models import TransferModel


def require_run_dir(path: str | Path) -> Path:
    """`path` as a run directory (one with config.yaml), or a one-line error saying what is wrong."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise TransferError(f"run directory '{path}' does not exist: give the directory `transfer train` printed")
    if not (run_dir / "config.yaml").is_file():
        raise TransferError(f"'{path}' is not a run directory (no config.yaml): give the directory `transfer train` printed")
    return run_dir


def load_run_config(run_dir: Path) -> TrainConfig:
    """The resolved config a run was trained with, validated against the schema."""
    from omegaconf import OmegaConf

    from transfer_cli.config import register_configs

    register_configs()
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml"))
    return OmegaConf.to_object(merged)


CHECKPOINTS = ("best", "last")


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`cfg` with dotted `key=value` overrides merged onto the schema, one at a time so an error names its override."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(cfg)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise TransferError(f"'{item}' is not a key=value override (e.g. trainer.device=cpu)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise TransferError(f"override '{item}': {str(error).splitlines()[0]}") from error
    return OmegaConf.to_object(merged)


def load_trained_model(run_dir: str | Path, checkpoint: str = "best") -> tuple[TrainConfig, TransferModel, list[str]]:
    """The run's config, its network holding the checkpoint's weights (in eval mode, on the CPU), and its class names.

    The network is built with pretrained=False: the checkpoint replaces every weight, so
    nothing is downloaded and a `backbone.checkpoint` file used to start the run may be gone.
    """
    from dataclasses import replace

    from transfer_cli.models import build_model

    path = require_run_dir(run_dir)
    cfg = load_run_config(path)
    file = path / "checkpoints" / f"{checkpoint}.pt"
    state, classes = _read_checkpoint(file, checkpoint)
    model = build_model(replace(cfg.backbone, checkpoint=None), cfg.head, len(classes), pretrained=False)
    problem = _misfit(model.model.state_dict(), state)
    if problem:
        raise TransferError(f"checkpoint {file} does not fit this run's model ({cfg.backbone.name}, "
                            f"{len(classes)} classes): {problem}; was it saved by another run?")
    model.model.load_state_dict(state, strict=True)
    model.model.eval()
    return cfg, model, classes


def preprocessing_of(cfg: TrainConfig, model: TransferModel) -> Preprocessing:
    """The preprocessing the run trained with: the architecture's own plus the run's `transforms.*`.

    pretrained=False only silences the mean/std warning, which the run already gave.
    """
    from transfer_cli.data.transforms import resolve_preprocessing

    return resolve_preprocessing(model.preprocessing, cfg.transforms, pretrained=False)


def _read_checkpoint(file: Path, checkpoint: str) -> tuple[dict[str, Any], list[str]]:
    """The model state dict and class names of a checkpoint, or a one-line error."""
    from transfer_cli import checkpoint as checkpoints

    if checkpoint not in CHECKPOINTS:
        raise TransferError(f"checkpoint={checkpoint}: use {' or '.join(CHECKPOINTS)}")
    if not file.is_file():
        raise TransferError(f"{file} does not exist: the run saved no checkpoint (did it finish an epoch?)")
    try:
        payload = checkpoints.load(file)
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file is the same user-facing problem
        raise TransferError(f"cannot read checkpoint {file} ({type(error).__name__}): "
                            "is it a `transfer train` checkpoint?") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict) or not payload.get("classes"):
        raise TransferError(f"{file} is not a `transfer train` checkpoint (it needs 'model' and 'classes')")
    state = payload["model"]
    if isinstance(payload.get("ema"), dict):  # trainer.ema_decay: the averaged weights are the ones validated
        ema = payload["ema"]
        state = {key.removeprefix("module."): value for key, value in ema.items() if key.startswith("module.")}
    return state, [str(name) for name in payload["classes"]]


def _misfit(own: dict[str, Any], saved: dict[str, Any]) -> str:
    """What keeps `saved` from loading strictly into a model whose state dict is `own` ('' when it fits)."""
    resized = [key for key in own.keys() & saved.keys() if tuple(own[key].shape) != tuple(saved[key].shape)]
    missing = sorted(own.keys() - saved.keys())
    unexpected = sorted(saved.keys() - own.keys())
    problems = []
    if resized:
        key = sorted(resized)[0]
        problems.append(f"{len(resized)} tensor(s) differ in shape (e.g. {key}: checkpoint "
                        f"{list(saved[key].shape)}, model {list(own[key].shape)})")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[0]})")
    return ", ".join(problems)
