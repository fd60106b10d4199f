"""Pay once for a frozen backbone: compute each image's features once, train the head on them.

When a stage trains only the head and nothing random happens before it (deterministic
transforms, no dropout or stochastic depth in the backbone, no MixUp), the backbone's
output for an image is the same every epoch. We compute it once per split, keyed by the
backbone weights, the preprocessing and the data, store it under the cache dir so reruns
and sweep jobs share it, and train the head on the cached tensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from transfer_cli import checkpoint
from transfer_cli.data.loaders import EpochSampler
from transfer_cli.engine import Precision
from transfer_cli.errors import TransferError
from transfer_cli.models import HEAD, TransferModel

log = logging.getLogger(__name__)

STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRANSFER_CACHE", Path.home() / ".cache" / "transfer" / "features")).expanduser()


def backbone_is_deterministic(model: TransferModel) -> bool:
    """No dropout, drop-path or stochastic depth outside the head (timm's functional drop_rate too)."""
    head = model.head_path
    for path, module in model.model.named_modules():
        if path == head or path.startswith(head + "."):
            continue
        rate = getattr(module, "p", None) if isinstance(module, STOCHASTIC) else None
        rate = rate if rate is not None else getattr(module, "drop_prob", None)
        if type(module).__name__ == "StochasticDepth":
            rate = module.p
        if rate:
            return False
    return not getattr(model.model, "drop_rate", 0)


def fingerprint(dataset: Dataset) -> str:
    """What makes a split's images what they are: files (with sizes and mtimes), indices, generator seeds."""
    if isinstance(dataset, Subset):
        return f"subset({fingerprint(dataset.dataset)},{hashlib.sha256(str(list(dataset.indices)).encode()).hexdigest()})"
    base = getattr(dataset, "base", None)  # TransformedDataset
    if base is not None:
        return fingerprint(base)
    samples = getattr(dataset, "samples", None) or getattr(dataset, "_samples", None)
    if samples is not None:
        digest = hashlib.sha256()
        for path, label in samples:
            stat = os.stat(path)
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return f"files:{digest.hexdigest()}"
    fields = {k: v for k, v in vars(dataset).items() if isinstance(v, (int, float, str, bool))}
    return f"{type(dataset).__name__}:{sorted(fields.items())}:{len(dataset)}"


def weights_digest(model: TransferModel) -> str:
    """Identity of the frozen backbone: a hash of every non-head tensor."""
    head = set(model.group(HEAD).params)
    digest = hashlib.sha256()
    for name, tensor in model.model.state_dict().items():
        if name in head:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def compute_features(model: TransferModel, loader: DataLoader, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every image of `loader`, in loader order, with the backbone in eval mode."""
    captured: list[torch.Tensor] = []
    head = model.model.get_submodule(model.head_path)
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].float().cpu()))
    was_training = model.model.training
    model.model.eval()
    labels = []
    # fork_rng: iterating a DataLoader draws from the global RNG; a cache hit must leave it where a miss does
    devices = [precision.device] if precision.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for images, targets in loader:
                images, _ = precision.to_device(images, targets)
                with precision.autocast():
                    model.model(images)
                labels.append(targets)
    finally:
        hook.remove()
        model.model.train(was_training)
    return torch.cat(captured), torch.cat(labels)


@dataclass
class CachedSplits:
    head: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader


def cached_splits(model: TransferModel, train_data: Dataset, val_data: Dataset, make: Any, *,
                  batch_size: int, eval_batch_size: int, seed: int, precision: Precision, key_extra: str,
                  cache_dir: Path) -> CachedSplits:
    """Features for both splits (from the cache dir when already computed) as head-only loaders.

    `make(dataset, batch_size, train)` builds the image loaders used to compute features;
    the train loader over features shuffles with the same EpochSampler as the image path,
    so both see samples in the same order.
    """
    weights = weights_digest(model)
    tensors = {}
    for split, data, size in (("train", train_data, eval_batch_size), ("val", val_data, eval_batch_size)):
        key = hashlib.sha256(f"{weights}|{key_extra}|{fingerprint(data)}".encode()).hexdigest()[:32]
        path = cache_dir / f"{key}.pt"
        if path.is_file():
            stored = checkpoint.load(path)
            log.info("feature cache hit for %s split: %s", split, path)
        else:
            features, labels = compute_features(model, make(data, size, False), precision)
            stored = {"features": features, "labels": labels}
            try:
                checkpoint.save_atomic(stored, path)
                log.info("cached %s features %s in %s", split, tuple(features.shape), path)
            except OSError as error:
                log.warning("could not write the feature cache %s (%s): continuing without it", path, error)
        tensors[split] = TensorDataset(stored["features"], stored["labels"])
    if len(tensors["train"]) != len(train_data):
        raise TransferError(f"feature cache {cache_dir} is inconsistent: delete it and rerun")
    train_loader = DataLoader(tensors["train"], batch_size=batch_size, sampler=EpochSampler(len(train_data), seed),
                              drop_last=len(train_data) > batch_size)
    val_loader = DataLoader(tensors["val"], batch_size=eval_batch_size)
    return CachedSplits(model.model.get_submodule(model.head_path), train_loader, val_loader)
