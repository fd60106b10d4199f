"""Preprocessing that follows the weights, and augmentation built from config data.

A pipeline also says how small a JPEG may be decoded for it (`Pipeline.decode`, a DecodePlan):
datasets that read files themselves decode at reduced size where the first step shrinks the
image anyway (data/folder.py's `fetch`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import PIL.Image
import torch
from torchvision.transforms import v2

from transfer_cli.config.schema import CROP_MODES, INTERPOLATION_NAMES, AugmentConfig, TransformsConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.decode import DecodePlan, Pipeline
from transfer_cli.models.backbones import PretrainedPreprocessing


log = logging.getLogger(__name__)

# the geometric steps take PIL images (before ToImage) or tensors (from the image cache)
ImageLike = PIL.Image.Image | torch.Tensor

# transforms.interpolation (and the weights' own) -> torchvision's mode, whose values are the schema's names
INTERPOLATIONS = {name: v2.InterpolationMode(name) for name in INTERPOLATION_NAMES}


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class Preprocessing(PretrainedPreprocessing):
    """The preprocessing a run uses: the weights' own, with the user's overrides applied."""

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the network's input."""
        return _pair(self.image_size)

    @property
    def resize_size(self) -> int | tuple[int, int]:
        """size/crop_pct, floored as timm does; a pair where the input is not square."""
        height, width = (int(math.floor(side / self.crop_pct)) for side in self.size)
        return height if isinstance(self.image_size, int) else (height, width)


def resolve_preprocessing(weights: PretrainedPreprocessing, overrides: TransformsConfig,
                          pretrained: bool) -> Preprocessing:
    """Apply `transforms.*` overrides; warn where they contradict pretrained weights."""
    chosen = Preprocessing(**vars(weights))
    for field in ("image_size", "crop_pct", "interpolation", "crop_mode"):
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
        raise TransferError(f"transforms.interpolation='{chosen.interpolation}' is unknown: use one of "
                            f"{', '.join(INTERPOLATIONS)}")
    if chosen.crop_mode not in CROP_MODES:
        raise TransferError(f"transforms.crop_mode='{chosen.crop_mode}' is unknown: "
                            f"use one of {', '.join(CROP_MODES)}")
    if not chosen.crop_pct > 0:
        raise TransferError(f"transforms.crop_pct={chosen.crop_pct} must be > 0")
    if any(s <= 0 for s in chosen.std):
        raise TransferError(f"transforms.std={list(chosen.std)} must be positive")
    if pretrained and (chosen.mean != weights.mean or chosen.std != weights.std):
        log.warning("normalization mean=%s std=%s differs from the weights' own mean=%s std=%s",
                    chosen.mean, chosen.std, weights.mean, weights.std)
    return chosen


def _finish(pre: Preprocessing, normalize: bool) -> list[v2.Transform]:
    """Float and normalized; or nothing (`normalize=False`): uint8 batches that Precision.to_device
    converts and normalizes on the device (4x fewer bytes cross to it)."""
    if not normalize:
        return []
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(pre.mean), std=list(pre.std))]


