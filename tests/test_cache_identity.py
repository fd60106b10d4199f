"""The feature cache serves only the run's own features: fill it, change the data, compare.

Each test first trains on the original data (filling the cache), then changes the data the
way a user would (relabel, swap class folders, edit a file in place, another seed or
subset) and trains twice more: with the cache (auto) and without it. The two metrics.jsonl
must agree; a stale or foreign cache entry shows up as different losses and accuracies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import Dataset

from transfer_cli.data.datasets import DATASETS, RawSplits
from transfer_cli.training.run import train

from conftest import compose_train
from helpers import assert_same_metrics, run_metrics


CLASSES = ("ants", "bees")
PER_CLASS = {"train": 5, "val": 3}


def _pixels(label: int, index: int) -> np.ndarray:
    """A 40x40 image whose class shows in its colour; index varies the noise."""
    rng = np.random.default_rng(100 * label + index)
    base = np.array([200, 60, 40] if label == 0 else [40, 80, 210], dtype=np.int16)
    noise = rng.integers(-40, 40, size=(40, 40, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _write(path: Path, pixels: np.ndarray) -> None:
    """PNG without compression: equal dimensions give equal file sizes (for the in-place edit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, compress_level=0)


def _folder(root: Path, layout: str = "split") -> Path:
    """`root/{train,val}/<class>/i.png`, or `root/<class>/i.png` for layout="single"."""
    for split, count in PER_CLASS.items():
        for label, name in enumerate(CLASSES):
            for i in range(count):
                where = root / name if layout == "single" else root / split / name
                _write(where / f"{split}{i}.png", _pixels(label, i + 10 * (split == "val")))
    return root


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A fixed 'pretrained' backbone, so that a new seed changes the data, not the weights."""
    torch.manual_seed(0)
    path = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "feature-cache"
    monkeypatch.setenv("TRANSFER_CACHE", str(path))
    return path


def _overrides(root: Path, weights: Path, cache_images: str) -> list[str]:
    # no selection split: these cases are about the train and val entries (test_selection caches a third)
    return ["experiment=smoke", "dataset=folder", "dataset.select_fraction=0", f"dataset.root={root}",
            f"dataset.cache_images={cache_images}",
            f"backbone.checkpoint={weights}", "strategy=feature_extract", "augment=none", "trainer.epochs=2",
            "trainer.batch_size=4", "trainer.num_workers=0"]






def _cached_equals_plain(overrides: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> str:
    """Train with the cache (auto) and without; assert equal metrics; return the cached run's log."""
    caplog.clear()
    with caplog.at_level("INFO", logger="transfer_cli"):
        train(compose_train(overrides), tmp_path / "cached")
    log = caplog.text
    train(compose_train(overrides + ["trainer.cache_features=false"]), tmp_path / "plain")
    assert_same_metrics(tmp_path / "cached", tmp_path / "plain")
    return log


def _fill(overrides: list[str], tmp_path: Path, cache: Path) -> None:
    train(compose_train(overrides), tmp_path / "fill")
    assert len(list(cache.glob("*.pt"))) == 2, "the first run cached train and val features"


def _swap_class_folders(split: Path) -> None:
    (split / CLASSES[0]).rename(split / "tmp")
    (split / CLASSES[1]).rename(split / CLASSES[0])
    (split / "tmp").rename(split / CLASSES[1])


def _relabel_with_equal_counts(split: Path) -> None:
    """One image of each class moves to the other: same file count per class, two labels wrong."""
    a, b = split / CLASSES[0], split / CLASSES[1]
    first_a, first_b = sorted(a.iterdir())[0], sorted(b.iterdir())[0]
    first_a.rename(b / f"moved_{first_a.name}")
    first_b.rename(a / f"moved_{first_b.name}")


def _edit_in_place(path: Path, keep_mtime: bool) -> None:
    """New pixels (the other class's colour) in the same file, of the same size; maybe its mtime put back."""
    before = path.stat()
    _write(path, 255 - np.asarray(Image.open(path)))
    assert path.stat().st_size == before.st_size, "the edit keeps the file size"
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_mtime_ns == before.st_mtime_ns


CHANGES = {
    "swapped val class folders": lambda root: _swap_class_folders(root / "val"),
    "relabelled files, equal counts": lambda root: [_relabel_with_equal_counts(root / s) for s in ("train", "val")],
    "file edited in place": lambda root: [_edit_in_place(root / s / CLASSES[0] / f"{s}0.png", keep_mtime=False)
                                          for s in ("train", "val")],
    "file edited in place, mtime put back": lambda root: [
        _edit_in_place(root / s / CLASSES[0] / f"{s}0.png", keep_mtime=True) for s in ("train", "val")],
}


# cache_images=false keys files by path, label and stat; true keys the decoded pixels (two cases suffice there)
@pytest.mark.slow
@pytest.mark.parametrize(("change", "cache_images"), [(change, "false") for change in CHANGES] + [
    ("swapped val class folders", "true"), ("file edited in place, mtime put back", "true")])
def test_changed_files_are_never_served_from_the_cache(change: str, cache_images: str, tmp_path: Path, weights: Path,
                                                       cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path / "images")
    overrides = _overrides(root, weights, cache_images)
    _fill(overrides, tmp_path, cache)
    CHANGES[change](root)
    log = _cached_equals_plain(overrides, tmp_path, caplog)
    assert "feature cache hit for val split" not in log  # every change reaches val


