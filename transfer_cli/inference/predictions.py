"""Per-image results of one pass over a split: the counts every metric of `transfer eval` comes from, and
predictions.csv, written from the same logits.

Because metrics.json and predictions.csv come from one tensor of logits, a figure recomputed from the CSV (top-1,
per-class recall, the confusion matrix, the mean loss) is the one metrics.json holds.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from transfer_cli.config.schema import DatasetConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import atomic_file, csv_cell
from transfer_cli.data.datasets import default_cache_dir
from transfer_cli.data.folder import ImageFolderDataset
from transfer_cli.inference.topk import topk_for, topk_hits
from transfer_cli.models.runtime import Precision


@dataclass
class Counts:
    """What one pass over a split adds up: enough to derive every metric."""

    confusion: list[list[int]]  # rows: true class, columns: predicted class
    topk_hits: dict[int, int]
    loss_sum: float


@dataclass(frozen=True)
class SplitScores:
    """Every image's logits (for test-time augmentation: the log of its averaged probabilities), label and top-1
    class, in split order on the CPU, and the counts they add up to."""

    logits: torch.Tensor  # (N, K) float32
    labels: torch.Tensor  # (N,) int64
    predicted: torch.Tensor  # (N,) int64: the first of the top-k indices, as the training loop's top-1
    counts: Counts

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    @property
    def losses(self) -> torch.Tensor:
        """Each image's cross-entropy (no label smoothing)."""
        return F.cross_entropy(self.logits, self.labels, reduction="none")


def scores_of(logits: torch.Tensor, labels: torch.Tensor, loss_sum: float | None = None) -> SplitScores:
    """The scores of `logits` (float32, CPU) against `labels`; `loss_sum` None: the sum of the per-image losses."""
    num_classes = logits.shape[1]
    hits, predicted = topk_hits(logits, labels, topk_for(num_classes))
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    losses = F.cross_entropy(logits, labels, reduction="none")
    total = float(losses.double().sum()) if loss_sum is None else loss_sum
    counts = Counts(confusion.view(num_classes, num_classes).tolist(), dict(zip(topk_for(num_classes), hits.tolist())),
                    total)
    return SplitScores(logits, labels, predicted, counts)


@torch.inference_mode()
def score_split(model: nn.Module, loader: DataLoader, precision: Precision) -> SplitScores:
    """The logits of every image of `loader`, in eval mode and the run's precision (autocast), as float32.

    The loss is summed batch by batch as `count_predictions` sums it, so the figures equal the training loop's.
    """
    model.eval()
    logits, labels = [], []
    loss = torch.zeros((), dtype=torch.float64, device=precision.device)
    for images, batch_labels in tqdm(loader, desc="eval", leave=False, disable=None):
        images, batch_labels = precision.to_device(images, batch_labels)
        with precision.autocast():
            batch_logits = model(images)
        batch_logits = batch_logits.float()
        loss += F.cross_entropy(batch_logits, batch_labels, reduction="sum").double()
        logits.append(batch_logits)
        labels.append(batch_labels)
    if not logits:
        raise TransferError("the split holds no images")
    return scores_of(torch.cat(logits).cpu(), torch.cat(labels).cpu(), loss.item())


def balanced_accuracy(confusion: Sequence[Sequence[int]]) -> float:
    """The mean recall over the classes that occur as a label (scikit-learn's `balanced_accuracy_score`)."""
    recalls = [row[i] / sum(row) for i, row in enumerate(confusion) if sum(row)]
    return sum(recalls) / len(recalls)


def item_files(dataset: Dataset) -> list[Path] | None:
    """Each item's image file, where a split's items are read from files (image folders, Flowers102, DTD,
    Imagenette, and subsets of them); None where they are not (synthetic images, CIFAR)."""
    if type(dataset) is Subset:
        files = item_files(dataset.dataset)
        return None if files is None else [files[i] for i in dataset.indices]
    if isinstance(dataset, ImageFolderDataset):
        return [path for path, _ in dataset.samples]
    if type(dataset).__module__.startswith("torchvision.datasets"):
        if hasattr(dataset, "_image_files"):  # Flowers102, DTD
            return [Path(path) for path in dataset._image_files]
        if hasattr(dataset, "_samples"):  # Imagenette
            return [Path(path) for path, _ in dataset._samples]
    return None


def dataset_root(dataset: DatasetConfig) -> Path:
    """The folder a dataset's files are named relative to: `dataset.root`, or where torchvision sets download."""
    return Path(dataset.root).expanduser() if dataset.root else default_cache_dir()


def row_names(files: list[Path] | None, root: Path, size: int) -> list[str]:
    """Each image's name in predictions.csv: its file relative to `root` (absolute where it lies elsewhere), or
    its index in the split where the images are not files."""
    if files is None:
        return [str(index) for index in range(size)]
    root_text = os.path.join(str(root), "")
    return [str(file)[len(root_text):] if str(file).startswith(root_text) else str(file) for file in files]


def write_predictions(path: Path, scores: SplitScores, classes: list[str], names: list[str]) -> None:
    """predictions.csv: one row per image, in split order: path, true and predicted class, the softmax probability
    of every class and the cross-entropy, each float with the 9 significant digits that give back its float32.

    The csv module quotes commas, quotes and line breaks inside names; a name that starts like a spreadsheet
    formula gets a leading single quote, as in `transfer predict`'s CSV.
    """
    with atomic_file(path) as file:
        writer = csv.writer(file)
        writer.writerow(["path", "true", "predicted", *(csv_cell(f"prob_{name}") for name in classes), "loss"])
        rows = zip(names, scores.labels.tolist(), scores.predicted.tolist(), scores.probabilities.tolist(),
                   scores.losses.tolist(), strict=True)
        for name, label, predicted, probabilities, loss in rows:
            writer.writerow([csv_cell(name), csv_cell(classes[label]), csv_cell(classes[predicted]),
                             *(f"{p:.9g}" for p in probabilities), f"{loss:.9g}"])
