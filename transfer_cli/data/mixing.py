"""MixUp / CutMix on training batches, with torchvision's own transforms.v2 implementation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from transfer_cli.config.schema import AugmentConfig


BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(augment: AugmentConfig, num_classes: int) -> BatchMixer | None:
    """MixUp, CutMix, or a random choice of the two per batch; None when both alphas are 0.

    The mixed targets are class probabilities, which CrossEntropyLoss accepts directly. The schema keeps both
    alphas >= 0.
    """
    mixers = []
    if augment.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
    if augment.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
