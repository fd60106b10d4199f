"""DataLoaders over transformed splits, seeded so shuffles and augmentation repeat.

Every random draw of the training pipeline is a function of (seed, epoch, sample index): the
sampler's order comes from (seed, epoch), and each sample's augmentation from an RNG seeded
with (seed, epoch, index) where it is transformed. Neither the worker count, nor whether workers
persist, nor where a run was killed and resumed changes what a sample looks like.
"""

from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import os
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from transfer_cli.config.schema import TrainerConfig
from transfer_cli.data.folder import fetch


T = TypeVar("T")


class SampleKey(NamedTuple):
    """What a training sampler hands a worker: the index, and the (seed, epoch) its augmentation derives from."""

    index: int
    seed: int
    epoch: int


def sample_seed(key: SampleKey) -> int:
    """A well-mixed 64-bit seed for one sample of one epoch (neighbouring keys share no stream)."""
    digest = hashlib.blake2b(f"{key.seed},{key.epoch},{key.index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seeded(seed: int, draw: Callable[[], T]) -> T:
    """`draw()` under torch's (CPU) and Python's RNGs seeded with `seed`, inside a fork of both: the
    caller's streams are left where they were."""
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed CUDA too
            random.seed(seed)
            return draw()
    finally:
        random.setstate(python_state)


class TransformedDataset(Dataset):
    """Applies `transform` to the image of each (image, label) item of `base`.

    A `SampleKey` transforms under torch's and Python's RNGs seeded from the key, inside a fork
    of both, so the draws are the same in any worker and the caller's RNG streams (dropout,
    MixUp; the main process's own when num_workers=0) are left untouched. A plain int index
    (validation, feature computation: deterministic transforms) uses the ambient RNGs. A file-backed
    base decodes JPEGs at the reduced size the transform's `decode` plan allows (folder.fetch).
    """

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        plan = getattr(self.transform, "decode", None)
        if not isinstance(key, SampleKey):
            image, label = fetch(self.base, key, plan)
            return self.transform(image), label
        image, label = fetch(self.base, key.index, plan)
        return seeded(sample_seed(key), lambda: self.transform(image)), label


class EpochSampler(Sampler[int | SampleKey]):
    """Shuffles with a permutation derived from (seed, epoch) alone.

    Any epoch's order can be rebuilt, so a run resumed mid-epoch skips exactly the
    samples it had already trained on. With `world_size` N > 1 (DDP) the permutation's tail
    is dropped to a multiple of N and rank r takes positions r, r+N, ...: step i of the N
    ranks together covers the samples of step i of one process with an N times larger batch.
    With `keyed` it yields `SampleKey`s (for a TransformedDataset to seed augmentation), else ints.
    With `weights` (one per sample: dataset.balance=sampler) an epoch is `size` draws with replacement,
    each index with probability proportional to its weight, from the same (seed, epoch) stream.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, keyed: bool = False,
                 weights: Sequence[float] | None = None) -> None:
        if weights is not None and len(weights) != size:
            raise ValueError(f"{len(weights)} sample weights for {size} samples")
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.keyed = keyed
        self.epoch = 0
        self.skip = 0

    @property
    def num_samples(self) -> int:
        """Samples this process draws in a full epoch."""
        return self.size // self.world_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int | SampleKey]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        if self.world_size > 1:
            order = order[: self.num_samples * self.world_size][self.rank :: self.world_size]
        indices = order[self.skip:].tolist()
        if self.keyed:
            return iter([SampleKey(index, self.seed, self.epoch) for index in indices])
        return iter(indices)

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


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGINT and SIGTERM reach the whole process group (Ctrl-C, SLURM);
    the main process alone decides what they do, and its workers must outlive its final checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_daemonic_children() -> None:
    """At exit, multiprocessing SIGTERMs its daemonic children (live DataLoader workers) and waits
    for them: workers that ignore SIGTERM would make that wait endless, so end them first. This
    hook is registered after multiprocessing's own, so it runs before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


atexit.register(_kill_daemonic_children)


def resolve_workers(num_workers: int | str) -> int:
    """trainer.num_workers as a count: `auto` is min(8, CPU count), as the GPU benchmark measures; a number
    is capped at the CPU count."""
    cpus = os.cpu_count() or 1
    if num_workers == "auto":
        return min(8, cpus)
    return min(int(num_workers), cpus)


class DeviceDecodingLoader(DataLoader):
    """Batches of a dataset that collates encoded images (device_decode.EncodedImages), decoded and
    transformed on `device` as they are drawn, in the main process: uint8 (N, 3, H, W) there."""

    def __init__(self, dataset: Any, *, device: torch.device, **options: Any) -> None:
        super().__init__(dataset, collate_fn=dataset.collate, **options)
        self.device = device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for encoded, labels in super().__iter__():
            yield self.dataset.decode_batch(encoded, self.device), labels


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int | str, seed: int,
                pin_memory: bool, rank: int = 0, world_size: int = 1,
                decode_on: torch.device | None = None, weights: Sequence[float] | None = None) -> DataLoader:
    """Train loaders shuffle with an EpochSampler and drop a ragged last batch.

    With `world_size` > 1 the loader yields this rank's share (`batch_size` is per process).
    A TransformedDataset's train sampler yields SampleKeys, so augmentation follows (seed, epoch, index).
    The loader's own generator supplies the base seed DataLoader draws for each new iterator: from
    the global RNG (dropout, MixUp) that draw would come once per epoch without workers but once per
    run with persistent ones, so a resumed run's global stream would drift from an uninterrupted run's.
    With `decode_on`, `dataset` is an EncodedImages and its batches are decoded on that device. `weights` (train
    only: one per sample) make the sampler draw with replacement by weight (dataset.balance=sampler).
    """
    num_workers = resolve_workers(num_workers)
    if train:
        keyed = isinstance(dataset, TransformedDataset)
        sampler: EpochSampler | ShardSampler | None = EpochSampler(len(dataset), seed, rank, world_size, keyed,
                                                                    weights)
        drop_last = sampler.num_samples > batch_size
    else:
        sampler = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
        drop_last = False
    kind, where = (DataLoader, {}) if decode_on is None else (DeviceDecodingLoader, {"device": decode_on})
    return kind(
        dataset,
        **where,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(dataset: Dataset, trainer: TrainerConfig, pin_memory: bool) -> DataLoader:
    """The loader that scores `dataset` (eval, predict, exercise 5): in order, at the eval batch size."""
    return make_loader(dataset, trainer.eval_batch_size or trainer.batch_size, train=False,
                       num_workers=trainer.num_workers, seed=trainer.seed, pin_memory=pin_memory)


def steps_per_epoch(loader: DataLoader) -> int:
    """Batches in a full epoch (this rank's, under DDP), whatever the sampler is currently skipping."""
    size = getattr(loader.sampler, "num_samples", len(loader.dataset))  # this rank's share under DDP
    batch = loader.batch_size
    return size // batch if loader.drop_last else -(-size // batch)
