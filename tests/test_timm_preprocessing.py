"""Eval preprocessing equals timm's own `create_transform` for pretrained configs, crop modes included.

Both resize PIL images with PIL (ours with torchvision transforms.v2, before ToImage), so the
outputs agree to float rounding: the tolerance is 0.001 of a uint8 level (0-255) before
normalization. Resizing the uint8 tensors after ToImage instead (torch's antialiased resize)
differed by up to 4 levels at bicubic edges, which is why the geometry runs first. Any
geometric mistake (a crop mode ignored, a pad of the wrong colour, an off-by-one resize)
moves whole rows of pixels. torchvision weights are checked against their own `transforms()`
on PIL images the same way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from torchvision.models import get_model_weights

from transfer_cli.config.compose import compose_config
from transfer_cli.config.schema import AugmentConfig, TransformsConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.image_cache import DecodedImages
from transfer_cli.data.transforms import (
    Preprocessing,
    cache_resize,
    eval_transform,
    resolve_preprocessing,
    train_transform,
)
from transfer_cli.models.backbones import timm_preprocessing
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import build, timm_backbone, tv_backbone


LEVELS = 1e-3


# every pretrained config's data config, as `resolve_data_config` gives it to `_timm_backbone` (~0.2 s)
DATA = {name: resolve_data_config(pretrained_cfg=get_pretrained_cfg(name).to_dict())
        for name in sorted(timm.list_pretrained())}


def _data(name: str) -> dict:
    return dict(DATA[name])


def _first(test) -> str:
    """The first pretrained config (by name) whose data config passes `test`."""
    return next(name for name, data in DATA.items() if test(data))


def _sample() -> list[str]:
    """Configs chosen by what they exercise (so a newer timm still finds each), plus a seeded random 14."""
    wanted = [
        lambda d: d["crop_mode"] == "squash" and d["crop_pct"] == 1.0,
        lambda d: d["crop_mode"] == "squash" and d["crop_pct"] < 1,
        lambda d: d["crop_mode"] == "squash" and d["interpolation"] == "bilinear",
        lambda d: d["crop_mode"] == "border",
        lambda d: d["crop_mode"] == "center" and d["crop_pct"] > 1,
        lambda d: d["crop_mode"] == "center" and d["crop_pct"] == 1.0,
        lambda d: d["crop_mode"] == "center" and d["crop_pct"] == 0.875 and d["interpolation"] == "bilinear",
        lambda d: d["crop_mode"] == "center" and d["crop_pct"] == 0.95 and d["interpolation"] == "bicubic",
        lambda d: d["crop_mode"] == "center" and d["input_size"][-1] >= 448,
        lambda d: d["mean"] != (0.485, 0.456, 0.406),
    ]
    nonsquare = [name for name, data in DATA.items() if len(set(data["input_size"][1:])) > 1]
    chosen = list(dict.fromkeys([_first(test) for test in wanted] + nonsquare[:1]))
    rest = sorted(set(DATA) - set(chosen))
    return chosen + random.Random(11).sample(rest, 14)


SAMPLE = _sample()


def _smooth(height: int, width: int, seed: int) -> Image.Image:
    """A photo-like image: gradients, a few hard-edged shapes and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + 1) * 90 + 128, np.cos(9 * y) * 80 + 120, (x + y) * 100 + 20], -1)
    for _ in range(6):
        top, left = rng.integers(0, height), rng.integers(0, width)
        base[top:top + height // 5, left:left + width // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


# a wide photo-like image, and a small tall noisy one that every config scales up
SYNTHETIC = [_smooth(197, 341, 0),
             Image.fromarray(np.random.default_rng(2).integers(0, 256, (173, 61, 3), dtype=np.uint8))]


def _ours(data: dict) -> Preprocessing:
    return resolve_preprocessing(timm_preprocessing(data), TransformsConfig(), pretrained=True)


def _assert_matches(ours: torch.Tensor, theirs: torch.Tensor, std: tuple[float, ...], what: str) -> None:
    assert ours.shape == theirs.shape, what
    levels = ((ours - theirs) * torch.tensor(std).view(3, 1, 1) * 255).abs()
    assert levels.max() <= LEVELS, (what, levels.max())


def _compare(data: dict, images: list[Image.Image], what: str) -> None:
    theirs, ours = create_transform(**data, is_training=False), eval_transform(_ours(data))
    for index, image in enumerate(images):
        _assert_matches(ours(image), theirs(image), data["std"], f"{what} image {index}")


def test_the_sample_covers_every_kind_of_config() -> None:
    datas = [_data(name) for name in SAMPLE]
    assert len(set(SAMPLE)) >= 20
    assert {d["crop_mode"] for d in datas} == {"center", "squash", "border"}
    assert {d["interpolation"] for d in datas} == {"bicubic", "bilinear"}
    assert any(d["crop_pct"] > 1 for d in datas) and any(d["crop_pct"] < 1 for d in datas)
    assert any(d["crop_pct"] < 1 and d["crop_mode"] == "squash" for d in datas)


@pytest.mark.parametrize("name", SAMPLE)
def test_eval_transform_matches_timm(name: str) -> None:
    _compare(_data(name), SYNTHETIC, name)


def test_eval_transform_matches_timm_on_real_photos(assets: Path) -> None:
    ants = sorted((assets / "data/hymenoptera/train/ants").glob("*.jpg"))[:3]
    photos = [Image.open(path).convert("RGB") for path in ants]
    for name in SAMPLE:
        _compare(_data(name), photos, name)


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.15])
@pytest.mark.parametrize("size", [(3, 96, 96), (3, 112, 80)])
def test_every_mode_crop_and_shape_matches_timm(mode: str, crop_pct: float, size: tuple[int, ...]) -> None:
    """Combinations no pretrained config has yet (non-square centre crops, border with crop_pct < 1)."""
    data = {**_data(SAMPLE[0]), "crop_mode": mode, "crop_pct": crop_pct, "input_size": size}
    _compare(data, SYNTHETIC, f"{mode} {crop_pct} {size}")


