"""Dataset registry: each entry returns the raw train and val splits and the class names.

torchvision sets download into `dataset.root` (default `~/.cache/transfer/data`) on first
use; with no network the error names that folder and how to use local data instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from transfer_cli.config.schema import DATASET_NAMES, DatasetConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.core.registry import Registry
from transfer_cli.data.csv_labels import read_labels
from transfer_cli.data.folder import ImageFolderDataset, class_folders, folder_layout, listed_names
from transfer_cli.data.splits import stratified_split, stratified_subset
from transfer_cli.data.synthetic import SyntheticImages


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSplits:
    """Untransformed splits: items are (PIL image or uint8 tensor, label)."""

    train: Dataset
    val: Dataset
    classes: list[str]
    train_labels: list[int]
    val_labels: list[int]
    skipped_images: list[str] = field(default_factory=list)  # unreadable files left out (folder only)
    unsupported_files: list[str] = field(default_factory=list)  # folder files left out by their extension
    not_downloaded: str | None = None  # a dry run on a set not downloaded yet: what would be downloaded where
    # held out of train to choose the best epoch on (dataset.select_fraction), so val reports unchosen; or None
    select: Dataset | None = None
    select_labels: list[int] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)  # which images each split holds (split_identity)


# builder(cfg, split_seed): the split seed decides val_fraction splits and generated images
DATASETS: Registry[Callable[[DatasetConfig, int], RawSplits]] = Registry("dataset", "dataset.name", DATASET_NAMES)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRANSFER_DATA", Path.home() / ".cache" / "transfer" / "data")).expanduser()


def labels_of(dataset: Dataset) -> list[int]:
    """Labels without decoding images, from the attribute each torchvision set keeps them in."""
    for attribute in ("targets", "_labels"):
        if hasattr(dataset, attribute):
            return [int(label) for label in getattr(dataset, attribute)]
    if hasattr(dataset, "_samples"):
        return [int(label) for _, label in dataset._samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _subset(dataset: Dataset, labels: list[int], indices: Sequence[int]) -> tuple[Dataset, list[int]]:
    return Subset(dataset, list(indices)), [labels[i] for i in indices]


def check_classes(data: list[str], run: list[str], fix: str) -> None:
    """The data's classes must be the run's, in the same order: a label is an index into them."""
    if list(data) == list(run):
        return
    extra, lacking = sorted(set(data) - set(run)), sorted(set(run) - set(data))
    raise TransferError(f"the data's classes are not the run's (only in the data: {extra[:5]}, only in the run: "
                        f"{lacking[:5]}{', order differs' if not extra and not lacking else ''}): {fix}")


def load_splits(cfg: DatasetConfig) -> RawSplits:
    """Build the dataset named by `cfg`, then apply the stratified subsets, all seeded by `cfg.split_seed`
    (not trainer.seed: runs that differ in their training seed see the same images)."""
    seed = cfg.split_seed
    splits = DATASETS.get(cfg.name)(cfg, seed)
    if cfg.train_subset is not None:
        indices = stratified_subset(splits.train_labels, cfg.train_subset, seed)
        train, train_labels = _subset(splits.train, splits.train_labels, indices)
        splits = replace(splits, train=train, train_labels=train_labels)
    if cfg.val_subset is not None:
        indices = stratified_subset(splits.val_labels, cfg.val_subset, seed, option="dataset.val_subset")
        val, val_labels = _subset(splits.val, splits.val_labels, indices)
        splits = replace(splits, val=val, val_labels=val_labels)
    if cfg.select_fraction > 0:
        splits = _carve_select(splits, cfg.select_fraction, seed + 1)
    return replace(splits, identity=split_identity(splits, str(Path(cfg.root).expanduser()) if cfg.root else cfg.name))


def _carve_select(splits: RawSplits, fraction: float, seed: int) -> RawSplits:
    """Hold `fraction` of each class of train out as the selection split: the epoch kept as best.pt is chosen on
    it, so the val number reported for that checkpoint was not also used to pick it."""
    kept, held = stratified_split(splits.train_labels, fraction, seed, option="dataset.select_fraction",
                                  names=splits.classes, fix=", or set dataset.select_fraction=0 to choose the best "
                                                            "epoch on val (its number is then optimistic)")
    train, train_labels = _subset(splits.train, splits.train_labels, kept)
    select, select_labels = _subset(splits.train, splits.train_labels, held)
    return replace(splits, train=train, train_labels=train_labels, select=select, select_labels=select_labels)


def split_identity(splits: RawSplits, source: str) -> dict[str, Any]:
    """Which images each split holds, saved in checkpoints so a resume can tell whether it continues on the run's
    images (check_same_splits): per split its size, its size per class and a digest of its items in order, each
    one's file (relative to its dataset's root) and label; items not read from files (synthetic, CIFAR) by their
    labels alone. It pins down which files each split holds and their labels, not their pixels: a file edited in
    place keeps its record."""
    identity = {"source": source, "train": _split_record(splits.train, splits.train_labels, splits.classes),
                "val": _split_record(splits.val, splits.val_labels, splits.classes)}
    if splits.select is not None:
        identity["select"] = _split_record(splits.select, splits.select_labels, splits.classes)
    return identity


def _split_record(dataset: Dataset, labels: list[int], classes: list[str]) -> dict[str, Any]:
    names = _file_names(dataset) or [""] * len(labels)
    listed = "\n".join(f"{name}\t{label}" for name, label in zip(names, labels, strict=True))
    per_class = Counter(labels)
    return {"images": len(labels), "per_class": {name: per_class[label] for label, name in enumerate(classes)},
            "digest": hashlib.sha256(listed.encode()).hexdigest()}


def _file_names(dataset: Dataset) -> list[str] | None:
    """Each item's file, relative to its dataset's root where it lies under it; None where items are not files."""
    if type(dataset) is Subset:
        names = _file_names(dataset.dataset)
        return None if names is None else [names[i] for i in dataset.indices]
    torchvision = type(dataset).__module__.startswith("torchvision.datasets")
    if isinstance(dataset, ImageFolderDataset):
        paths = [path for path, _ in dataset.samples]
    elif torchvision and hasattr(dataset, "_samples"):  # Imagenette
        paths = [path for path, _ in dataset._samples]
    elif torchvision and hasattr(dataset, "_image_files"):  # Flowers102, DTD
        paths = list(dataset._image_files)
    else:
        return None
    root = os.path.join(str(getattr(dataset, "root", "")), "")
    return [name[len(root):] if name.startswith(root) else name for name in map(str, paths)]


def check_same_splits(data: dict[str, Any], run: dict[str, Any] | None) -> None:
    """A resume continues on the images the run started on: files added, removed, renamed or moved to another
    class folder since its checkpoint would re-draw a held-out val split, and the remaining epochs would train or
    be scored on other images. A checkpoint without its splits record proves nothing, and is refused."""
    if run is None:
        raise TransferError(f"the checkpoint holds no record of the images the run trained on, so resuming cannot "
                            f"prove that {data.get('source')} still holds them: restore checkpoints/last.pt from a "
                            "copy, or train a new run")
    changed = [split for split in ("train", "val", "select") if data.get(split) != run.get(split)]
    if not changed:
        return
    what = " and ".join(changed) + (" splits" if len(changed) > 1 else " split")
    details = "; ".join(f"{split} {_change(run.get(split) or {}, data.get(split) or {})}" for split in changed)
    consequence = ("score the remaining epochs on another val split" if "val" in changed else
                   "choose the best epoch on other images" if changed == ["select"] else
                   "train the remaining epochs on other images")
    raise TransferError(f"the {what} of {data.get('source')} changed since the run started ({details}): resume "
                        f"would {consequence}; restore the data as it was, or start a new run")


def _change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """How a split's record changed, in its counts where they differ."""
    if before.get("images") != after.get("images"):
        return f"{before.get('images')} -> {after.get('images')} images"
    was, now = before.get("per_class") or {}, after.get("per_class") or {}
    moved = [f"{name} {was.get(name, 0)} -> {now.get(name, 0)}" for name in dict.fromkeys([*was, *now])
             if was.get(name, 0) != now.get(name, 0)]
    return f"images per class: {', '.join(moved)}" if moved else "other files, as many per class"


