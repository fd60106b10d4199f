"""Unequal classes (dataset.balance): images per class, and the weights that even them out.

`sampler` draws every training image with weight 1/count(its class), so each class is drawn
about equally often; `loss` weights each class's term of the training loss by n/(k*count(class)),
so each class contributes as much as it would with k equal classes. Both need every class to
have training images: a weight over an empty class is undefined, and is refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from transfer_cli.core.errors import TransferError


IMBALANCE_RATIO = 3.0  # the plan warns when the largest class has more than this many times the smallest's images


def per_class(labels: Sequence[int], classes: Sequence[str]) -> dict[str, int]:
    """Images per class name, in class order (classes without images count 0)."""
    counts = Counter(labels)
    return {name: counts[label] for label, name in enumerate(classes)}


def imbalance(counts: dict[str, int]) -> dict[str, object] | None:
    """The largest and smallest class and their ratio where it exceeds IMBALANCE_RATIO, else None (ratio None:
    the smallest class has no images)."""
    if not counts:
        return None
    largest = max(counts, key=counts.__getitem__)
    smallest = min(counts, key=counts.__getitem__)
    if counts[largest] <= IMBALANCE_RATIO * counts[smallest]:
        return None
    ratio = counts[largest] / counts[smallest] if counts[smallest] else None
    return {"largest": largest, "smallest": smallest, "ratio": ratio}


def _counts(labels: Sequence[int], classes: Sequence[str], balance: str) -> list[int]:
    counts = per_class(labels, classes)
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise TransferError(f"dataset.balance={balance} needs training images of every class, and "
                            f"{', '.join(empty[:5])} has none: add images to it, or set dataset.balance=none")
    return list(counts.values())


def sample_weights(labels: Sequence[int], classes: Sequence[str]) -> list[float]:
    """dataset.balance=sampler: each image's draw weight, 1/count(its class)."""
    counts = _counts(labels, classes, "sampler")
    return [1.0 / counts[label] for label in labels]


def loss_weights(labels: Sequence[int], classes: Sequence[str]) -> torch.Tensor:
    """dataset.balance=loss: each class's weight n/(k*count(class)) for CrossEntropyLoss."""
    counts = _counts(labels, classes, "loss")
    n, k = len(labels), len(classes)
    return torch.tensor([n / (k * count) for count in counts], dtype=torch.float32)
