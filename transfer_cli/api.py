"""The Python API: `transfer_cli.train(overrides)` and `transfer_cli.load_run(run_dir)`, for notebooks and scripts.

`train` is `transfer train` run in this process: the same composition and validation, the same
run directory (clock-made under outputs/runs/, made unique, or the one given, refused when it
holds a run), the same files; it returns summary.json as a dict. `load_run` gives a trained
run's model, classes, eval transform and config, with `predict` (what `transfer predict` gives)
and `evaluate` (what `transfer eval` computes). A mistake raises TransferError instead of
printing a line and returning an exit code; a bug or an interruption raises the exception that
ended the run (a note names the run's error.log or its `transfer resume` command).

`import transfer_cli` stays cheap: this module, and torch with it, loads on first use of its names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from transfer_cli.commands.predict import Prediction, find_images, readable, top_k_predictions
from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.folder import FileImages, image_files, load_rgb, to_rgb
from transfer_cli.data.loaders import TransformedDataset, eval_loader
from transfer_cli.data.transforms import eval_transform
from transfer_cli.runs.rundir import load_trained_model, preprocessing_of, read_summary
from transfer_cli.training.runtime import resolve_device, resolve_precision


__all__ = ["LoadedRun", "Prediction", "RunSummary", "load_run", "train"]

SWEEP_HINT = "train() runs a single run: for a sweep use the command, `transfer train -m key=a,b ...`"


class RunSummary(dict):
    """A run's summary.json as a dict, with `run_dir`: the directory the run wrote."""

    def __init__(self, summary: dict[str, Any], run_dir: Path | None) -> None:
        super().__init__(summary)
        self.run_dir = run_dir


# --------------------------------------------------------------------------- train


def train(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> RunSummary:
    """Train one run as `transfer train <overrides>` does and return its summary.json (`.run_dir` says where).

    `run_dir=None` gives the command's own clock-made directory under outputs/runs/; a given
    one that already holds a run is refused as the command refuses it, with nothing written.
    Raises TransferError for a mistake (a bad override, missing data, a sweep: use the command).
    With `dry_run=true` nothing is kept: the plan is printed and {"dry_run": True} returned.
    """
    argv = _train_argv(overrides, run_dir)
    with _process_state_kept():
        trained = _train_like_the_command(argv)
    if trained is None or not (trained / "summary.json").is_file():
        return RunSummary({"dry_run": True}, None)  # a dry run's directory is discarded by the command
    return RunSummary(read_summary(trained / "summary.json"), trained)


def _train_argv(overrides: Sequence[str], run_dir: str | Path | None) -> list[str]:
    """The command line `transfer train` would get; flags (-m, --cfg, ...) are the command's alone."""
    if isinstance(overrides, (str, bytes)):
        raise TransferError(f"train() takes a list of key=value overrides, not one string: [{overrides!r}]")
    argv = [str(arg) for arg in overrides]
    for arg in argv:
        if arg in {"-m", "--multirun"}:
            raise TransferError(SWEEP_HINT)
        if arg.startswith("-"):
            raise TransferError(f"train() takes key=value overrides; '{arg}' is a flag of the command "
                                f"`transfer train {arg}`: run that instead")
    if run_dir is not None:
        if any(arg.lstrip("+~").startswith("hydra.run.dir=") for arg in argv):
            raise TransferError("give the run directory once: run_dir=... or a hydra.run.dir override, not both")
        from transfer_cli.commands.train import quoted

        argv.append(f"hydra.run.dir={quoted(str(Path(run_dir).expanduser()))}")
    return argv


def _train_like_the_command(argv: list[str]) -> Path | None:
    """`transfer train`'s own jobs (commands/train.py), for a single run; a job's failure is raised here
    rather than said on stderr."""
    from transfer_cli.commands import train as command
    from transfer_cli.config.compose import planned_dir

    if planned_dir(argv, sweep=False)[2]:  # hydra.mode=MULTIRUN, in an override or a config
        raise TransferError(SWEEP_HINT)
    outcomes = _RaisedOutcomes()
    try:
        trained = command.train_jobs(argv, outcomes)
    except SystemExit as stop:  # Hydra's own report of a problem it found (already on stderr)
        if stop.code not in (0, None):
            raise TransferError(f"Hydra stopped the run (exit {stop.code}): its message is above") from stop
        trained = []
    outcomes.raise_first()
    return trained[0] if trained else None


class _RaisedOutcomes:
    """The API's record of how its job ended (commands/train.py tells it through `add` and `user_error`):
    the exceptions to raise instead of lines to print."""

    def __init__(self) -> None:
        self.errors: list[tuple[BaseException, str | None]] = []

    def add(self, code: int, line: str) -> None:
        error = sys.exc_info()[1]  # called while the job's exception is being handled
        self.errors.append((error if error is not None else RuntimeError(line), line))

    def user_error(self, error: Exception) -> None:
        self.errors.append((error, None))

    def raise_first(self) -> None:
        if not self.errors:
            return
        error, line = self.errors[0]
        if line and hasattr(error, "add_note"):
            error.add_note(line.removeprefix("transfer: "))  # where the traceback went, how to resume
        raise error


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Hydra sets sys.argv and gives the root logger its console and train.log handlers, and a caller's own
    Hydra state would stop ours from starting: each undone or set aside, then given back."""
    from transfer_cli.config.compose import callers_hydra_set_aside

    argv, root = sys.argv, logging.getLogger()
    args, handlers, level = list(argv), list(root.handlers), root.level
    try:
        with callers_hydra_set_aside():
            yield
    finally:
        argv[:] = args
        sys.argv = argv  # the same list object, as it was
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


# --------------------------------------------------------------------------- load_run


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
        """The metrics `transfer eval RUN_DIR` computes (top-1, top-5, per-class, macro-F1, loss) on `split`
        (None: the split the run validated on), also written to RUN_DIR/eval/<split>/ as the command writes
        them. `overrides` are the command's other dataset.*, transforms.* and trainer.* keys."""
        from transfer_cli.training.evaluation import evaluate_run

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
