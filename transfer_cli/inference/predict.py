"""The top-k classes of new images with a trained run's model (`transfer predict`, `LoadedRun.predict`).

Images get the run's eval preprocessing, so a prediction sees an image exactly as the
validation pass did. Unreadable files are skipped with a warning, as training skips them.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import csv_cell, write_text
from transfer_cli.core.tables import aligned
from transfer_cli.data.folder import (
    IMAGE_EXTENSIONS,
    FileImages,
    ReducedDecode,
    decode_problem,
    image_files,
    load_rgb,
)
from transfer_cli.data.loaders import TransformedDataset, eval_loader
from transfer_cli.data.transforms import eval_transform
from transfer_cli.inference.load import load_trained_model, preprocessing_of
from transfer_cli.models.runtime import Precision, resolve_device, resolve_precision


OUT_SUFFIXES = (".csv", ".json")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), most probable first


class _ImageFiles(FileImages):
    """(RGB image, index) per file, so predictions map back to their paths."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, plan: ReducedDecode | None = None) -> tuple[Image.Image, int]:
        """File `index`, its JPEG decoded at the reduced size the run's eval transform allows (as eval)."""
        return load_rgb(self.paths[index], plan), index


def find_images(paths: list[Path]) -> list[Path]:
    """Image files named directly or found below folders, in the order given, each once."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(image_files(path))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise TransferError(f"{path} is not an image file (extensions: {' '.join(IMAGE_EXTENSIONS)})")
            found.append(path)
        else:
            raise TransferError(f"{path} does not exist")
    if not found:
        raise TransferError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def readable(images: list[Path]) -> list[Path]:
    """`images` less the files that do not decode, each named in a warning on stderr."""
    kept = []
    for path in images:
        problem = decode_problem(path)
        if problem is None:
            kept.append(path)
        else:
            print(f"transfer: warning: skipping unreadable image {path} ({problem})", file=sys.stderr)
    if not kept:
        raise TransferError(f"none of the {len(images)} image file(s) could be read")
    return kept


def predict_images(run_dir: Path, paths: list[Path], top_k: int = 5, checkpoint: str = "best",
                   device: str | None = None) -> list[Prediction]:
    """Softmax top-k (at most the class count) per readable image below `paths`, in file order.

    The model loads first, so a wrong run dir fails before thousands of images are decoded.
    """
    if top_k < 1:
        raise TransferError(f"--top-k {top_k}: give at least 1")
    cfg, model, classes = load_trained_model(run_dir, checkpoint)
    images = readable(find_images(paths))
    if device:
        cfg = replace(cfg, trainer=replace(cfg.trainer, device=device))  # validated like the config's own
    torch_device = resolve_device(cfg.trainer.device)
    precision, _ = resolve_precision(cfg.trainer, torch_device)
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    model.model.to(torch_device, memory_format=memory_format)
    transform = eval_transform(preprocessing_of(cfg, model), draft=cfg.transforms.draft_decode)
    dataset = TransformedDataset(_ImageFiles(images), transform)
    loader = eval_loader(dataset, cfg.trainer, pin_memory=torch_device.type == "cuda")
    return top_k_predictions(model.model, loader, precision, classes, [str(image) for image in images], top_k)


def top_k_predictions(model: torch.nn.Module, loader: DataLoader, precision: Precision, classes: list[str],
                      names: list[str], top_k: int) -> list[Prediction]:
    """Softmax top-k per item of `loader` (which yields (images, index into `names`)), in eval mode; a non-finite
    output is one line naming the item (the API's `predict` runs the same)."""
    k = min(top_k, len(classes))
    predictions = []
    model.eval()
    with torch.inference_mode():
        for batch, indices in loader:
            batch, indices = precision.to_device(batch, indices)
            with precision.autocast():
                logits = model(batch)
            if not torch.isfinite(logits).all():
                raise TransferError("the run's model gives non-finite outputs (NaN or inf) for "
                                    f"{names[int(indices[0])]}: "
                                    "its checkpoint holds damaged weights; evaluate another checkpoint")
            probabilities, labels = logits.float().softmax(dim=1).topk(k, dim=1)
            for index, probs, picks in zip(indices.tolist(), probabilities.tolist(), labels.tolist()):
                predictions.append(Prediction(names[index], [(classes[c], p) for c, p in zip(picks, probs)]))
    return predictions


def check_out(out: Path | None) -> None:
    if out is not None and out.suffix.lower() not in OUT_SUFFIXES:
        raise TransferError(f"--out {out}: the file must end in {' or '.join(OUT_SUFFIXES)} (that picks the format)")


def render(predictions: list[Prediction], suffix: str) -> str:
    """CSV (one row per image: path, class_1, probability_1, ...; a path or class name that starts like a
    spreadsheet formula gets a leading single quote) or JSON (a list of {path, top}, the names as they are)."""
    if suffix == ".json":
        rows = [{"path": p.path, "top": [{"class": c, "probability": prob} for c, prob in p.top]} for p in predictions]
        return json.dumps(rows, indent=2, allow_nan=False) + "\n"
    k = len(predictions[0].top)
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # RFC 4180's CRLF rows: a CR inside a name is then quoted too, never a row break
    writer.writerow(["path", *(f"{field}_{rank}" for rank in range(1, k + 1) for field in ("class", "probability"))])
    for p in predictions:
        writer.writerow([csv_cell(p.path), *(value for c, prob in p.top for value in (csv_cell(c), f"{prob:.6f}"))])
    return buffer.getvalue()


def write_out(path: Path, text: str) -> None:
    """--out FILE, whole or not at all; a folder that cannot be written is one line."""
    try:
        write_text(path, text)
    except OSError as error:
        raise TransferError(f"cannot write {path}: {error.strerror or error}") from error


def format_table(predictions: list[Prediction]) -> str:
    """One row per image, one `class probability` column per rank, aligned."""
    rows = [[p.path, *(f"{c} {prob:.3f}" for c, prob in p.top)] for p in predictions]
    return aligned([["image", *(f"top-{rank}" for rank in range(1, len(rows[0])))], *rows])
