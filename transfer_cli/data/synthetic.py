"""Images generated on the fly whose class is learnable from colour, texture and shape.

Each class has its own base colour, stripe frequency and orientation; every image adds a
random offset, brightness and noise, so the task is learnable but not trivial. No files,
no network: the smoke experiment and the tests run on it.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """`size` uint8 CHW images of `num_classes` classes; item i is the same for the same seed."""

    def __init__(self, num_classes: int, size: int, image_size: int, seed: int) -> None:
        self.num_classes = num_classes
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.targets = [i % num_classes for i in range(size)]
        self.classes = [f"class_{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def content_identity(self) -> str:
        """Its generating parameters, plus a digest of item 0's pixels so that a change to the
        renderer itself is a new identity (keys the feature cache when images are not cached)."""
        probe = hashlib.sha256(self[0][0].numpy().tobytes()).hexdigest() if self.size else ""
        return f"synthetic|{self.num_classes}|{self.size}|{self.image_size}|{self.seed}|{probe}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self._render(label, generator), label

    def _render(self, label: int, generator: torch.Generator) -> torch.Tensor:
        hue = 2 * math.pi * label / self.num_classes
        base = torch.tensor([math.cos(hue), math.cos(hue - 2.1), math.cos(hue + 2.1)]) * 0.3 + 0.5
        n = self.image_size
        ys, xs = torch.meshgrid(torch.linspace(0, 1, n), torch.linspace(0, 1, n), indexing="ij")
        angle = math.pi * label / self.num_classes
        frequency = 3 + 2 * (label % 3)
        phase = torch.rand(1, generator=generator).item() * 2 * math.pi
        stripes = torch.sin(2 * math.pi * frequency * (xs * math.cos(angle) + ys * math.sin(angle)) + phase)
        image = base[:, None, None] + 0.15 * stripes[None]
        image = image * (0.8 + 0.4 * torch.rand(1, generator=generator))
        image = image + 0.08 * torch.randn(3, n, n, generator=generator)
        return (image.clamp(0, 1) * 255).to(torch.uint8)
