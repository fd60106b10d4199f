"""DataLoaders over transformed splits, seeded so shuffles and augmentation repeat."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class TransformedDataset(Dataset):
    """Applies `transform` to the image of each (image, label) item of `base`."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation derived from (seed, epoch) alone.

    Any epoch's order can be rebuilt, so a run resumed mid-epoch skips exactly the
    samples it had already trained on.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[self.skip:].tolist())

    def __len__(self) -> int:
        return self.size - self.skip


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, seed: int,
                pin_memory: bool) -> DataLoader:
    """Train loaders shuffle with an EpochSampler and drop a ragged last batch."""
    num_workers = min(num_workers, os.cpu_count() or 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed) if train else None,
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def steps_per_epoch(loader: DataLoader) -> int:
    """Optimizer steps in a full epoch, whatever the sampler is currently skipping."""
    size, batch = len(loader.dataset), loader.batch_size
    return size // batch if loader.drop_last else -(-size // batch)
