"""Reduced-size JPEG decoding (data/decode.py): faster, and the pixels of full decoding within
interpolation noise at the final size; used exactly where the first step allows it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision.transforms import v2

from transfer_cli.benchmarks.loader import write_photos
from transfer_cli.config.schema import AugmentConfig
from transfer_cli.data.decode import DecodePlan, resized_size
from transfer_cli.data.folder import ImageFolderDataset, load_rgb
from transfer_cli.data.image_cache import DecodedImages
from transfer_cli.data.loaders import TransformedDataset
from transfer_cli.data.transforms import KeepRatioResize, Preprocessing, cache_resize, eval_transform, train_transform
from transfer_cli.training.assemble import prepare
from transfer_cli.training.feature_cache import dataset_identity

from conftest import compose_train


def pre(size: int | tuple[int, int], mode: str = "center", interpolation: str = "bilinear",
        crop_pct: float = 0.875) -> Preprocessing:
    return Preprocessing(image_size=size, crop_pct=crop_pct, interpolation=interpolation, mean=(0.4, 0.5, 0.6),
                         std=(0.2, 0.25, 0.3), crop_mode=mode)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> ImageFolderDataset:
    """Four 2000x1500 photo-like JPEGs (what `transfer bench` times the loader on)."""
    root = write_photos(tmp_path_factory.mktemp("photos"), 4)
    return ImageFolderDataset(root, ["class_0", "class_1"])


@pytest.fixture
def drafts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(stored size, decoded size) of every JPEG decoded at reduced size from here on (but the folder scan's
    integrity check, which decodes every file at 1/8 whatever the pipeline)."""
    seen: list[tuple[tuple[int, int], tuple[int, int]]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None):
        stored = self.size
        result = draft(self, mode, size)
        if size != (1, 1):
            seen.append((stored, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


def differences(ours: torch.Tensor, full: torch.Tensor) -> tuple[float, float, float]:
    """Mean, 99th percentile and max |difference| in levels of 255."""
    assert ours.shape == full.shape and ours.dtype == full.dtype == torch.uint8
    diff = (ours.float() - full.float()).abs().flatten()
    return diff.mean().item(), diff.quantile(0.99).item(), diff.max().item()


# --------------------------------------------------------------------------- the sizes the plan relies on


@pytest.mark.parametrize("step", [v2.Resize(36), v2.Resize((30, 44)),
                                  KeepRatioResize((36, 48), v2.InterpolationMode.BILINEAR, False),
                                  KeepRatioResize((36, 48), v2.InterpolationMode.BICUBIC, True)], ids=repr)
def test_resized_size_is_what_the_resize_makes(step) -> None:
    for width, height in [(500, 375), (375, 500), (333, 333), (2000, 1500), (101, 67), (67, 1001), (640, 427)]:
        assert resized_size(step, height, width) == step(Image.new("RGB", (width, height))).size[::-1]


def test_reduced_decodes_come_out_at_the_first_steps_size(photos: ImageFolderDataset, drafts: list) -> None:
    """So the pipeline's own resize is a no-op, and its crop cuts what full decoding would."""
    path = photos.samples[0][0]
    for chosen in (pre(32), pre((40, 56), "center"), pre(48, "squash"), pre(48, "border", crop_pct=1.15)):
        first = cache_resize(chosen)
        image = load_rgb(path, DecodePlan(first))
        assert image.size[::-1] == resized_size(first, 1500, 2000)
        assert first(image).size == image.size
    assert [decoded for _, decoded in drafts] == [(250, 188)] * 4  # 1/8: each side still >= 2x the output


# --------------------------------------------------------------------------- where it applies


def test_the_decode_shrinks_as_far_as_the_target_allows(photos: ImageFolderDataset, drafts: list) -> None:
    path = photos.samples[0][0]
    cases = {  # transform -> decoded size of a 2000x1500 photo (None: decoded in full, no draft)
        "eval 32 px": (eval_transform(pre(32)), (250, 188)),  # resize to 41x36: 1/8
        "eval 224 px": (eval_transform(pre(224)), (1000, 750)),  # resize to 341x256: only 1/2 keeps 2x
        "random crop 32 px": (train_transform(pre(32), AugmentConfig(name="x", random_resized_crop=[0.08, 1.0])),
                              (500, 375)),  # smallest crop side sqrt(0.08 * 0.75) * 1500 * 2 / 2 = 424 px: 1/4
        "random crop 224 px": (train_transform(pre(224), AugmentConfig(name="x", random_resized_crop=[0.08, 1.0])),
                               None),
        "eval 32 px, draft off": (eval_transform(pre(32), draft=False), None),
    }
    for name, (transform, expected) in cases.items():
        drafts.clear()
        TransformedDataset(photos, transform)[0]
        assert drafts == ([((2000, 1500), expected)] if expected else []), name
    crop = train_transform(pre(32), AugmentConfig(name="x", random_resized_crop=[0.08, 1.0]))
    width, height = load_rgb(path, crop.decode).size
    assert min(width, height) * np.sqrt(0.08 * 0.75 * width / height) >= 2 * 32  # its smallest crop: >= 2x the output
    assert crop(load_rgb(path, crop.decode)).shape == (3, 32, 32)


def test_other_formats_and_small_images_decode_in_full(tmp_path: Path, drafts: list) -> None:
    for name, size in [("big.png", (800, 600)), ("small.jpg", (60, 45))]:
        folder = tmp_path / "a"
        folder.mkdir(exist_ok=True)
        Image.new("RGB", size, (10, 200, 30)).save(folder / name)
    (tmp_path / "b").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "b" / "x.png")
    data = ImageFolderDataset(tmp_path, ["a", "b"])
    transform = eval_transform(pre(32))
    for index in range(len(data)):
        assert torch.equal(TransformedDataset(data, transform)[index][0],
                           eval_transform(pre(32), draft=False)(data[index][0]))
    assert drafts == []


# --------------------------------------------------------------------------- same pixels


def _compare(data: ImageFolderDataset, indices: list[int], chosen: Preprocessing) -> list[tuple[float, float, float]]:
    ours = TransformedDataset(data, eval_transform(chosen, normalize=False))
    full = TransformedDataset(data, eval_transform(chosen, draft=False, normalize=False))
    return [differences(ours[i][0], full[i][0]) for i in indices]


@pytest.mark.parametrize("size,mode", [(32, "center"), (64, "center"), (64, "squash"), (48, "border"),
                                       ((40, 56), "center")])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_photos_match_full_decoding_at_the_final_size(assets: Path, size, mode: str, interpolation: str,
                                                      drafts: list) -> None:
    """hymenoptera's photos (~500x375, many with fine texture): a reduced decode changes each image by
    < 2/255 on average (measured: <= 1.2), and no pixel by much (measured: <= 14/255, at the image's
    edges, which border mode keeps whole)."""
    data = ImageFolderDataset(assets / "data" / "hymenoptera" / "train", ["ants", "bees"])
    indices = list(range(0, len(data), 6))
    figures = _compare(data, indices, pre(size, mode, interpolation))
    assert len(drafts) >= 0.8 * len(indices)  # most were decoded at half size or less
    assert all(decoded[0] <= -(-stored[0] // 2) for stored, decoded in drafts)
    assert max(mean for mean, _, _ in figures) < 2.0, figures
    assert np.mean([mean for mean, _, _ in figures]) < 1.0
    assert max(p99 for _, p99, _ in figures) <= 12, figures
    assert max(peak for _, _, peak in figures) <= 20, figures


@pytest.mark.parametrize("size", [32, 64, 128, 224])
def test_a_2000x1500_jpeg_matches_full_decoding(photos: ImageFolderDataset, size: int, drafts: list) -> None:
    for mode in ("center", "squash", "border"):
        figures = _compare(photos, list(range(len(photos))), pre(size, mode, "bicubic"))
        assert max(mean for mean, _, _ in figures) < 2.0 and max(peak for _, _, peak in figures) <= 16, (mode, figures)
    assert len(drafts) == 3 * len(photos)


# --------------------------------------------------------------------------- caches and the switch


def test_the_image_cache_holds_what_the_loader_would_decode(photos: ImageFolderDataset) -> None:
    chosen = pre(32)
    transform = eval_transform(chosen)
    reduced = DecodedImages(photos, cache_resize(chosen), workers=2, draft=True)
    full = DecodedImages(photos, cache_resize(chosen), workers=2)
    for index in range(len(photos)):
        assert torch.equal(transform(reduced[index][0]), TransformedDataset(photos, transform)[index][0])
    assert reduced.content_identity() != full.content_identity()
    # the feature cache's key of an uncached folder names the plan: never features of the other decode
    assert dataset_identity(TransformedDataset(photos, transform)) != \
        dataset_identity(TransformedDataset(photos, eval_transform(chosen, draft=False)))


@pytest.mark.parametrize("draft", [True, False])
def test_transforms_draft_decode_reaches_the_loaders_and_the_cache(photos: ImageFolderDataset, tmp_path: Path,
                                                                   draft: bool, drafts: list) -> None:
    overrides = ["experiment=smoke", "dataset.select_fraction=0",
                 "dataset=folder", f"dataset.root={photos.root}", "dataset.val_fraction=0.5",
                 "dataset.cache_images=true", f"transforms.draft_decode={str(draft).lower()}"]
    prepared = prepare(compose_train(overrides), tmp_path)
    assert len(drafts) == (len(photos) if draft else 0)  # the image cache decoded every photo
    assert all(decoded == (250, 188) for _, decoded in drafts)
    for loader in (prepared.setup.train_loader, prepared.setup.val_loader):
        assert (loader.dataset.transform.decode is not None) == draft


@pytest.mark.parametrize("draft", [True, False], ids=["draft", "full"])
@pytest.mark.slow
def test_eval_predict_and_the_api_decode_as_the_run_trained(photos: ImageFolderDataset, tmp_path: Path, draft: bool,
                                                            drafts: list) -> None:
    """A run trained with transforms.draft_decode=true|false is evaluated and predicted on decoded the same way."""
    from omegaconf import OmegaConf

    import transfer_cli
    from transfer_cli.cli import main
    from transfer_cli.inference.predict import predict_images
    from transfer_cli.training.run import train

    cfg = compose_train(["experiment=smoke", "dataset.select_fraction=0",
                         "dataset=folder", f"dataset.root={photos.root}",
                         "dataset.val_fraction=0.5", "dataset.cache_images=false",
                         "strategy=feature_extract", "trainer.epochs=1",
                         f"transforms.draft_decode={str(draft).lower()}"])
    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), run / "config.yaml", resolve=True)
    train(cfg, run)
    files = [path for path, _ in photos.samples]
    uses = {"eval": lambda: main(["eval", str(run)]), "predict": lambda: predict_images(run, files, top_k=1),
            "api": lambda: transfer_cli.load_run(run).predict(files, top_k=1)}
    for name, use in uses.items():
        drafts.clear()
        use()
        assert bool(drafts) == draft and all(decoded[0] < stored[0] for stored, decoded in drafts), name
