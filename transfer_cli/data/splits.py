"""Stratified, seeded subsets and train/val splits: the same indices for the same seed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from transfer_cli.core.apportion import apportion
from transfer_cli.core.errors import TransferError


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    indices: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        indices[int(label)].append(index)
    return dict(sorted(indices.items()))


def _shuffled(items: list[int], generator: torch.Generator) -> list[int]:
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


def stratified_subset(labels: Sequence[int], size: int, seed: int, option: str = "dataset.train_subset") -> list[int]:
    """`size` indices whose class shares match `labels` (largest remainder), sorted."""
    classes = _by_class(labels)
    if size > len(labels):
        raise TransferError(f"{option}={size} is larger than the split ({len(labels)} images): use at most "
                            f"{len(labels)}")
    if size < len(classes):
        raise TransferError(f"{option}={size} is smaller than the {len(classes)} classes: use at least {len(classes)}")
    generator = torch.Generator().manual_seed(seed)
    sizes = [len(idx) for idx in classes.values()]
    counts = dict(zip(classes, apportion(sizes, size, caps=sizes)))
    chosen = [i for c, idx in classes.items() for i in _shuffled(idx, generator)[: counts[c]]]
    return sorted(chosen)


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int, option: str = "dataset.val_fraction",
                     names: Sequence[str] | None = None, fix: str = "") -> tuple[list[int], list[int]]:
    """Split indices into kept and held out, holding out `val_fraction` of every class (at least one image, and
    never a class's last one). `option`, the class `names` and `fix` (another way out) word the errors."""
    if not 0.0 < val_fraction < 1.0:
        raise TransferError(f"{option}={val_fraction} must be between 0 and 1 (e.g. 0.2)")
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []
    for label, indices in _by_class(labels).items():
        if len(indices) < 2:
            name = f"'{names[label]}'" if names is not None else str(label)
            raise TransferError(f"class {name} has {len(indices)} image: {option} holds out a share of each class, "
                                f"which needs at least 2 images per class; add images{fix}")
        shuffled = _shuffled(indices, generator)
        held_out = min(len(indices) - 1, max(1, round(len(indices) * val_fraction)))
        val.extend(shuffled[:held_out])
        train.extend(shuffled[held_out:])
    return sorted(train), sorted(val)