SPLIT_SEED = ("single", ["dataset.split_seed=0"], ["dataset.split_seed=1"])  # another train/val split of one folder
SUBSET_SEED = ("split", ["dataset.train_subset=6", "dataset.split_seed=0"],
               ["dataset.train_subset=6", "dataset.split_seed=1"])


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "before", "after", "cache_images"), [
    (*SPLIT_SEED, "false"), (*SUBSET_SEED, "false"), (*SPLIT_SEED, "true")],
    ids=["split seed", "subset seed", "split seed, decoded"])
def test_another_split_or_subset_is_not_served_the_old_one(layout: str, before: list[str], after: list[str],
                                                            cache_images: str, tmp_path: Path, weights: Path,
                                                            cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path / "images", layout)
    overrides = _overrides(root, weights, cache_images)
    _fill(overrides + before, tmp_path, cache)
    log = _cached_equals_plain(overrides + after, tmp_path, caplog)
    assert "feature cache hit for train split" not in log


@pytest.mark.parametrize("cache_images", ["false", "true"])
@pytest.mark.slow
def test_equal_size_splits_never_share_features(cache_images: str, tmp_path: Path, cache: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Synthetic train and val of one size: before, val was served the train features."""
    overrides = ["experiment=smoke", "dataset.train_size=48", "dataset.val_size=48", "trainer.epochs=2",
                 "dataset.select_fraction=0", "strategy=feature_extract", "augment=none",
                 f"dataset.cache_images={cache_images}"]
    first = _cached_equals_plain(overrides, tmp_path, caplog)
    assert "cached train features" in first and "cached val features" in first
    assert "feature cache hit" not in first
    assert len(list(cache.glob("*.pt"))) == 2
    with caplog.at_level("INFO", logger="transfer_cli.training.feature_cache"):
        caplog.clear()
        train(compose_train(overrides), tmp_path / "again")
    assert caplog.text.count("feature cache hit for train split") == 1
    assert caplog.text.count("feature cache hit for val split") == 1
    assert run_metrics(tmp_path / "again") == run_metrics(tmp_path / "cached")


@pytest.mark.slow
def test_an_entry_with_other_labels_or_damaged_is_recomputed(tmp_path: Path, weights: Path, cache: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A stale entry under the right name (its labels differ) or a torn one is never served."""
    root = _folder(tmp_path / "images")
    overrides = _overrides(root, weights, "false")
    _fill(overrides, tmp_path, cache)
    entries = sorted(cache.glob("*.pt"), key=lambda p: len(torch.load(p)["labels"]))  # val (6), then train (10)
    stale = torch.load(entries[0])
    stale["labels"] = 1 - stale["labels"]
    torch.save(stale, entries[0])
    entries[1].write_bytes(entries[1].read_bytes()[:100])
    log = _cached_equals_plain(overrides, tmp_path, caplog)
    assert "holds other labels than the run's: recomputing the val split's features" in log
    assert "is unreadable" in log and "feature cache hit" not in log


class Unidentified(Dataset):
    """A user's own dataset that says nothing about where its images come from."""

    def __init__(self, size: int, seed: int) -> None:
        self.items = [(torch.from_numpy(_pixels(i % 2, seed + i)).permute(2, 0, 1).contiguous(), i % 2)
                      for i in range(size)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.items[index]


def _unidentified(cfg, seed: int) -> RawSplits:
    train, val = Unidentified(12, 0), Unidentified(6, 50)
    labels = [label for _, label in train.items], [label for _, label in val.items]
    return RawSplits(train, val, list(CLASSES), *labels)


@pytest.fixture
def own_loader_as_synthetic() -> Iterator[None]:
    """A project's own loader registered as dataset=synthetic (DATASETS.register); the built-in one back after."""
    builtin = DATASETS.get("synthetic")
    DATASETS.register("synthetic")(_unidentified)
    try:
        yield
    finally:
        DATASETS.register("synthetic")(builtin)


@pytest.mark.slow
@pytest.mark.usefixtures("own_loader_as_synthetic")
def test_data_without_identity_is_not_cached_and_says_why_once(tmp_path: Path, cache: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    two_head_stages = "strategy.stages=[{name: a, epochs: 1, train: [head]}, {name: b, epochs: 1, train: [head]}]"
    overrides = ["experiment=smoke", "dataset.cache_images=false",
                 "strategy=feature_extract", two_head_stages, "augment=none", "trainer.epochs=null"]
    log = _cached_equals_plain(overrides, tmp_path, caplog)
    assert log.count("feature cache off: Unidentified has no content identity") == 1
    assert [r["stage"] for r in run_metrics(tmp_path / "cached")] == ["a", "b"]  # two head-only stages, one line
    assert not cache.exists() or not list(cache.glob("*.pt"))
    # decoded into memory, the same data has an identity (its pixels): cached, and still exact
    caplog.clear()
    log = _cached_equals_plain(overrides[:1] + overrides[2:], tmp_path / "decoded", caplog)
    assert "feature cache off" not in log and "cached val features" in log
