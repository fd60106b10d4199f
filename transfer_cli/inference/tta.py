"""Test-time augmentation for `transfer eval tta=...`: each image scored as the mean of its views' softmax.

`flip` averages the eval image and its mirror image; `five_crop` the four corner crops and the centre crop
(torchvision's FiveCrop) of the eval image resized with a margin around the input size. The margin is the run's
own (the eval transform's resize, so the centre crop is the plain eval image) where its crop_pct leaves one of at
least 12.5%, else 12.5% (crop_pct 0.875): with no margin the five crops would be one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from transfer_cli.core.errors import TransferError
from transfer_cli.data.decode import DecodePlan, Pipeline
from transfer_cli.data.transforms import Preprocessing, cache_resize, eval_transform
from transfer_cli.inference.predictions import SplitScores, scores_of
from transfer_cli.models.runtime import Precision


TTA_CHOICES = ("none", "flip", "five_crop")
FIVE_CROP_PCT = 0.875  # the widest crop five_crop takes: torchvision's ten-crop recipe, 224 out of 256


class StackedCrops:
    """FiveCrop's tuple of crops as one normalized (5, 3, H, W) float tensor."""

    def __init__(self, pre: Preprocessing) -> None:
        self.finish = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                  v2.Normalize(mean=list(pre.mean), std=list(pre.std))])

    def __call__(self, crops: tuple) -> torch.Tensor:
        return torch.stack([self.finish(crop) for crop in crops])


def five_crop_transform(pre: Preprocessing, *, draft: bool = True) -> Pipeline:
    """The eval resize with at least a 12.5% margin, then FiveCrop to the model's input size, normalized."""
    first = cache_resize(replace(pre, crop_pct=min(pre.crop_pct, FIVE_CROP_PCT)))
    return Pipeline([first, v2.FiveCrop(pre.size), StackedCrops(pre)], DecodePlan(first) if draft else None)


def _flip_views(images: torch.Tensor) -> list[torch.Tensor]:
    return [images, images.flip(-1)]


def _crop_views(crops: torch.Tensor) -> list[torch.Tensor]:
    return list(crops.unbind(dim=1))  # (B, 5, 3, H, W): one batch per crop


# name -> (the transform its loader applies, the views of one of its batches)
TTAS: dict[str, tuple[Callable[..., Pipeline], Callable[[torch.Tensor], list[torch.Tensor]]]] = {
    "flip": (eval_transform, _flip_views),
    "five_crop": (five_crop_transform, _crop_views),
}


def check_tta(name: str) -> str:
    if name not in TTA_CHOICES:
        raise TransferError(f"tta={name}: use one of {', '.join(TTA_CHOICES)}")
    return name


def tta_transform(name: str, pre: Preprocessing, *, draft: bool = True) -> Pipeline:
    """What the loader of test-time augmentation `name` applies to each image."""
    return TTAS[name][0](pre, draft=draft)


@torch.inference_mode()
def tta_scores(model: nn.Module, loader: DataLoader, precision: Precision, name: str) -> SplitScores:
    """Each image's probabilities averaged over the views of TTA `name` (its loader built with `tta_transform`),
    in eval mode and the run's precision. The scores' logits are the log of the averaged probabilities
    (log-mean-exp of the views' log-softmax: no probability underflows to a log of 0)."""
    model.eval()
    views_of = TTAS[name][1]
    averaged, labels = [], []
    for images, batch_labels in tqdm(loader, desc=f"eval tta={name}", leave=False, disable=None):
        log_probabilities = []
        for view in views_of(images):
            view, on_device = precision.to_device(view, batch_labels)
            with precision.autocast():
                logits = model(view)
            log_probabilities.append(logits.float().log_softmax(dim=1))
        stacked = torch.stack(log_probabilities)
        averaged.append(torch.logsumexp(stacked, dim=0) - math.log(len(log_probabilities)))
        labels.append(on_device)
    return scores_of(torch.cat(averaged).cpu(), torch.cat(labels).cpu())
