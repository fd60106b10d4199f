"""DataLoaders over transformed splits, seeded so shuffles and augmentation repeat."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset


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


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, seed: int,
                pin_memory: bool) -> DataLoader:
    """Train loaders shuffle with their own seeded generator and drop a ragged last batch."""
    generator = torch.Generator().manual_seed(seed) if train else None
    num_workers = min(num_workers, os.cpu_count() or 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
    )