@DATASETS.register("synthetic")
def _synthetic(cfg: DatasetConfig, seed: int) -> RawSplits:
    """Generated images of cfg.num_classes classes (the schema keeps it >= 2: a classifier needs two)."""
    train = SyntheticImages(cfg.num_classes, cfg.train_size, cfg.image_size, seed)
    val = SyntheticImages(cfg.num_classes, cfg.val_size, cfg.image_size, seed + 1)
    return RawSplits(train, val, train.classes, train.targets, val.targets)


@DATASETS.register("folder")
def _folder(cfg: DatasetConfig, seed: int) -> RawSplits:
    if cfg.root is None:
        raise TransferError("dataset=folder needs dataset.root=<folder with class subfolders>")
    layout = folder_layout(Path(cfg.root).expanduser(), cfg.train_split, cfg.val_split)
    classes = class_folders(layout.train)
    if layout.val is not None:
        val_classes = class_folders(layout.val)
        if val_classes != classes:
            raise TransferError(
                f"val classes differ from train classes in {layout.train.parent} (only in train: "
                f"{sorted(set(classes) - set(val_classes))}, only in val: {sorted(set(val_classes) - set(classes))}): "
                "give both splits the same class folders"
            )
        train = ImageFolderDataset(layout.train, classes, cfg.on_bad_image)
        val = ImageFolderDataset(layout.val, classes, cfg.on_bad_image)
        unsupported = _unsupported(train.unsupported + val.unsupported)
        return RawSplits(train, val, classes, train.targets, val.targets, _paths(train.skipped + val.skipped),
                         unsupported)
    if layout.train != Path(cfg.root).expanduser():
        log.info("%s has no val folder: holding out dataset.val_fraction=%g of each class of %s/",
                 cfg.root, cfg.val_fraction, layout.train.name)
    everything = ImageFolderDataset(layout.train, classes, cfg.on_bad_image)
    _check_enough_to_hold_out(everything, cfg)
    return _held_out(everything, cfg, seed, _unsupported(everything.unsupported))


