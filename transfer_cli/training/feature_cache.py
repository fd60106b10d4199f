"""Pay once for a frozen backbone: compute each image's features once, train the head on them.

When a stage trains only the head and nothing random happens before it (deterministic
transforms, no dropout or stochastic depth in the backbone, no MixUp), the backbone's
output for an image is the same every epoch. We compute it once per split, keyed by the
backbone weights, the preprocessing, the split and the content identity of the data, store it
under the cache dir so reruns and sweep jobs share it, and train the head on the cached tensors.

A wrong hit is a silently wrong number, so the cache fails closed: data whose content cannot
be pinned down (`dataset_identity` raises NoIdentity) is not cached, every reuse (on disk, or in
memory by a later head-only stage) is keyed by the backbone's current weights, never by a stage
name, and an entry is served only when its stored key and labels are the run's own and its
bytes hash to the digests it was saved with (checkpoint.verified).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets as tv_datasets

from transfer_cli.data.folder import ImageFolderDataset
from transfer_cli.data.loaders import TransformedDataset, make_loader
from transfer_cli.models.model import HEAD, TransferModel
from transfer_cli.models.runtime import Precision
from transfer_cli.runs import checkpoint
from transfer_cli.runs.frozen import tensors_digest
from transfer_cli.training.freezing import Stage, frozen_modules


log = logging.getLogger(__name__)

STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRANSFER_CACHE", Path.home() / ".cache" / "transfer" / "features")).expanduser()


def backbone_is_deterministic(model: TransferModel) -> bool:
    """In a head-only stage, no dropout, drop-path or stochastic depth runs before the head's input.

    Frozen groups run in eval mode (freezing.frozen_modules), so only stochastic modules that
    stay in train mode matter: parameter-free ones feeding the head directly, and timm's
    functional drop_rate.
    """
    head = model.head_path
    head_only = Stage(HEAD, 1, {HEAD: 1.0})
    held = {id(inner) for outer in frozen_modules(model, head_only) for inner in outer.modules()}
    for path, module in model.model.named_modules():
        if path == head or path.startswith(head + ".") or id(module) in held:
            continue
        rate = getattr(module, "p", None) if isinstance(module, STOCHASTIC) else None
        rate = rate if rate is not None else getattr(module, "drop_prob", None)
        if type(module).__name__ == "StochasticDepth":
            rate = module.p
        if rate:
            return False
    return not getattr(model.model, "drop_rate", 0)


class NoIdentity(Exception):
    """Why a dataset's content cannot be pinned down: its features are then not cached."""


def dataset_identity(dataset: Dataset) -> str:
    """A digest of what `dataset` serves: every item's source and label, in order.

    A dataset may say it itself (`content_identity()`: DecodedImages, SyntheticImages);
    Subset and TransformedDataset add their indices and transform to their base's; the
    file-backed sets are read from their sample lists (exact types only: a subclass may load
    differently). Anything else raises NoIdentity: no cache rather than a weak key.
    """
    own = getattr(dataset, "content_identity", None)
    if callable(own):
        return own()
    kind = type(dataset)
    if kind is Subset:
        return _digest("subset", dataset_identity(dataset.dataset), ",".join(map(str, dataset.indices)))
    if kind is TransformedDataset:
        described = repr(dataset.transform)
        if " at 0x" in described:
            raise NoIdentity(f"transform {described} has no stable description")
        return _digest("transformed", described, dataset_identity(dataset.base))
    reader = _SAMPLES.get(kind)
    if reader is None:
        raise NoIdentity(f"{kind.__name__} has no content identity")
    if any(getattr(dataset, name, None) is not None for name in ("transform", "target_transform", "transforms")):
        raise NoIdentity(f"{kind.__name__} applies a transform of its own")
    return reader(dataset)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _files(samples: Any) -> str:
    """Path, label and stat of every file, in order. ctime and inode catch an in-place edit whose
    size and mtime were put back (os.utime sets ctime): a stat per file costs far less than hashing
    the files' bytes, a full read of the dataset."""
    digest = hashlib.sha256(b"files")
    for path, label in samples:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise NoIdentity(f"{path} cannot be read ({error.strerror})") from error
        digest.update(f"{os.path.abspath(path)}|{int(label)}|{stat.st_size}|{stat.st_mtime_ns}|"
                      f"{stat.st_ctime_ns}|{stat.st_ino}\n".encode())
    return digest.hexdigest()


