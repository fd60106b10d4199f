"""Exercise 5's measurement: a pretrained 1000-way ImageNet classifier scored under several
input normalizations (ImageNet mean/std, none, 0.5, the weights' own), all else equal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from transfer_cli.core.errors import TransferError
from transfer_cli.inference.topk import topk_hits
from transfer_cli.lesson.imagenet_classes import NUM_IMAGENET_CLASSES
from transfer_cli.models.backbones import IMAGENET_MEAN, IMAGENET_STD


# key -> (label, mean, std); `weights` is resolved from the backbone
NORMALIZATIONS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ("ImageNet mean/std", IMAGENET_MEAN, IMAGENET_STD),
    "none": ("none (mean 0, std 1)", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "half": ("mean = std = 0.5", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
DEFAULT_NORMS = ("imagenet", "none", "half")


@dataclass
class Normalization:
    key: str
    label: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 3, H, W) normalized as the network will receive them."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def decode(self, inputs: torch.Tensor) -> torch.Tensor:
        """The inverse of `apply`: network inputs read back as [0, 1] pixels under this normalization."""
        mean = torch.tensor(self.mean, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
        return inputs * std + mean


def resolve_normalizations(keys: list[str], own_mean: tuple[float, ...],
                           own_std: tuple[float, ...]) -> list[Normalization]:
    chosen = []
    for key in dict.fromkeys(keys):  # each once, in the order given
        if key == "weights":
            chosen.append(Normalization(key, "the weights' own", tuple(own_mean), tuple(own_std)))
        elif key in NORMALIZATIONS:
            label, mean, std = NORMALIZATIONS[key]
            chosen.append(Normalization(key, label, tuple(mean), tuple(std)))
        else:
            raise TransferError(f"unknown normalization '{key}': use {', '.join([*NORMALIZATIONS, 'weights'])}")
    if not chosen:
        raise TransferError("--norms names no normalization")
    return chosen


@dataclass
class NormResult:
    """How the network does on the evaluation set under one normalization."""

    key: str
    label: str
    mean: list[float]
    std: list[float]
    weights_own: bool  # equal to the normalization the weights were trained with
    top1: float  # 1000-way ImageNet top-1
    top5: float
    top1_among_classes: float  # argmax over the evaluation set's own classes only
    input_mean: float  # statistics of the tensor the network receives (all channels)
    input_std: float
    images: int
    predictions: list[int] = field(default_factory=list)


def same_values(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))


@torch.no_grad()
def evaluate_normalizations(model: nn.Module, loader: Any, targets: list[int], norms: list[Normalization],
                            own_mean: tuple[float, ...], own_std: tuple[float, ...], device: torch.device,
                            memory_format: torch.memory_format = torch.contiguous_format) -> list[NormResult]:
    """Score `model` (a 1000-way ImageNet classifier) under each normalization.

    `loader` yields ([0, 1] image batches, dataset labels); `targets[label]` is the ImageNet
    index of dataset class `label`.
    """
    model.eval()
    target_of = torch.tensor(targets, dtype=torch.long)
    in_set = torch.tensor(sorted(set(targets)), dtype=torch.long, device=device)
    totals = {n.key: {"top1": 0, "top5": 0, "set": 0, "sum": 0.0, "sumsq": 0.0, "count": 0, "pred": []} for n in norms}
    seen = 0
    for images, labels in loader:
        images = images.to(device, dtype=torch.float32)
        truth = target_of[labels].to(device)
        seen += len(labels)
        for norm in norms:
            inputs = norm.apply(images)
            logits = model(inputs.contiguous(memory_format=memory_format)).float()
            if logits.shape[-1] != NUM_IMAGENET_CLASSES:
                raise TransferError(f"the model has {logits.shape[-1]} outputs, not the 1000 ImageNet classes: "
                                    "exercise 5 needs a backbone with its original ImageNet classifier")
            (top1, top5), predicted = topk_hits(logits, truth, (1, 5))
            own = in_set[logits[:, in_set].argmax(dim=1)]
            total = totals[norm.key]
            total["top1"] += int(top1)
            total["top5"] += int(top5)
            total["set"] += int((own == truth).sum())
            total["sum"] += float(inputs.double().sum())
            total["sumsq"] += float(inputs.double().square().sum())
            total["count"] += inputs.numel()
            total["pred"].extend(predicted.tolist())
    if not seen:
        raise TransferError("the evaluation set is empty")
    results = []
    for norm in norms:
        total = totals[norm.key]
        mean = total["sum"] / total["count"]
        var = max(total["sumsq"] / total["count"] - mean * mean, 0.0)
        results.append(NormResult(
            key=norm.key, label=norm.label, mean=list(norm.mean), std=list(norm.std),
            weights_own=same_values(norm.mean, own_mean) and same_values(norm.std, own_std),
            top1=total["top1"] / seen, top5=total["top5"] / seen, top1_among_classes=total["set"] / seen,
            input_mean=mean, input_std=var ** 0.5, images=seen, predictions=total["pred"]))
    return results
