"""Decode and resize each image once; small datasets then skip JPEG decoding every epoch.

The cache holds each image as a uint8 tensor resized as the eval transform's first step
resizes it (short side, both sides or long side, by the crop mode; with PIL where the dataset
gives PIL images, as the eval transform does), so evaluation sees the same pixels as
decoding; random crops and flips of training run on the cached tensors. A JPEG is decoded at the
reduced size the eval transform's DecodePlan allows (decode.py), and resized from there to what
`resize` makes of it; the digest that identifies a split (`content_identity`) is of these pixels.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from transfer_cli.config.checks import Toggle, is_auto, resolve_toggle
from transfer_cli.data.decode import DecodePlan
from transfer_cli.data.folder import fetch


log = logging.getLogger(__name__)

def estimated_bytes(count: int, resize_size: int | tuple[int, int]) -> int:
    """uint8 RGB at the resize size, allowing 4:3 images: a budget estimate made before decoding
    (an upper bound for squash and border crops, which keep no side above the resize size)."""
    side = resize_size if isinstance(resize_size, int) else max(resize_size)
    return count * 3 * side * (side * 4 // 3)


class DecodedImages(Dataset):
    """Every item of `base`, decoded and resized once (in threads: PIL decoding releases the GIL); with
    `draft`, JPEG files at the reduced size `resize` allows (a v2.Resize or KeepRatioResize: DecodePlan)."""

    def __init__(self, base: Dataset, resize: Callable[[Any], Any], workers: int = 4, draft: bool = False) -> None:
        plan = DecodePlan(resize) if draft else None

        def decode(index: int) -> tuple[torch.Tensor, int]:
            image, label = fetch(base, index, plan)
            return v2.functional.to_image(resize(image)).contiguous(), int(label)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            self.items = list(pool.map(decode, range(len(base))))
        for attribute in ("classes", "targets"):
            if hasattr(base, attribute):
                setattr(self, attribute, getattr(base, attribute))
        self._identity: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.items[index]

    def nbytes(self) -> int:
        return sum(image.numel() for image, _ in self.items)

    def content_identity(self) -> str:
        """A digest of the decoded pixels and labels, in order: exactly what this split serves,
        whatever its base was, and immune to files changing after decoding. Computed on first
        use (the feature cache's key): hashing the pixels costs a fraction of decoding them."""
        if self._identity is None:
            digest = hashlib.sha256(b"decoded")
            for image, label in self.items:
                digest.update(f"{tuple(image.shape)}|{image.dtype}|{label}\n".encode())
                digest.update(image.numpy().data)
            self._identity = digest.hexdigest()
        return self._identity


def maybe_cache(dataset: Dataset, mode: Toggle, budget_mb: float, resize: Callable[[Any], Any],
                resize_size: int | tuple[int, int], name: str, workers: int, draft: bool = False) -> Dataset:
    """`dataset` as DecodedImages when `mode` (dataset.cache_images) says so (auto: when the estimate fits the
    budget)."""
    estimate_mb = estimated_bytes(len(dataset), resize_size) / 2**20
    if not resolve_toggle(mode, auto=estimate_mb <= budget_mb):
        if is_auto(mode):
            log.info("%s split: ~%.0f MB decoded exceeds dataset.cache_budget_mb=%g, decoding every epoch",
                     name, estimate_mb, budget_mb)
        return dataset
    cached = DecodedImages(dataset, resize, workers, draft)
    log.info("%s split: %d images decoded once and kept in memory (%.0f MB)", name, len(cached),
             cached.nbytes() / 2**20)
    return cached
