"""Caches change speed, never results: cached features and decoded images match the slow path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer_cli.config.schema import DatasetConfig
from transfer_cli.data.datasets import load_splits
from transfer_cli.data.image_cache import DecodedImages, maybe_cache
from transfer_cli.data.transforms import Preprocessing, cache_resize, eval_transform
from transfer_cli.models.backbones import PretrainedPreprocessing
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import run_metrics


def test_cached_feature_extraction_matches_the_uncached_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "feature-cache"  # empty: other tests' runs may have cached these features already
    monkeypatch.setenv("TRANSFER_CACHE", str(cache))
    before: set[Path] = set()
    overrides = FAST + ["strategy=feature_extract", "trainer.epochs=3"]
    train(compose_train(overrides + ["trainer.cache_features=true"]), tmp_path / "cached")
    assert len(set(cache.glob("*.pt")) - before) == 2, "train and val features were cached"
    train(compose_train(overrides + ["trainer.cache_features=false"]), tmp_path / "plain")
    cached, plain = run_metrics(tmp_path / "cached"), run_metrics(tmp_path / "plain")
    assert len(cached) == 3
    for a, b in zip(cached, plain):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
            else:
                assert a[key] == b[key], key


def test_a_second_run_reads_the_shared_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    overrides = FAST + ["strategy=feature_extract", "trainer.epochs=3", "trainer.seed=5"]
    train(compose_train(overrides), tmp_path / "first")
    with caplog.at_level("INFO", logger="transfer_cli.training.feature_cache"):
        train(compose_train(overrides), tmp_path / "second")
    assert "feature cache hit for train split" in caplog.text
    assert run_metrics(tmp_path / "first") == run_metrics(tmp_path / "second")


def test_random_augmentation_keeps_the_cache_off_under_auto(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="transfer_cli.training.feature_cache"):
        train(compose_train(FAST + ["strategy=feature_extract", "augment=basic", "trainer.seed=9"]), tmp_path)
    assert "cached train features" not in caplog.text and "cache hit" not in caplog.text


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, size=(37 + 5 * i, 51, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_image_cache_gives_the_same_eval_batches_as_decoding(tmp_path: Path) -> None:
    splits = load_splits(DatasetConfig(name="folder", root=str(_folder(tmp_path))))
    pre = Preprocessing(**vars(PretrainedPreprocessing(24, 0.875, "bilinear", (0.5,) * 3, (0.5,) * 3)))
    cached = DecodedImages(splits.val, cache_resize(pre), workers=2)
    transform = eval_transform(pre)
    for index in range(len(splits.val)):
        decoded_image, decoded_label = splits.val[index]
        cached_image, cached_label = cached[index]
        assert cached_label == decoded_label
        assert torch.equal(transform(cached_image), transform(decoded_image))


def test_image_cache_respects_its_budget(tmp_path: Path) -> None:
    splits = load_splits(DatasetConfig(name="folder", root=str(_folder(tmp_path))))
    pre = Preprocessing(**vars(PretrainedPreprocessing(24, 0.875, "bilinear", (0.5,) * 3, (0.5,) * 3)))
    kept = maybe_cache(splits.val, "auto", 1e-9, cache_resize(pre), pre.resize_size, "val", workers=1)
    assert kept is splits.val
    assert isinstance(maybe_cache(splits.val, "true", 1e-9, cache_resize(pre), pre.resize_size, "val", 1),
                      DecodedImages)
