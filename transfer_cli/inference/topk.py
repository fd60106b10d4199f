"""Top-k accuracy counted on the device: the training loop's running figures and `transfer eval` alike."""

from __future__ import annotations

import torch


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of the batch have their label among the top k classes, for each k in `topk` (on the device,
    no host sync), and the top-1 prediction of each sample."""
    top = logits.topk(max(topk), dim=1).indices
    correct = top.eq(labels[:, None])
    return torch.stack([correct[:, :k].any(dim=1).sum() for k in topk]), top[:, 0]


def topk_for(num_classes: int) -> tuple[int, ...]:
    """The k to report: top-5 only with more than 5 classes (with 5 or fewer it is always 1.0, which says nothing)."""
    return (1, 5) if num_classes > 5 else (1,)
