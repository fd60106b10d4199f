"""Decoding and augmenting image batches on the device (trainer.decode_on_device): for datasets larger
than the decoded-image cache, where CPU decoding would starve a GPU.

Workers only read files: a JPEG travels to the device as its bytes (5-10x fewer than its pixels) and is
decoded there by `torchvision.io.decode_jpeg(device=...)` (nvjpeg on CUDA, libjpeg on CPU); a file of
another format, a JPEG nvjpeg cannot decode (CMYK, 12-bit), or an image the dataset holds decoded
(the image cache, generated images) is decoded in the worker and travels as uint8 pixels. On the
device each image then goes through the run's transform up to uint8 (resize or random crop, flips,
jitter, policies: transforms.v2 on tensors), under the RNGs seeded from its SampleKey as
TransformedDataset seeds them, so augmentation stays a function of (seed, epoch, index) and draws the
crop it would draw on the CPU. The batch is stacked as uint8; Precision.to_device normalizes it.

Resizing a tensor rounds differently from PIL's resize (a few levels of 255 at edges), so the pixels
are close to, not equal to, the CPU path's; reduced-size decoding (decode.py) does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from transfer_cli.data.folder import ImageFolderDataset, to_rgb
from transfer_cli.data.loaders import SampleKey, TransformedDataset, sample_seed, seeded


NVJPEG_MODES = ("RGB", "L")  # what the device decoder takes (8-bit YCbCr or greyscale)


@dataclass(frozen=True)
class EncodedBatch:
    """A collated batch: per image its JPEG bytes (1-D uint8) or its pixels (3-D uint8, CHW), and the seed
    of its augmentation (None: the ambient RNGs, for deterministic transforms)."""

    payloads: list[torch.Tensor]
    seeds: list[int | None]

    def pin_memory(self) -> EncodedBatch:
        """DataLoader(pin_memory=True) calls this: page-locked payloads copy to a GPU asynchronously."""
        return EncodedBatch([payload.pin_memory() for payload in self.payloads], self.seeds)


class EncodedImages(TransformedDataset):
    """`base`'s images as EncodedBatch payloads, for `transform` (ending in uint8) to run on the device:
    a make_loader(..., decode_on=device) loader decodes and transforms each batch there."""

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int, int | None]:
        index = key.index if isinstance(key, SampleKey) else key
        payload, label = encoded(self.base, index)
        return payload, int(label), sample_seed(key) if isinstance(key, SampleKey) else None

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, int, int | None]]) -> tuple[EncodedBatch, torch.Tensor]:
        payloads, labels, seeds = zip(*items)
        return EncodedBatch(list(payloads), list(seeds)), torch.tensor(labels)

    def decode_batch(self, batch: EncodedBatch, device: torch.device) -> torch.Tensor:
        """The batch's images decoded on `device` (the JPEGs in one call: nvjpeg decodes them together),
        each transformed under its own seed, stacked: uint8 (N, 3, H, W) on `device`."""
        images = list(batch.payloads)
        jpegs = [i for i, payload in enumerate(images) if payload.dim() == 1]
        if jpegs:
            decoded = decode_jpeg([images[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded):
                images[i] = image
        out = [self._transformed(image.to(device, non_blocking=True), seed) for image, seed in zip(images, batch.seeds)]
        return torch.stack(out).as_subclass(torch.Tensor)

    def _transformed(self, image: torch.Tensor, seed: int | None) -> torch.Tensor:
        return self.transform(image) if seed is None else seeded(seed, lambda: self.transform(image))


def encoded(dataset: Any, index: int) -> tuple[torch.Tensor, int]:
    """Item `index` as (payload, label): a file-backed JPEG the device can decode as its bytes; anything
    else decoded here, as uint8 CHW pixels."""
    if type(dataset) is Subset:
        return encoded(dataset.dataset, dataset.indices[index])
    if type(dataset) is ImageFolderDataset:
        path, label = dataset.samples[index]
        with Image.open(path) as image:
            if image.format == "JPEG" and image.mode in NVJPEG_MODES and image.bits == 8:
                return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), label
            return v2.functional.pil_to_tensor(to_rgb(image)), label
    image, label = dataset[index]
    if isinstance(image, Image.Image):
        return v2.functional.pil_to_tensor(to_rgb(image)), label
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3:
        return image.as_subclass(torch.Tensor), label
    raise TypeError(f"trainer.decode_on_device: {type(dataset).__name__} serves {type(image).__name__} images, "
                    "not PIL images or uint8 CHW tensors")