@DATASETS.register("csv")
def _csv(cfg: DatasetConfig, seed: int) -> RawSplits:
    """Images listed with their labels in dataset.csv (data/csv_labels.py), read as a folder's are."""
    labels = read_labels(cfg)
    train = ImageFolderDataset(labels.root, labels.classes, cfg.on_bad_image, listed=labels.train)
    if labels.val is None:
        return _held_out(train, cfg, seed, [])
    val = ImageFolderDataset(labels.root, labels.classes, cfg.on_bad_image, listed=labels.val)
    return RawSplits(train, val, labels.classes, train.targets, val.targets, _paths(train.skipped + val.skipped))


def _held_out(everything: ImageFolderDataset, cfg: DatasetConfig, seed: int, unsupported: list[str]) -> RawSplits:
    """dataset.val_fraction of each class held out of `everything`, stratified and seeded."""
    train_idx, val_idx = stratified_split(everything.targets, cfg.val_fraction, seed)
    train, train_labels = _subset(everything, everything.targets, train_idx)
    val, val_labels = _subset(everything, everything.targets, val_idx)
    return RawSplits(train, val, everything.classes, train_labels, val_labels, _paths(everything.skipped),
                     unsupported)


def _unsupported(paths: list[Path]) -> list[str]:
    """Files of the class folders that are not images by their extension: named once, in one warning."""
    if paths:
        log.warning("skipped %d files that are not supported images: %s", len(paths), listed_names(paths, 5))
    return _paths(paths)


def _check_enough_to_hold_out(images: ImageFolderDataset, cfg: DatasetConfig) -> None:
    """Holding out a share of every class needs two images of each: one to train on, one to score
    (a class folder with none is refused when it is scanned)."""
    counts = Counter(images.targets)
    for label, name in enumerate(images.classes):
        if counts[label] < 2:
            folder, root = images.root / name, Path(cfg.root).expanduser()
            skipped = sum(folder in path.parents for path in images.skipped)
            unreadable = f" ({skipped} more unreadable, skipped)" if skipped else ""
            raise TransferError(f"class folder {name!r} ({folder}) holds a single readable image{unreadable}: "
                                f"holding out dataset.val_fraction={cfg.val_fraction:g} of each class needs at least "
                                f"2; add images to it, or split the data yourself into {root}/train/<class>/ and "
                                f"{root}/val/<class>/")


def _paths(paths: list[Path]) -> list[str]:
    return [str(path) for path in paths]


def _torchvision_split(factory: Callable[..., Dataset], split_arg: Callable[[str], dict], cfg: DatasetConfig,
                       split: str) -> Dataset:
    root = Path(cfg.root).expanduser() if cfg.root else default_cache_dir()
    try:
        return factory(root=str(root), download=cfg.download, **split_arg(split))
    except (OSError, RuntimeError) as exc:
        raise TransferError(
            f"could not load {cfg.name} split '{split}' from {root} ({str(exc).splitlines()[0][:160]}): "
            f"with no network, place the dataset there (or set dataset.root=<its folder> and "
            "dataset.download=false), or use dataset=folder dataset.root=<your images>"
        ) from exc


# name -> (torchvision.datasets class name, its split arguments for a split name)
TORCHVISION_SETS: dict[str, tuple[str, Callable[[str], dict]]] = {}


def _register_torchvision(name: str, factory_name: str, split_arg: Callable[[str], dict]) -> None:
    TORCHVISION_SETS[name] = (factory_name, split_arg)

    def build(cfg: DatasetConfig, seed: int) -> RawSplits:
        import torchvision.datasets

        factory = getattr(torchvision.datasets, factory_name)
        train = _torchvision_split(factory, split_arg, cfg, cfg.train_split)
        val = _torchvision_split(factory, split_arg, cfg, cfg.val_split)
        train_labels = labels_of(train)
        classes = [str(c[0] if isinstance(c, tuple) else c) for c in getattr(train, "classes", [])]
        classes = classes or [str(c) for c in range(max(train_labels) + 1)]
        return RawSplits(train, val, classes, train_labels, labels_of(val))

    DATASETS.register(name)(build)


_register_torchvision("flowers102", "Flowers102", lambda split: {"split": split})
_register_torchvision("dtd", "DTD", lambda split: {"split": split})
_register_torchvision("imagenette", "Imagenette", lambda split: {"split": split, "size": "320px"})
_register_torchvision("cifar10", "CIFAR10", lambda split: {"train": split == "train"})
