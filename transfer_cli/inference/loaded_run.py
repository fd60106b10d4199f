"""A trained run in memory for Python callers (`transfer_cli.load_run`): model, classes, transform, with
`predict` (what `transfer predict` gives) and `evaluate` (what `transfer eval` computes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.folder import FileImages, image_files, load_rgb, to_rgb
from transfer_cli.data.loaders import TransformedDataset, eval_loader
from transfer_cli.data.transforms import eval_transform
from transfer_cli.inference.evaluate import evaluate_run
from transfer_cli.inference.load import load_trained_model, preprocessing_of
from transfer_cli.inference.predict import Prediction, find_images, readable, top_k_predictions
from transfer_cli.models.runtime import resolve_device, resolve_precision


class _Images(FileImages):
    """(RGB image, index) per file or PIL image, decoded as `transfer predict` decodes files."""

    def __init__(self, items: list[Path | Image.Image]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, plan: Any = None) -> tuple[Image.Image, int]:
        """Item `index`, a file's JPEG decoded at the reduced size the run's eval transform allows (as eval)."""
        item = self.items[index]
        return (load_rgb(item, plan) if isinstance(item, Path) else to_rgb(item)), index


class LoadedRun:
    """A trained run, ready to use: `model` (eval mode, on `device`), `classes`, `transform`, `config`."""

    def __init__(self, run_dir: Path, checkpoint: str, device: str | None) -> None:
        cfg, transfer_model, classes = load_trained_model(run_dir, checkpoint)
        self.run_dir, self.checkpoint, self.classes = Path(run_dir), checkpoint, classes
        self.config: TrainConfig = cfg
        self._device_choice = device
        if device:  # checked as the config's own value is (TrainConfig checks its tree)
            trainer = replace(cfg, trainer=replace(cfg.trainer, device=device)).trainer
        else:
            trainer = cfg.trainer
        self._trainer = trainer
        self.device = resolve_device(trainer.device)
        self._precision, _ = resolve_precision(trainer, self.device)
        memory_format = torch.channels_last if self._precision.channels_last else torch.contiguous_format
        self.model: nn.Module = transfer_model.model.to(self.device, memory_format=memory_format)
        self.transform = eval_transform(preprocessing_of(cfg, transfer_model), draft=cfg.transforms.draft_decode)

    def __repr__(self) -> str:
        return (f"LoadedRun({str(self.run_dir)!r}, checkpoint={self.checkpoint!r}, "
                f"{self.config.backbone.name}, {len(self.classes)} classes, {self.device})")

    def predict(self, images: Any, top_k: int = 5) -> list[Prediction]:
        """Top-k (class, probability) per image, most probable first: image files, folders (searched as
        `transfer predict` searches them; unreadable files skipped with a warning) or PIL images, in order.
        A result's `path` is the file's, or `<image N>` for the PIL image at position N of `images`."""
        if top_k < 1:
            raise TransferError(f"top_k={top_k}: give at least 1")
        given = _given(images)
        items = _gather(given)
        names = _names(given, items)
        dataset = TransformedDataset(_Images(items), self.transform)
        loader = eval_loader(dataset, self._trainer, pin_memory=self.device.type == "cuda")
        return top_k_predictions(self.model, loader, self._precision, self.classes, names, top_k)

    def evaluate(self, split: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
        """The metrics `transfer eval RUN_DIR` computes (top-1, top-5, balanced accuracy, per-class, macro-F1, loss) on
        `split` (None: the split the run validated on), also written to RUN_DIR/eval/<split>/<checkpoint>/ as the
        command writes them. `overrides` are the command's other options: top_losses=N, tta=..., dataset.*,
        transforms.* and trainer.* keys."""
        chosen = [] if split in (None, self.config.dataset.val_split) else [f"dataset.val_split={split}"]
        device = [f"trainer.device={self._device_choice}"] if self._device_choice else []
        metrics, _ = evaluate_run(self.run_dir, [f"checkpoint={self.checkpoint}", *chosen, *device, *overrides])
        return metrics


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | None = None) -> LoadedRun:
    """A run `transfer train` (or `transfer_cli.train`) wrote, with the weights of checkpoints/<checkpoint>.pt
    (best or last), on `device` (cpu, cuda, cuda:N, mps, auto; default: the run's trainer.device)."""
    return LoadedRun(Path(run_dir).expanduser(), checkpoint, device)


def _given(images: Any) -> list[Any]:
    """predict()'s argument as a list: one path or image, or an iterable of them."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    given = list(images)
    if not given:
        raise TransferError("predict() needs at least one image, file or folder")
    for item in given:
        if not isinstance(item, (str, os.PathLike, Image.Image)):
            raise TransferError(f"predict() takes image files, folders or PIL images, not {type(item).__name__}")
    return given


def _gather(given: list[Any]) -> list[Path | Image.Image]:
    """Files (folders expanded, each file once, unreadable ones dropped) and PIL images, in the order given."""
    paths = [Path(item) for item in given if not isinstance(item, Image.Image)]
    if len(paths) == len(given):
        return list(readable(find_images(paths)))  # exactly the command's search
    items: list[Path | Image.Image] = []
    for item in given:
        if isinstance(item, Image.Image):
            items.append(item)
        else:
            path = Path(item)
            items.extend(image_files(path) if path.is_dir() else find_images([path]))
    files = list(dict.fromkeys(item for item in items if isinstance(item, Path)))
    kept = set(readable(files)) if files else set()
    seen: set[Path] = set()
    gathered: list[Path | Image.Image] = []
    for item in items:
        if isinstance(item, Path):
            if item in seen or item not in kept:
                continue
            seen.add(item)
        gathered.append(item)
    return gathered


def _names(given: list[Any], items: list[Path | Image.Image]) -> list[str]:
    """Each item's name in the results: its path, or `<image N>` with N its position in `given`."""
    position = {id(item): index for index, item in enumerate(given) if isinstance(item, Image.Image)}
    return [str(item) if isinstance(item, Path) else f"<image {position[id(item)]}>" for item in items]