@pytest.mark.slow
def test_every_distinct_pretrained_preprocessing_matches_timm() -> None:
    seen: dict[str, str] = {}
    for name, data in DATA.items():
        seen.setdefault(json.dumps(data, sort_keys=True, default=str), name)
    assert len(seen) > 100
    for name in seen.values():
        _compare(_data(name), SYNTHETIC[:1], name)


def test_the_model_path_reads_the_crop_mode() -> None:
    """`_timm_backbone` takes crop mode and size from the model's pretrained config (squash here)."""
    name = "tf_efficientnetv2_b3.in21k_ft_in1k"
    pre = build(timm_backbone(name)).preprocessing
    assert (pre.crop_mode, pre.crop_pct, pre.image_size, pre.interpolation) == ("squash", 0.9, 240, "bicubic")
    assert pre == timm_preprocessing(_data(name))


def test_non_square_inputs_keep_height_and_width() -> None:
    pre = _ours({**_data(SAMPLE[0]), "input_size": (3, 256, 192), "crop_pct": 0.875})
    assert pre.size == (256, 192) and pre.resize_size == (292, 219)
    assert eval_transform(pre)(SYNTHETIC[0]).shape == (3, 256, 192)
    square = resolve_preprocessing(pre, TransformsConfig(image_size=64), pretrained=False)
    assert square.size == (64, 64) and square.resize_size == 73


def test_border_pads_with_the_mean_colour_and_squash_keeps_everything() -> None:
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    border = Preprocessing(image_size=64, crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.25, 0.75),
                           std=(0.5, 0.5, 0.5), crop_mode="border")
    out = eval_transform(border)(wide)
    assert torch.allclose(out[:, :14], torch.zeros(3, 14, 64), atol=0.01)  # 16 rows of mean colour, then the image
    assert torch.allclose(out[:, 20:44, :].mean((1, 2)), torch.tensor([1.0, -0.5, -1.5]), atol=0.01)
    squash = eval_transform(Preprocessing(**{**vars(border), "crop_mode": "squash"}))(wide)
    assert torch.allclose(squash, torch.tensor([1.0, -0.5, -1.5]).view(3, 1, 1).expand(3, 64, 64), atol=0.01)


@pytest.mark.parametrize("mode,crop_pct,size", [("center", 1.15, 48), ("squash", 0.9, 48), ("border", 1.0, 48),
                                                ("border", 1.15, (40, 56)), ("center", 0.875, (40, 56))])
def test_the_image_cache_and_augment_none_see_the_eval_pixels(mode: str, crop_pct: float, size) -> None:
    pre = Preprocessing(image_size=size, crop_pct=crop_pct, interpolation="bicubic", mean=(0.4, 0.5, 0.6),
                        std=(0.2, 0.25, 0.3), crop_mode=mode)
    images = [(image, 0) for image in SYNTHETIC]
    cached = DecodedImages(images, cache_resize(pre), workers=1)
    transform, plain = eval_transform(pre), train_transform(pre, AugmentConfig(name="none"))
    for (image, _), (decoded, _) in zip(images, cached):
        assert torch.equal(transform(decoded), transform(image))
        assert torch.equal(plain(image), transform(image))
    cropped = train_transform(pre, AugmentConfig(name="x", random_resized_crop=[0.5, 1.0], hflip=0.5))
    assert cropped(cached[0][0]).shape == (3, *pre.size)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "efficientnet_b1", "regnet_y_400mf"])
def test_torchvision_preprocessing_matches_its_weights_transforms(name: str) -> None:
    preset = get_model_weights(name).DEFAULT.transforms()
    pre = resolve_preprocessing(build(tv_backbone(name)).preprocessing, TransformsConfig(), pretrained=True)
    assert (pre.crop_mode, pre.resize_size) == ("center", preset.resize_size[0])
    for index, image in enumerate(SYNTHETIC):
        _assert_matches(eval_transform(pre)(image), preset(image), tuple(preset.std), f"{name} image {index}")


def test_crop_mode_and_crop_pct_overrides_are_checked_at_composition() -> None:
    cfg = compose_config(["experiment=smoke", "transforms.crop_mode=border", "transforms.crop_pct=1.15"])
    assert (cfg.transforms.crop_mode, cfg.transforms.crop_pct) == ("border", 1.15)
    with pytest.raises(TransferError, match=r"^transforms\.crop_mode=crop: must be one of center, squash, border$"):
        compose_config(["experiment=smoke", "transforms.crop_mode=crop"])
    with pytest.raises(TransferError, match=r"^transforms\.crop_pct=1\.5: must be in \(0, 1\.5\)$"):
        compose_config(["experiment=smoke", "transforms.crop_pct=1.5"])


def test_a_run_with_a_crop_mode_override_records_it(tmp_path: Path) -> None:
    train(compose_train(FAST + ["strategy=feature_extract", "trainer.epochs=1", "transforms.crop_mode=squash",
                                "transforms.crop_pct=1.15"]), tmp_path)
    recorded = json.loads((tmp_path / "summary.json").read_text())["preprocessing"]
    assert (recorded["crop_mode"], recorded["crop_pct"], recorded["image_size"], recorded["resize_size"]) == \
        ("squash", 1.15, 32, 27)
