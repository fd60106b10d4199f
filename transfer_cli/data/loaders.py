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
    samples it had already trained on. With `world_size` N > 1 (DDP) the permutation's tail
    is dropped to a multiple of N and rank r takes positions r, r+N, ...: step i of the N
    ranks together covers the samples of step i of one process with an N times larger batch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    @property
    def num_samples(self) -> int:
        """Samples this process draws in a full epoch."""
        return self.size // self.world_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.world_size > 1:
            order = order[: self.num_samples * self.world_size][self.rank :: self.world_size]
        return iter(order[self.skip:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Evaluation under DDP: rank r takes indices r, r+N, ..., so every index is seen exactly once."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, seed: int,
                pin_memory: bool, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Train loaders shuffle with an EpochSampler and drop a ragged last batch.

    With `world_size` > 1 the loader yields this rank's share (`batch_size` is per process).
    """
    num_workers = min(num_workers, os.cpu_count() or 1)
    if train:
        sampler: EpochSampler | ShardSampler | None = EpochSampler(len(dataset), seed, rank, world_size)
        drop_last = sampler.num_samples > batch_size
    else:
        sampler = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
        drop_last = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def steps_per_epoch(loader: DataLoader) -> int:
    """Optimizer steps in a full epoch, whatever the sampler is currently skipping."""
    size = getattr(loader.sampler, "num_samples", len(loader.dataset))  # this rank's share under DDP
    batch = loader.batch_size
    return size // batch if loader.drop_last else -(-size // batch)