def _arrays(dataset: Any) -> str:
    """In-memory sets (CIFAR): the pixel array's bytes and the labels."""
    digest = hashlib.sha256(f"arrays|{dataset.data.shape}|{dataset.data.dtype}|{list(dataset.targets)}".encode())
    digest.update(dataset.data.tobytes())
    return digest.hexdigest()


_SAMPLES: dict[type, Callable[[Any], str]] = {
    ImageFolderDataset: lambda d: _files(d.samples),
    tv_datasets.Imagenette: lambda d: _files(d._samples),
    tv_datasets.Flowers102: lambda d: _files(zip(d._image_files, d._labels, strict=True)),
    tv_datasets.DTD: lambda d: _files(zip(d._image_files, d._labels, strict=True)),
    tv_datasets.CIFAR10: _arrays,
}


def weights_digest(model: TransferModel) -> str:
    """Identity of the frozen backbone: its class and every non-head tensor (name, shape, dtype, values)."""
    head = set(model.group(HEAD).params)
    backbone = {name: tensor for name, tensor in model.model.state_dict().items() if name not in head}
    return _digest(type(model.model).__qualname__, tensors_digest(backbone))


# Shares of the CUDA device's free memory: what the features may take while they are computed (before they
# cross to the host), and what the cached features of both splits may take while the head trains on them.
GATHER_SHARE = 0.25
RESIDENT_SHARE = 0.5


