"""Files of an image folder that are not images are named once, in one warning and in summary.json; hidden files
are left out silently; GIFs are images (PIL decodes their first frame)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from transfer_cli.config.schema import DatasetConfig
from transfer_cli.data.datasets import load_splits
from transfer_cli.training.run import train

from conftest import compose_train


pytestmark = pytest.mark.usefixtures("fresh_feature_cache")

COLOURS = {"ants": (200, 30, 30), "bees": (30, 30, 200)}


@pytest.fixture
def cluttered(tmp_path: Path) -> Path:
    """train/ and val/ class folders of PNGs, with a GIF, notes, a file of unknown type and macOS litter."""
    root = tmp_path / "images"
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), colour).save(root / split / name / f"{i}.png")
    gif = Image.new("P", (32, 32), 1)
    gif.putpalette([0, 0, 0, *COLOURS["ants"]] + [0] * 762)
    gif.save(root / "train" / "ants" / "x.gif", transparency=0)
    (root / "train" / "ants" / "notes.txt").write_text("collected in May")
    (root / "train" / "bees" / "b.xyz").write_bytes(b"\x00")
    (root / "val" / "ants" / "readme.md").write_text("# val")
    (root / "train" / "ants" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "val" / "bees" / "._0.png").write_bytes(b"\x00")  # AppleDouble beside 0.png
    return root


def test_unsupported_files_are_named_once_and_hidden_ones_never(cluttered: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="transfer_cli"):
        splits = load_splits(DatasetConfig(name="folder", root=str(cluttered), select_fraction=0))
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == ["skipped 3 files that are not supported images: notes.txt, b.xyz, readme.md"]
    assert splits.unsupported_files == [str(cluttered / "train" / "ants" / "notes.txt"),
                                        str(cluttered / "train" / "bees" / "b.xyz"),
                                        str(cluttered / "val" / "ants" / "readme.md")]


def test_a_gif_is_an_image_decoded_in_its_own_colours(cluttered: Path) -> None:
    splits = load_splits(DatasetConfig(name="folder", root=str(cluttered), select_fraction=0))
    assert len(splits.train) == 7 and splits.train_labels == [0, 0, 0, 0, 1, 1, 1]
    image, label = splits.train[3]  # ants: 0.png, 1.png, 2.png, x.gif
    assert (image.mode, image.getpixel((5, 5)), label) == ("RGB", COLOURS["ants"], 0)


def test_many_unsupported_files_are_counted_and_the_first_few_named(cluttered: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    for i in range(7):
        (cluttered / "train" / "bees" / f"scan{i}.pdf").write_bytes(b"%PDF")
    with caplog.at_level(logging.WARNING, logger="transfer_cli"):
        load_splits(DatasetConfig(name="folder", root=str(cluttered), select_fraction=0))
    assert caplog.records[-1].getMessage() == ("skipped 10 files that are not supported images: notes.txt, b.xyz, "
                                               "scan0.pdf, scan1.pdf, scan2.pdf and 5 more")


@pytest.mark.slow
def test_summary_json_records_the_files_left_out(cluttered: Path, tmp_path: Path) -> None:
    cfg = compose_train(["experiment=smoke", "dataset=folder", f"dataset.root={cluttered}", "dataset.select_fraction=0",
                         "trainer.epochs=1",
                         "strategy=feature_extract", "trainer.batch_size=4", "dataset.cache_images=false"])
    train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [Path(path).name for path in summary["unsupported_files"]] == ["notes.txt", "b.xyz", "readme.md"]
    assert summary["train_images"] == 7 and summary["skipped_images"] == 0
