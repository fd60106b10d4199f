"""Where and how a run computes: the device, the precision (autocast, memory layout), the seeds."""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from transfer_cli.config.checks import resolve_toggle
from transfer_cli.config.schema import TrainerConfig
from transfer_cli.core.errors import TransferError


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32) and memory format; and, with `normalize`
    ((mean, std) per channel), how uint8 image batches become the model's input on the device."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device. uint8 images (trainer.normalize_on_device: 4x fewer bytes cross than
        float32) are converted and normalized there, as ToDtype and Normalize would have in the loader;
        float tensors arrive normalized (or are cached features) and only move. MixUp/CutMix run after
        this, on normalized images (both commute with a per-channel affine map)."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        if images.dtype == torch.uint8:
            images = self._normalized(images)
        return images, labels.to(self.device, non_blocking=True)

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize is None:
            raise ValueError("uint8 images reached Precision.to_device, whose `normalize` is None: build the "
                             "loader's transform with normalize=True, or give the Precision the mean and std")
        mean, std = self._channel_stats
        return images.to(torch.float32).mul_(1.0 / 255.0).sub_(mean).div_(std)

    @cached_property
    def _channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (3, 1, 1) tensors on the device, made once (a per-step copy from host memory
        would be a sync point on CUDA)."""
        mean, std = (torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(self.device)
                     for values in self.normalize)
        return mean, std


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TransferError(f"trainer.device={name} but CUDA is not available here: use trainer.device=auto or cpu")
    return device


def resolve_precision(trainer: TrainerConfig, device: torch.device) -> tuple[Precision, torch.amp.GradScaler | None]:
    """AMP (bf16 where the GPU has it natively, else fp16 with a grad scaler) on CUDA by default; channels_last on
    CUDA and CPU by default (on a CPU it speeds up EfficientNet steps and leaves ResNets as fast)."""
    on_cuda = device.type == "cuda"
    amp = resolve_toggle(trainer.amp, auto=on_cuda)
    channels_last = resolve_toggle(trainer.channels_last, auto=device.type in {"cuda", "cpu"})
    if not amp:
        return Precision(device, None, channels_last), None
    if on_cuda and not native_bf16():
        return Precision(device, torch.float16, channels_last), torch.amp.GradScaler("cuda")
    return Precision(device, torch.bfloat16, channels_last), None


def native_bf16() -> bool:
    """Whether the current CUDA device computes bf16 in hardware (Ampere, sm80, and later).
    `is_bf16_supported()` counts emulation by default: T4 and V100, which have no bf16 tensor cores,
    would then train in bf16, slower than in fp16 with a grad scaler."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def configure_cuda_math(device: torch.device, *, benchmark: bool = True, deterministic: bool = False) -> None:
    """How a CUDA run computes, as `transfer bench --gpu` measures: cuDNN picks the fastest convolution
    algorithms for the run's shapes (`benchmark`), and fp32 matmuls and convolutions (outside autocast) run on
    TF32 tensor cores; `deterministic` (trainer.deterministic) turns both off and asks cuDNN for deterministic
    kernels, for repeatable numbers. Process-wide settings; a CPU run leaves them alone."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = benchmark and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
