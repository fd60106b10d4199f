"""Image folders in the wild: odd modes load as 8-bit RGB, unreadable files are found by the scan."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer_cli.config.schema import DatasetConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.datasets import RawSplits, load_splits

from conftest import REPO


SIZE = (16, 16)


def write_folder(root: Path) -> Path:
    """`root/train/{a,b}/` and `root/val/{a,b}/`, two plain RGB PNGs in each."""
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", SIZE, (40 * index, 90, 160)).save(folder / f"{index}.png")
    return root


def load(root: Path, on_bad_image: str = "skip") -> RawSplits:
    return load_splits(DatasetConfig(name="folder", select_fraction=0, root=str(root), on_bad_image=on_bad_image))


def loaded(splits: RawSplits, path: Path) -> Image.Image:
    """The training image read from `path`, through the dataset's own loader."""
    index = [sample for sample, _ in splits.train.samples].index(path)
    return splits.train[index][0]


def palette(transparent: bool) -> Image.Image:
    image = Image.new("P", SIZE, 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    if transparent:
        image.info["transparency"] = bytes([0, 128] + [255] * 254)  # per-entry alpha, as many PNGs have
    return image


def jpeg_bytes(size: tuple[int, int] = (256, 192), progressive: bool = False) -> bytes:
    """A noise JPEG: noise keeps the entropy-coded data large, so cutting it loses pixels, not just padding."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


# --------------------------------------------------------------------------- modes

MODES = {
    "L.png": (lambda: Image.new("L", SIZE, 100), (100, 100, 100)),
    "RGBA.png": (lambda: Image.new("RGBA", SIZE, (10, 20, 30, 40)), (10, 20, 30)),
    "LA.png": (lambda: Image.new("LA", SIZE, (100, 50)), (100, 100, 100)),
    "P.png": (lambda: palette(transparent=False), (200, 100, 50)),
    "P_transparency.png": (lambda: palette(transparent=True), (200, 100, 50)),
    "CMYK.jpg": (lambda: Image.new("CMYK", SIZE, (0, 255, 255, 0)), (255, 0, 0)),
    # 16-bit: PIL's convert would clip 32768 to 255; scaled, it is mid-grey
    "I16.png": (lambda: Image.fromarray(np.full(SIZE, 32768, dtype=np.uint16)), (128, 128, 128)),
    "I.tif": (lambda: Image.new("I", SIZE, 40000), (156, 156, 156)),
}


@pytest.mark.filterwarnings("error")  # palette transparency must not trigger PIL's "convert to RGBA" warning
@pytest.mark.parametrize("filename", list(MODES))
def test_image_modes_load_as_8bit_rgb(tmp_path: Path, filename: str) -> None:
    make, expected = MODES[filename]
    path = write_folder(tmp_path) / "train" / "a" / filename
    make().save(path)
    splits = load(tmp_path)
    assert splits.skipped_images == []
    image = loaded(splits, path)
    pixels = np.asarray(image)
    assert (image.mode, pixels.dtype, pixels.shape) == ("RGB", np.uint8, (16, 16, 3))
    assert np.abs(pixels.astype(int) - expected).max() <= 2  # JPEG (CMYK) is lossy


# --------------------------------------------------------------------------- unreadable files


def corrupt(folder: Path) -> Path:
    path = folder / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    return path


def truncated(folder: Path, progressive: bool = False) -> Path:
    path = folder / f"truncated{'_progressive' if progressive else ''}.jpg"
    data = jpeg_bytes(progressive=progressive)
    path.write_bytes(data[: len(data) // 2])
    return path


BAD = {
    "corrupt": corrupt,
    "truncated": truncated,
    "truncated_progressive": lambda folder: truncated(folder, progressive=True),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_image_is_skipped_with_one_warning(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    bad = BAD[kind](write_folder(tmp_path) / "val" / "b")
    with caplog.at_level(logging.WARNING, logger="transfer_cli.data.folder"):
        splits = load(tmp_path)
    assert splits.skipped_images == [str(bad)]
    assert bad not in [path for path, _ in splits.val.samples] and len(splits.val) == 4
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [logging.WARNING]  # one warning
    assert str(bad) in caplog.text


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_image_with_error_names_the_file(tmp_path: Path, kind: str) -> None:
    bad = BAD[kind](write_folder(tmp_path) / "train" / "a")
    with pytest.raises(TransferError) as info:
        load(tmp_path, on_bad_image="error")
    assert str(bad) in str(info.value) and "dataset.on_bad_image=skip" in str(info.value)


def test_whole_jpeg_passes_the_scan(tmp_path: Path) -> None:
    path = write_folder(tmp_path) / "train" / "a" / "whole.jpg"
    path.write_bytes(jpeg_bytes(size=(1024, 768)))
    splits = load(tmp_path, on_bad_image="error")
    assert loaded(splits, path).size == (1024, 768)  # the scan's reduced-scale draft does not leak into loading


def test_skipped_in_both_splits_and_single_layout(tmp_path: Path) -> None:
    write_folder(tmp_path / "split")
    skipped = [corrupt(tmp_path / "split" / "train" / "a"), truncated(tmp_path / "split" / "val" / "b")]
    assert sorted(load(tmp_path / "split").skipped_images) == sorted(map(str, skipped))
    single = tmp_path / "split" / "train"  # a/ and b/ only: split by val_fraction
    assert load(single).skipped_images == [str(skipped[0])]


def test_class_left_empty_by_skipping_names_the_skipped_file(tmp_path: Path) -> None:
    write_folder(tmp_path)
    for path in (tmp_path / "train" / "b").iterdir():
        path.unlink()
    corrupt(tmp_path / "train" / "b")
    with pytest.raises(TransferError, match=r"b holds no images .*corrupt\.jpg"):
        load(tmp_path)


@pytest.mark.slow
def test_cli_bad_image_error_is_one_line_and_leaves_no_run_dir(tmp_path: Path) -> None:
    bad = corrupt(write_folder(tmp_path / "images") / "train" / "b")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "transfer_cli", "train", "experiment=smoke", "dataset.select_fraction=0",
         "dataset=folder",
         f"dataset.root={tmp_path / 'images'}", "dataset.on_bad_image=error", "trainer.epochs=1",
         "strategy=fine_tune", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0]
    assert not run_dir.exists()
