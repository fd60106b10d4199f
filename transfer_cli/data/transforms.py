"""Preprocessing that follows the weights, and augmentation built from config data."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
from torchvision.transforms import v2

from transfer_cli.backbones import PretrainedPreprocessing
from transfer_cli.config import AugmentConfig, TransformsConfig
from transfer_cli.errors import TransferError

log = logging.getLogger(__name__)

INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing(PretrainedPreprocessing):
    """The preprocessing a run uses: the weights' own, with the user's overrides applied."""

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.image_size / self.crop_pct))


def resolve_preprocessing(weights: PretrainedPreprocessing, overrides: TransformsConfig, pretrained: bool) -> Preprocessing:
    """Apply `transforms.*` overrides; warn where they contradict pretrained weights."""
    chosen = Preprocessing(**vars(weights))
    for field in ("image_size", "crop_pct", "interpolation"):
        value = getattr(overrides, field)
        if value is not None:
            chosen = replace(chosen, **{field: value})
    for field in ("mean", "std"):
        value = getattr(overrides, field)
        if value is not None:
            if len(value) == 1:
                value = list(value) * 3
            if len(value) != 3:
                raise TransferError(f"transforms.{field} needs 3 values (one per RGB channel) or 1, got {list(value)}")
            chosen = replace(chosen, **{field: tuple(float(v) for v in value)})
    if chosen.interpolation not in INTERPOLATIONS:
        raise TransferError(f"transforms.interpolation='{chosen.interpolation}' is unknown: use one of {', '.join(INTERPOLATIONS)}")
    if not 0 < chosen.crop_pct <= 1:
        raise TransferError(f"transforms.crop_pct={chosen.crop_pct} must be in (0, 1]")
    if any(s <= 0 for s in chosen.std):
        raise TransferError(f"transforms.std={list(chosen.std)} must be positive")
    if pretrained and (chosen.mean != weights.mean or chosen.std != weights.std):
        log.warning("normalization mean=%s std=%s differs from the weights' own mean=%s std=%s",
                    chosen.mean, chosen.std, weights.mean, weights.std)
    return chosen


def _finish(pre: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(pre.mean), std=list(pre.std))]


def cache_resize(pre: Preprocessing) -> v2.Transform:
    """The resize the image cache applies once: the eval transform's own first step."""
    return v2.Resize(pre.resize_size, interpolation=INTERPOLATIONS[pre.interpolation], antialias=True)


def eval_transform(pre: Preprocessing) -> v2.Compose:
    """Resize the short side to size/crop_pct, centre-crop to size, normalize."""
    return v2.Compose([
        v2.ToImage(),
        cache_resize(pre),
        v2.CenterCrop(pre.image_size),
        *_finish(pre),
    ])


def train_transform(pre: Preprocessing, augment: AugmentConfig) -> v2.Compose:
    """Augmentation from `augment`; with nothing random it equals the eval transform."""
    mode = INTERPOLATIONS[pre.interpolation]
    steps: list[v2.Transform] = [v2.ToImage()]
    if augment.random_resized_crop is not None:
        steps.append(v2.RandomResizedCrop(pre.image_size, scale=tuple(augment.random_resized_crop),
                                          interpolation=mode, antialias=True))
    else:
        steps += [v2.Resize(pre.resize_size, interpolation=mode, antialias=True), v2.CenterCrop(pre.image_size)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.rotation > 0:
        steps.append(v2.RandomRotation(augment.rotation, interpolation=mode))
    if augment.color_jitter is not None:
        steps.append(v2.ColorJitter(*augment.color_jitter))
    if augment.translate is not None:
        steps.append(v2.RandomAffine(degrees=0, translate=tuple(augment.translate), interpolation=mode))
    return v2.Compose(steps + _finish(pre))


def is_deterministic(augment: AugmentConfig) -> bool:
    """True when training images go through no random transform (train = eval preprocessing)."""
    return (augment.random_resized_crop is None and augment.hflip == 0 and augment.rotation == 0
            and augment.color_jitter is None and augment.translate is None)
