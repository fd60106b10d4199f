"""Stratified subsets and splits, image folders, and preprocessing that follows the weights."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from PIL import Image

from transfer_cli.config.schema import AugmentConfig, DatasetConfig, TransformsConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.datasets import load_splits
from transfer_cli.data.splits import stratified_split, stratified_subset
from transfer_cli.data.synthetic import SyntheticImages
from transfer_cli.data.transforms import Preprocessing, eval_transform, resolve_preprocessing, train_transform
from transfer_cli.models.backbones import IMAGENET_MEAN, IMAGENET_STD, PretrainedPreprocessing

from helpers import build, timm_backbone, tv_backbone


TRANSFORMS_LOGGER = "transfer_cli.data.transforms"


def counts(labels, indices) -> Counter:
    return Counter(labels[i] for i in indices)


# --------------------------------------------------------------------------- stratified_subset

# 60 / 30 / 10 images of classes 0 / 1 / 2, interleaved
LABELS = [0] * 60 + [1] * 30 + [2] * 10
LABELS = [LABELS[(i * 37) % 100] for i in range(100)]


def test_labels_fixture_is_a_permutation():
    assert Counter(LABELS) == {0: 60, 1: 30, 2: 10}


@pytest.mark.parametrize("size,expected", [(50, {0: 30, 1: 15, 2: 5}), (10, {0: 6, 1: 3, 2: 1}),
                                           (20, {0: 12, 1: 6, 2: 2}), (100, {0: 60, 1: 30, 2: 10})])
def test_stratified_subset_keeps_class_proportions(size, expected):
    indices = stratified_subset(LABELS, size, seed=0)
    assert len(indices) == size == len(set(indices))
    assert indices == sorted(indices)
    assert all(0 <= i < len(LABELS) for i in indices)
    assert counts(LABELS, indices) == expected


def test_stratified_subset_rounds_by_largest_remainder():
    indices = stratified_subset(LABELS, 33, seed=0)  # shares 19.8 / 9.9 / 3.3
    assert counts(LABELS, indices) == {0: 20, 1: 10, 2: 3}


def test_stratified_subset_gives_every_class_at_least_one():
    labels = [0] * 97 + [1] + [2] * 2
    indices = stratified_subset(labels, 3, seed=0)
    assert counts(labels, indices) == {0: 1, 1: 1, 2: 1}


def test_stratified_subset_is_seeded():
    first = stratified_subset(LABELS, 30, seed=3)
    assert stratified_subset(LABELS, 30, seed=3) == first
    assert stratified_subset(LABELS, 30, seed=4) != first
    assert counts(LABELS, stratified_subset(LABELS, 30, seed=4)) == counts(LABELS, first)


def test_stratified_subset_rejects_bad_sizes():
    with pytest.raises(TransferError, match="larger than the split"):
        stratified_subset(LABELS, 101, seed=0)
    with pytest.raises(TransferError, match="smaller than the 3 classes"):
        stratified_subset(LABELS, 2, seed=0)
    with pytest.raises(TransferError, match="dataset.val_subset=2"):
        stratified_subset(LABELS, 2, seed=0, option="dataset.val_subset")


def test_stratified_subset_never_favours_a_smaller_class():
    labels = [0] * 10 + [1] * 5 + [2] * 10 + [3] * 16
    picked = counts(labels, stratified_subset(labels, 7, seed=0))  # currently {0: 1, 1: 2, 2: 1, 3: 3}
    assert picked[1] <= picked[0] and picked[1] <= picked[2]


# --------------------------------------------------------------------------- stratified_split


def test_stratified_split_holds_out_per_class():
    train, val = stratified_split(LABELS, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(LABELS)))
    assert not set(train) & set(val)
    assert counts(LABELS, val) == {0: 12, 1: 6, 2: 2}
    assert counts(LABELS, train) == {0: 48, 1: 24, 2: 8}


def test_stratified_split_keeps_one_of_each_class_on_both_sides():
    labels = [0, 0, 1, 1, 1, 2, 2]
    train, val = stratified_split(labels, 0.9, seed=0)
    assert set(counts(labels, train)) == set(counts(labels, val)) == {0, 1, 2}
    train, val = stratified_split(labels, 0.01, seed=0)
    assert set(counts(labels, val)) == {0, 1, 2}


def test_stratified_split_is_seeded():
    assert stratified_split(LABELS, 0.2, seed=1) == stratified_split(LABELS, 0.2, seed=1)
    assert stratified_split(LABELS, 0.2, seed=1)[1] != stratified_split(LABELS, 0.2, seed=2)[1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(TransferError, match="val_fraction"):
        stratified_split(LABELS, fraction, seed=0)


def test_stratified_split_rejects_singleton_class():
    with pytest.raises(TransferError, match="class 1 has 1 image: dataset.val_fraction .* at least 2 images per class"):
        stratified_split([0, 0, 1], 0.5, seed=0)


# --------------------------------------------------------------------------- image folders

CLASSES = ["cat", "dog", "fox"]
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}


def write_class(folder, name, count, start=0, size=(20, 16)):
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        Image.new("RGB", size, COLOURS[name]).save(folder / f"{index:03d}.png")
    return folder


def write_single(root, per_class=6):
    for name in CLASSES:
        write_class(root, name, per_class)
    # one grayscale and one RGBA image among them
    Image.new("L", (20, 16), 128).save(root / "cat" / "gray.png")
    Image.new("RGBA", (20, 16), (10, 20, 30, 40)).save(root / "dog" / "alpha.png")
    (root / "fox" / "notes.txt").write_text("not an image")


def folder_cfg(root, **kwargs) -> DatasetConfig:
    return DatasetConfig(name="folder", select_fraction=0, root=str(root), **kwargs)


def all_items(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_folder_single_layout_split_by_val_fraction(tmp_path):
    write_single(tmp_path)
    splits = load_splits(folder_cfg(tmp_path, val_fraction=0.3))
    assert splits.classes == CLASSES
    # 7 / 7 / 6 images per class (gray.png, alpha.png counted; notes.txt ignored)
    assert len(splits.train) + len(splits.val) == 20
    assert Counter(splits.val_labels) == {0: 2, 1: 2, 2: 2}
    assert Counter(splits.train_labels) == {0: 5, 1: 5, 2: 4}
    items = all_items(splits.train) + all_items(splits.val)
    assert all(image.mode == "RGB" for image, _ in items)
    assert [label for _, label in all_items(splits.val)] == splits.val_labels
    assert [label for _, label in all_items(splits.train)] == splits.train_labels
    # the same seed gives the same split
    again = load_splits(folder_cfg(tmp_path, val_fraction=0.3))
    assert again.val.indices == splits.val.indices


def test_folder_grayscale_and_rgba_load_as_rgb(tmp_path):
    write_single(tmp_path)
    splits = load_splits(folder_cfg(tmp_path, val_fraction=0.5))
    dataset = splits.train.dataset
    by_name = {f"{path.parent.name}/{path.name}": index for index, (path, _) in enumerate(dataset.samples)}
    gray, gray_label = dataset[by_name["cat/gray.png"]]
    alpha, alpha_label = dataset[by_name["dog/alpha.png"]]
    assert (gray.mode, gray.size, gray_label) == ("RGB", (20, 16), 0)
    assert gray.getpixel((0, 0)) == (128, 128, 128)
    assert (alpha.mode, alpha_label) == ("RGB", 1)
    assert alpha.getpixel((0, 0)) == (10, 20, 30)
    for name in CLASSES:
        image, label = dataset[by_name[f"{name}/000.png"]]
        assert image.getpixel((3, 3)) == COLOURS[name] and label == CLASSES.index(name)


def test_folder_train_val_layout(tmp_path):
    for name in CLASSES:
        write_class(tmp_path / "train", name, 4)
        write_class(tmp_path / "val", name, 2, start=10)
    Image.new("L", (8, 8), 10).save(tmp_path / "val" / "fox" / "gray.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "train" / "dog" / "alpha.png")
    splits = load_splits(folder_cfg(tmp_path))
    assert splits.classes == CLASSES
    assert Counter(splits.train_labels) == {0: 4, 1: 5, 2: 4}
    assert Counter(splits.val_labels) == {0: 2, 1: 2, 2: 3}
    assert all(path.parent.parent.name == "val" for path, _ in splits.val.samples)
    assert all(path.parent.parent.name == "train" for path, _ in splits.train.samples)
    assert all(image.mode == "RGB" for image, _ in all_items(splits.train) + all_items(splits.val))


@pytest.mark.parametrize("val_name", ["valid", "validation"])
def test_folder_with_another_spelling_of_val_uses_it(tmp_path, val_name):
    for name in CLASSES:
        write_class(tmp_path / "train", name, 4)
        write_class(tmp_path / val_name, name, 2, start=10)
        write_class(tmp_path / "test", name, 1, start=20)
    splits = load_splits(folder_cfg(tmp_path))
    assert splits.classes == CLASSES
    assert all(path.parent.parent.name == val_name for path, _ in splits.val.samples)
    assert len(splits.train) == 12 and len(splits.val) == 6


def test_folder_with_train_and_test_only_holds_out_from_train(tmp_path):
    for name in CLASSES:
        write_class(tmp_path / "train", name, 5)
        write_class(tmp_path / "test", name, 2, start=10)
    splits = load_splits(folder_cfg(tmp_path, val_fraction=0.2))
    assert splits.classes == CLASSES  # never a classifier over ["test", "train"]
    assert len(splits.train) + len(splits.val) == 15
    assert all(path.parent.parent.name == "train" for path, _ in splits.train.dataset.samples)
    test = load_splits(folder_cfg(tmp_path, val_split="test"))
    assert all(path.parent.parent.name == "test" for path, _ in test.val.samples)


def test_folder_split_layout_mistakes_are_one_line_errors(tmp_path):
    for name in CLASSES:
        write_class(tmp_path / "valid", name, 2)
        write_class(tmp_path / "test", name, 2)
    with pytest.raises(TransferError, match="has split folders .* but no train/"):
        load_splits(folder_cfg(tmp_path))
    write_class(tmp_path / "train", "cat", 2)
    write_class(tmp_path, "dog", 2)
    with pytest.raises(TransferError, match=r"mixes split folders \(test, train, valid\) with other folders \(dog\)"):
        load_splits(folder_cfg(tmp_path))
    other = tmp_path / "other"
    for name in CLASSES:
        write_class(other / "train", name, 2)
    with pytest.raises(TransferError, match="dataset.val_split=holdout: .* has no holdout/ folder"):
        load_splits(folder_cfg(other, val_split="holdout"))


def test_folder_subset_is_stratified(tmp_path):
    for name in CLASSES:
        write_class(tmp_path / "train", name, 6)
        write_class(tmp_path / "val", name, 3)
    splits = load_splits(folder_cfg(tmp_path, train_subset=9, val_subset=3))
    assert Counter(splits.train_labels) == {0: 3, 1: 3, 2: 3}
    assert Counter(splits.val_labels) == {0: 1, 1: 1, 2: 1}
    assert [label for _, label in all_items(splits.train)] == splits.train_labels


def test_folder_missing_root_raises(tmp_path):
    with pytest.raises(TransferError, match="is not a directory"):
        load_splits(folder_cfg(tmp_path / "missing"))
    with pytest.raises(TransferError, match="needs dataset.root"):
        load_splits(DatasetConfig(name="folder", select_fraction=0))


def test_folder_with_one_class_raises(tmp_path):
    write_class(tmp_path, "cat", 4)
    with pytest.raises(TransferError, match="1 class folder"):
        load_splits(folder_cfg(tmp_path))


def test_folder_with_empty_class_raises(tmp_path):
    write_class(tmp_path, "cat", 4)
    write_class(tmp_path, "dog", 4)
    (tmp_path / "fox").mkdir()
    (tmp_path / "fox" / "readme.txt").write_text("no images here")
    with pytest.raises(TransferError, match="fox holds no images"):
        load_splits(folder_cfg(tmp_path))


def test_folder_val_classes_differ_raises(tmp_path):
    for name in ("cat", "dog"):
        write_class(tmp_path / "train", name, 3)
    for name in ("cat", "fox"):
        write_class(tmp_path / "val", name, 2)
    with pytest.raises(TransferError) as info:
        load_splits(folder_cfg(tmp_path))
    message = str(info.value)
    assert "val classes differ" in message and "'dog'" in message and "'fox'" in message


def test_synthetic_images_are_seeded_uint8():
    data = SyntheticImages(4, 8, 16, seed=0)
    image, label = data[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == 1
    assert torch.equal(SyntheticImages(4, 8, 16, seed=0)[5][0], image)
    assert not torch.equal(SyntheticImages(4, 8, 16, seed=1)[5][0], image)


# --------------------------------------------------------------------------- preprocessing


@pytest.fixture(scope="module")
def timm_pre():
    return build(timm_backbone("test_resnet")).preprocessing


@pytest.fixture(scope="module")
def tv_pre():
    return build(tv_backbone("resnet18")).preprocessing


def test_timm_preprocessing_follows_its_pretrained_config(timm_pre):
    chosen = resolve_preprocessing(timm_pre, TransformsConfig(), pretrained=False)
    assert chosen.mean == (0.5, 0.5, 0.5) and chosen.std == (0.5, 0.5, 0.5)
    assert chosen.interpolation == "bilinear"
    assert chosen.image_size == 160 and chosen.crop_pct == pytest.approx(0.95)


def test_torchvision_preprocessing_is_imagenet(tv_pre):
    chosen = resolve_preprocessing(tv_pre, TransformsConfig(), pretrained=False)
    assert chosen.mean == pytest.approx(IMAGENET_MEAN) and chosen.std == pytest.approx(IMAGENET_STD)
    assert chosen.image_size == 224 and chosen.resize_size == 256
    assert chosen.crop_pct == pytest.approx(224 / 256)
    assert chosen.interpolation == "bilinear"


def test_overrides_win(timm_pre):
    overrides = TransformsConfig(image_size=32, crop_pct=1.0, interpolation="bicubic",
                                 mean=[0.1, 0.2, 0.3], std=[0.4])
    chosen = resolve_preprocessing(timm_pre, overrides, pretrained=False)
    assert (chosen.image_size, chosen.crop_pct, chosen.interpolation) == (32, 1.0, "bicubic")
    assert chosen.mean == (0.1, 0.2, 0.3)
    assert chosen.std == (0.4, 0.4, 0.4)
    assert chosen.resize_size == 32
    # the weights' own record is untouched
    assert timm_pre.mean == (0.5, 0.5, 0.5)


def test_mean_override_warns_for_pretrained_weights(tv_pre, caplog):
    overrides = TransformsConfig(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    with caplog.at_level(logging.WARNING, logger=TRANSFORMS_LOGGER):
        chosen = resolve_preprocessing(tv_pre, overrides, pretrained=True)
    assert chosen.mean == (0.5, 0.5, 0.5)
    warnings = [r for r in caplog.records if r.name == TRANSFORMS_LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "differs from the weights' own" in warnings[0].getMessage()


def test_no_warning_without_pretraining_or_when_overrides_agree(tv_pre, caplog):
    with caplog.at_level(logging.WARNING, logger=TRANSFORMS_LOGGER):
        resolve_preprocessing(tv_pre, TransformsConfig(mean=[0.5], std=[0.5]), pretrained=False)
        resolve_preprocessing(tv_pre, TransformsConfig(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
                              pretrained=True)
        resolve_preprocessing(tv_pre, TransformsConfig(image_size=64), pretrained=True)
    assert not [r for r in caplog.records if r.name == TRANSFORMS_LOGGER]


@pytest.mark.parametrize("overrides,match", [
    (TransformsConfig(mean=[0.5, 0.5]), "transforms.mean needs 3 values"),
    (TransformsConfig(std=[0.5, 0.0, 0.5]), "must be positive"),
    (TransformsConfig(crop_pct=-0.5), "crop_pct"),
    (TransformsConfig(crop_mode="crop"), "crop_mode='crop' is unknown"),
    (TransformsConfig(crop_pct=0.0), "crop_pct"),
    (TransformsConfig(interpolation="lanczos"), "interpolation='lanczos' is unknown"),
])
def test_bad_overrides_raise(timm_pre, overrides, match):
    with pytest.raises(TransferError, match=match):
        resolve_preprocessing(timm_pre, overrides, pretrained=False)


def pre(size=32, crop=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear") -> Preprocessing:
    return Preprocessing(image_size=size, crop_pct=crop, interpolation=interpolation, mean=mean, std=std)


def test_eval_transform_shape_and_crop():
    image = Image.new("RGB", (50, 40), (255, 0, 0))
    out = eval_transform(pre(size=32, crop=0.875))(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert pre(size=32, crop=0.875).resize_size == 36
    tensor_out = eval_transform(pre(size=24))(torch.zeros(3, 64, 48, dtype=torch.uint8))
    assert tensor_out.shape == (3, 24, 24)


def test_eval_transform_normalizes_gray_to_zero():
    gray = Image.new("RGB", (40, 40), (128, 128, 128))  # 128/255 ~ 0.502
    out = eval_transform(pre())(gray)
    assert out.abs().max() < 0.01
    exact = eval_transform(pre())(torch.full((3, 40, 40), 0.5))
    assert torch.allclose(exact, torch.zeros_like(exact), atol=1e-6)


def test_eval_transform_uses_the_chosen_mean_and_std():
    gray = torch.full((3, 40, 40), 0.5)
    out = eval_transform(pre(mean=IMAGENET_MEAN, std=IMAGENET_STD))(gray)
    for channel, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        assert torch.allclose(out[channel], torch.full((32, 32), (0.5 - m) / s), atol=1e-5)
    white = eval_transform(pre())(Image.new("RGB", (40, 40), (255, 255, 255)))
    assert torch.allclose(white, torch.ones_like(white), atol=1e-5)  # (1 - 0.5) / 0.5


def test_resolved_preprocessing_feeds_eval_transform(tv_pre):
    chosen = resolve_preprocessing(tv_pre, TransformsConfig(image_size=48), pretrained=False)
    out = eval_transform(chosen)(Image.new("RGB", (100, 80), (124, 116, 104)))
    assert out.shape == (3, 48, 48)
    assert out.abs().max() < 0.02  # the ImageNet mean colour normalizes to ~0


def test_train_transform_without_augmentation_equals_eval():
    image = SyntheticImages(3, 4, 40, seed=0)[1][0]
    p = pre(size=32, crop=0.875)
    assert torch.equal(train_transform(p, AugmentConfig(name="none"))(image), eval_transform(p)(image))
    augmented = train_transform(p, AugmentConfig(name="x", random_resized_crop=[0.5, 1.0], hflip=0.5))(image)
    assert augmented.shape == (3, 32, 32)


def test_preprocessing_is_a_pretrained_preprocessing():
    assert issubclass(Preprocessing, PretrainedPreprocessing)