class KeepRatioResize:
    """timm's ResizeKeepRatio: scale both sides by one factor so that the shorter
    (`longest=False`) or the longer side fits `size` = (height, width), sides rounded."""

    def __init__(self, size: tuple[int, int], interpolation: v2.InterpolationMode, longest: bool) -> None:
        self.size, self.interpolation, self.longest = tuple(size), interpolation, longest

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) this resizes a height x width image to."""
        ratios = (height / self.size[0], width / self.size[1])
        ratio = max(ratios) if self.longest else min(ratios)
        return round(height / ratio), round(width / ratio)

    def __call__(self, image: ImageLike) -> ImageLike:
        _, height, width = v2.functional.get_dimensions(image)
        return v2.functional.resize(image, list(self.output_size(height, width)), interpolation=self.interpolation,
                                    antialias=True)

    def __repr__(self) -> str:
        return f"KeepRatioResize(size={self.size}, interpolation={self.interpolation.value}, longest={self.longest})"


class CenterCropOrPad:
    """timm's CenterCropOrPad: pad to at least `size` with the colour `fill` (0-1 per channel),
    then centre-crop; v2.CenterCrop would pad with black."""

    def __init__(self, size: tuple[int, int], fill: tuple[float, ...]) -> None:
        self.size, self.fill = tuple(size), tuple(fill)

    def __call__(self, image: ImageLike) -> ImageLike:
        _, height, width = v2.functional.get_dimensions(image)
        pad_h, pad_w = max(self.size[0] - height, 0), max(self.size[1] - width, 0)
        if pad_h or pad_w:
            floating = isinstance(image, torch.Tensor) and image.is_floating_point()
            fill = list(self.fill) if floating else [round(255 * v) for v in self.fill]
            image = v2.functional.pad(image, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=fill)
        return v2.functional.center_crop(image, list(self.size))

    def __repr__(self) -> str:
        return f"CenterCropOrPad(size={self.size}, fill={self.fill})"


def cache_resize(pre: Preprocessing) -> Callable[[ImageLike], ImageLike]:
    """The eval transform's resize, which the image cache applies once: the short side to
    size/crop_pct (center), both sides (squash) or the long side (border). On a PIL image it
    is PIL's resize, as in timm's and torchvision's own eval transforms (torch's antialiased
    resize of a uint8 tensor rounds differently: up to 4 levels of 255 at bicubic edges)."""
    mode, scale = INTERPOLATIONS[pre.interpolation], pre.resize_size
    if pre.crop_mode == "squash":
        return v2.Resize(_pair(scale), interpolation=mode, antialias=True)
    if pre.crop_mode == "border":
        return KeepRatioResize(_pair(scale), mode, longest=True)
    if isinstance(scale, int):  # torchvision's short-side resize, as timm uses for square inputs
        return v2.Resize(scale, interpolation=mode, antialias=True)
    return KeepRatioResize(scale, mode, longest=False)


def _crop(pre: Preprocessing) -> Callable[[ImageLike], ImageLike]:
    """Centre-crop to the input size; where crop_pct > 1 this pads (black, or the mean colour in border mode)."""
    return CenterCropOrPad(pre.size, pre.mean) if pre.crop_mode == "border" else v2.CenterCrop(pre.size)


def eval_transform(pre: Preprocessing, *, draft: bool = True, normalize: bool = True) -> Pipeline:
    """timm's eval transform: resize as `crop_mode` says, centre-crop, normalize (`normalize=False`: stop at
    uint8). The image cache holds the resized image, whose second resize here is a no-op; so does a JPEG
    decoded at reduced size (`draft`, see DecodePlan)."""
    first = cache_resize(pre)
    return Pipeline([first, _crop(pre), v2.ToImage(), *_finish(pre, normalize)], DecodePlan(first) if draft else None)


# augment.policy (the schema's AUGMENT_POLICIES) -> the torchvision v2 transform (on uint8 images, before
# normalization)
POLICIES: dict[str, Callable[[Any], Callable[[ImageLike], ImageLike]]] = {
    "randaugment": lambda mode: v2.RandAugment(interpolation=mode),
    "trivialaugment": lambda mode: v2.TrivialAugmentWide(interpolation=mode),
    "autoaugment": lambda mode: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=mode),
}


def train_transform(pre: Preprocessing, augment: AugmentConfig, *, draft: bool = True,
                    normalize: bool = True) -> Pipeline:
    """Augmentation from `augment`; with nothing random it equals the eval transform (`draft`, `normalize`:
    as there)."""
    mode = INTERPOLATIONS[pre.interpolation]
    if augment.random_resized_crop is not None:
        steps: list[Callable[[ImageLike], ImageLike]] = [v2.RandomResizedCrop(
            pre.size, scale=tuple(augment.random_resized_crop), interpolation=mode, antialias=True)]
    else:
        steps = [cache_resize(pre), _crop(pre)]
    steps.append(v2.ToImage())
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.rotation > 0:
        steps.append(v2.RandomRotation(augment.rotation, interpolation=mode))
    if augment.color_jitter is not None:
        steps.append(v2.ColorJitter(*augment.color_jitter))
    if augment.translate is not None:
        steps.append(v2.RandomAffine(degrees=0, translate=tuple(augment.translate), interpolation=mode))
    if augment.policy is not None:
        steps.append(POLICIES[augment.policy](mode))
    return Pipeline(steps + _finish(pre, normalize), DecodePlan(steps[0]) if draft else None)


def is_deterministic(augment: AugmentConfig) -> bool:
    """True when training images go through no random transform (train = eval preprocessing)."""
    return (augment.random_resized_crop is None and augment.hflip == 0 and augment.rotation == 0
            and augment.color_jitter is None and augment.translate is None and augment.policy is None)
