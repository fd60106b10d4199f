"""What a dry run knows of a torchvision set before its download: its size, its classes, and where it would go.

`transfer train dry_run=true` must not download anything (nor leave an empty folder behind where a
download failed): a set that is not there yet is planned from the figures below, and the plan says
"not downloaded (would download about N MB to DIR)".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from transfer_cli.config.schema import DatasetConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.datasets import TORCHVISION_SETS, RawSplits, default_cache_dir, load_splits


@dataclass(frozen=True)
class Download:
    """A torchvision set as published: the archives torchvision fetches, its classes, its images per split."""

    megabytes: int
    classes: int
    images: dict[str, int]


DOWNLOADS = {
    "flowers102": Download(345, 102, {"train": 1020, "val": 1020, "test": 6149}),
    "dtd": Download(625, 47, {"train": 1880, "val": 1880, "test": 1880}),
    "imagenette": Download(341, 10, {"train": 9469, "val": 3925}),
    "cifar10": Download(170, 10, {"train": 50000, "test": 10000}),
}


class NotDownloaded(Dataset):
    """A split of a set not downloaded yet, as long as the published one; its items cannot be read (a dry run
    reads none)."""

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[object, int]:
        raise TransferError(f"{self.what}: run without dry_run=true to download it")


def planned_splits(cfg: DatasetConfig) -> RawSplits:
    """The splits a dry run plans with: load_splits's where the data is at hand (or may not be downloaded), else
    placeholders of the published sizes, without touching the disk or the network."""
    if cfg.name not in TORCHVISION_SETS or not cfg.download or _present(cfg):
        return load_splits(cfg)
    published = DOWNLOADS[cfg.name]
    root = Path(cfg.root).expanduser() if cfg.root else default_cache_dir()
    what = f"not downloaded (would download about {published.megabytes} MB to {root})"
    sizes = []
    for option, split in (("dataset.train_split", cfg.train_split), ("dataset.val_split", cfg.val_split)):
        if split not in published.images:
            raise TransferError(f"{option}={split}: {cfg.name} has the splits {', '.join(published.images)}")
        sizes.append(published.images[split])
    classes = [str(label) for label in range(published.classes)]
    # placeholder labels, spread evenly: they size the plan's loaders; the plan reports no per-class counts
    train_labels, val_labels = ([i % published.classes for i in range(size)] for size in sizes)
    return RawSplits(NotDownloaded(sizes[0], f"{cfg.name} is {what}"), NotDownloaded(sizes[1], f"{cfg.name} is {what}"),
                     classes, train_labels, val_labels, not_downloaded=what)


def _present(cfg: DatasetConfig) -> bool:
    """Whether the train split loads from disk as it is (download=False: torchvision then creates nothing)."""
    import torchvision.datasets

    factory_name, split_arg = TORCHVISION_SETS[cfg.name]
    root = Path(cfg.root).expanduser() if cfg.root else default_cache_dir()
    try:
        getattr(torchvision.datasets, factory_name)(root=str(root), download=False, **split_arg(cfg.train_split))
    except (OSError, RuntimeError):
        return False
    return True