@torch.inference_mode()
def compute_features(model: TransferModel, loader: DataLoader, precision: Precision,
                     gather_budget: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every image of `loader`, in loader order, with the backbone in eval mode, on the CPU.

    The features gather on the device and cross to the host in one copy at the end (a `.cpu()` per batch
    would wait for the device every batch), or in one per `gather_budget` bytes they fill (default:
    GATHER_SHARE of the device's free memory).
    """
    budget = free_memory(precision.device) * GATHER_SHARE if gather_budget is None else gather_budget
    gathered: list[torch.Tensor] = []  # on the device, since the last move to the host
    moved: list[torch.Tensor] = []
    held = [0]  # bytes in `gathered`

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        features = args[0].to(torch.float32, copy=True)  # a copy: the head may not change what is kept
        gathered.append(features)
        held[0] += features.numel() * features.element_size()
        if held[0] > budget:
            move()

    def move() -> None:
        if gathered:
            moved.append(torch.cat(gathered).cpu())  # waits for the device: once per GATHER_SHARE, not per batch
            gathered.clear()
            held[0] = 0

    head = model.model.get_submodule(model.head_path)
    hook = head.register_forward_pre_hook(keep)
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
        move()
    finally:
        hook.remove()
        model.model.train(was_training)
    return moved[0] if len(moved) == 1 else torch.cat(moved), torch.cat(labels)


def free_memory(device: torch.device) -> float:
    """Free bytes on a CUDA device (the driver's count); unbounded for the CPU, whose features are in place."""
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    return float(free)


def feature_home(nbytes: int, device: torch.device) -> torch.device:
    """Where `nbytes` of cached features live while the head trains: on the CUDA device while they take at most
    RESIDENT_SHARE of its free memory (batches are then gathered there: no copy per step), else in host memory
    (pinned by the loaders, so each step's copy overlaps); a CPU run keeps them where they are."""
    if device.type == "cuda" and nbytes <= free_memory(device) * RESIDENT_SHARE:
        return device
    return torch.device("cpu")


@dataclass
class CachedSplits:
    head: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    select_loader: DataLoader | None = None  # where the run has a selection split


def cached_splits(model: TransferModel, splits: dict[str, tuple[Dataset, list[int]]], make: Any, *,
                  batch_size: int, eval_batch_size: int,
                  train_weights: list[float] | None = None,
                  seed: int, precision: Precision, key_extra: str, cache_dir: Path,
                  memo: dict[tuple[str, ...], CachedSplits] | None = None,
                  shard: tuple[int, int] = (0, 1)) -> CachedSplits:
    """Features for each of `splits` (name -> images and labels: train, val and maybe select), from `memo` or the
    cache dir when already computed, as head-only loaders.

    `make(dataset, batch_size, train)` builds the image loaders used to compute features;
    the train loader over features shuffles with the same EpochSampler as the image path,
    so both see samples in the same order (drawn by `train_weights` where dataset.balance=sampler gives them);
    under DDP (`shard`: rank, world size) the loaders
    serve this rank's share. An entry is keyed by the split, the backbone's
    current weights, `key_extra` (preprocessing, precision) and the data's content identity
    (in `memo` too: a later head-only stage after one that trained the backbone gets fresh
    features), and is served only if it holds the run's labels. Raises NoIdentity, before any
    work, when a split's content cannot be pinned down.
    """
    identities = {split: dataset_identity(data) for split, (data, _) in splits.items()}
    weights = weights_digest(model)
    keys = {split: _digest(split, weights, key_extra, identities[split]) for split in splits}
    if memo is not None and tuple(keys.values()) in memo:
        return memo[tuple(keys.values())]
    tensors = {}
    for split, (data, labels) in splits.items():
        path = cache_dir / f"{keys[split][:32]}.pt"
        stored = _own_entry(path, keys[split], labels, split)
        if stored is None:
            features, computed = compute_features(model, make(data, eval_batch_size, False), precision)
            stored = {"key": keys[split], "features": features, "labels": computed}
            _store(stored, path, split, unchanged=_identity_or_none(data) == identities[split])
        tensors[split] = (stored["features"], stored["labels"])
    served = _serve(model, tensors, batch_size, eval_batch_size, seed, precision, shard, train_weights)
    if memo is not None:  # the latest only: features of a backbone that has since changed are not asked for again
        memo.clear()
        memo[tuple(keys.values())] = served
    return served


def _serve(model: TransferModel, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int,
           eval_batch_size: int, seed: int, precision: Precision, shard: tuple[int, int],
           train_weights: list[float] | None) -> CachedSplits:
    """Head-only loaders over the features: on CUDA they stay in device memory where they fit (feature_home),
    else the loaders pin their batches."""
    home = feature_home(sum(t.numel() * t.element_size() for pair in tensors.values() for t in pair),
                        precision.device)
    served = {split: TensorDataset(*(t.to(home) for t in pair)) for split, pair in tensors.items()}
    pin = home.type == "cpu" and precision.device.type == "cuda"
    if precision.device.type == "cuda":
        log.info("the head trains on cached features in %s memory", "GPU" if home.type == "cuda" else "pinned host")
    where = {"num_workers": 0, "seed": seed, "pin_memory": pin, "rank": shard[0], "world_size": shard[1]}
    train_loader = make_loader(served["train"], batch_size, train=True, weights=train_weights, **where)
    val_loader, select_loader = (make_loader(served[split], eval_batch_size, train=False, **where)
                                 if split in served else None for split in ("val", "select"))
    return CachedSplits(model.model.get_submodule(model.head_path), train_loader, val_loader, select_loader)


def _own_entry(path: Path, key: str, labels: list[int], split: str) -> dict[str, Any] | None:
    """The entry at `path` when it holds this key's features with the run's labels and its bytes are the ones
    written (key and labels are checked first: no hashing for an entry that is not the run's); else None,
    saying why."""
    if not path.is_file():
        return None
    try:
        stored = checkpoint.read(path)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        log.warning("feature cache entry %s is unreadable (%s): recomputing it", path, error)
        return None
    problem = _entry_problem(stored, key, labels)
    if problem is None:
        try:
            stored = checkpoint.verified(stored, path)
        except checkpoint.Damaged:
            problem = "is damaged (its bytes do not match the digest it was saved with)"
    if problem is None:
        log.info("feature cache hit for %s split: %s", split, path)
        return stored
    log.warning("feature cache entry %s %s: recomputing the %s split's features", path, problem, split)
    return None


def _entry_problem(stored: Any, key: str, labels: list[int]) -> str | None:
    if not isinstance(stored, dict) or stored.get("key") != key:
        return "was written for other data"
    features, cached = stored.get("features"), stored.get("labels")
    if not isinstance(features, torch.Tensor) or not isinstance(cached, torch.Tensor) or len(features) != len(labels):
        return "is incomplete"
    if cached.tolist() != list(labels):
        return "holds other labels than the run's"
    if checkpoint.DIGEST not in stored:
        return "carries no digest of its bytes"
    return None


def _identity_or_none(data: Dataset) -> str | None:
    try:
        return dataset_identity(data)
    except NoIdentity:
        return None


def _store(stored: dict[str, Any], path: Path, split: str, unchanged: bool) -> None:
    """Write a fresh entry, unless the split's files changed while its features were computed."""
    if not unchanged:
        log.warning("files of the %s split changed while their features were computed: not caching them", split)
        return
    try:
        checkpoint.save_atomic(stored, path)
        log.info("cached %s features %s in %s", split, tuple(stored["features"].shape), path)
    except OSError as error:
        log.warning("could not write the feature cache %s (%s): continuing without it", path, error)
