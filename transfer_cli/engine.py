"""One training epoch and one evaluation pass; `fit` in trainer.py owns the rest.

Metrics accumulate on the device and are read once at the end of an epoch, so the loop
never waits on a host sync per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32) and memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        return images, labels.to(self.device, non_blocking=True)


class _Tally:
    """Running sums of loss and top-k hits, kept on the device."""

    def __init__(self, device: torch.device, topk: tuple[int, ...]) -> None:
        self.topk = topk
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.hits = torch.zeros(len(topk), device=device, dtype=torch.float64)
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.size(0)
        self.loss += loss.detach().double() * n
        top = logits.detach().topk(max(self.topk), dim=1).indices
        correct = top.eq(labels[:, None])
        self.hits += torch.stack([correct[:, :k].any(dim=1).sum() for k in self.topk]).double()
        self.count += n

    def result(self, prefix: str) -> dict[str, float]:
        n = max(self.count, 1)
        metrics = {f"{prefix}/loss": self.loss.item() / n}
        for k, hits in zip(self.topk, self.hits.tolist()):
            metrics[f"{prefix}/acc{k}"] = hits / n
        return metrics


def topk_for(num_classes: int) -> tuple[int, ...]:
    return (1, 5) if num_classes >= 5 else (1,)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    loss_fn: nn.Module,
    precision: Precision,
    num_classes: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    before_epoch: Callable[[], None] = lambda: None,
    description: str = "train",
) -> dict[str, float]:
    """Train for one pass over `loader`, stepping `scheduler` every batch.

    `before_epoch` runs after `model.train()`; the strategy uses it to hold frozen
    BatchNorm layers in eval mode.
    """
    model.train()
    before_epoch()
    tally = _Tally(precision.device, topk_for(num_classes))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc=description, leave=False, disable=None):
        images, labels = precision.to_device(images, labels)
        with precision.autocast():
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        tally.add(loss, logits.float(), labels)
    metrics = tally.result("train")
    seconds = time.perf_counter() - start
    metrics["train/seconds"] = seconds
    metrics["train/images_per_s"] = tally.count / seconds if seconds > 0 else 0.0
    return metrics


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, precision: Precision,
             num_classes: int, prefix: str = "val") -> dict[str, float]:
    """Loss and top-1 (and top-5 with 5+ classes) over `loader`, in eval mode."""
    was_training = model.training
    model.eval()
    tally = _Tally(precision.device, topk_for(num_classes))
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc=prefix, leave=False, disable=None):
        images, labels = precision.to_device(images, labels)
        with precision.autocast():
            logits = model(images)
            loss = loss_fn(logits, labels)
        tally.add(loss, logits.float(), labels)
    model.train(was_training)
    metrics = tally.result(prefix)
    metrics[f"{prefix}/seconds"] = time.perf_counter() - start
    return metrics
