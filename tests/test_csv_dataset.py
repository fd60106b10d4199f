"""Labels in a CSV file (`dataset=csv`): the same images, splits, caches and checks as the equivalent folder, and
one line naming the file and the row for every mistake in it."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from transfer_cli.cli import main
from transfer_cli.config.schema import DatasetConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.datasets import load_splits
from transfer_cli.training.run import train

from conftest import compose_train
from helpers import Crash, assert_same_metrics, crash_after, one_error_line, trained_in_process


pytestmark = pytest.mark.usefixtures("fresh_feature_cache")

SHADES = {"ants": 40, "bees": 200}


def write_class(root: Path, name: str, count: int) -> list[str]:
    """`count` small PNGs of class `name` under root/name/; their paths relative to root."""
    (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (40, 40), (SHADES[name], 9 * index, 255 - SHADES[name])).save(root / name / f"{index}.png")
    return [f"{name}/{index}.png" for index in range(count)]


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("path", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A flat folder: ants/ with 8 images, bees/ with 6."""
    root = tmp_path / "images"
    write_class(root, "ants", 8)
    write_class(root, "bees", 6)
    return root


def rows_of(root: Path) -> list[list[str]]:
    """One row per image, labelled by its folder, in a shuffled order (row order must not matter)."""
    rows = [[str(path.relative_to(root)), path.parent.name] for path in sorted(root.rglob("*.png"))]
    random.Random(3).shuffle(rows)
    return rows


def csv_cfg(labels: Path, root: Path, **overrides) -> DatasetConfig:
    return DatasetConfig(name="csv", csv=str(labels), root=str(root), val_fraction=0.25, select_fraction=0,
                         **overrides)


def folder_cfg(root: Path) -> DatasetConfig:
    return DatasetConfig(name="folder", root=str(root), val_fraction=0.25, select_fraction=0)


def test_a_csv_and_the_equivalent_folder_hold_the_same_splits(images: Path, tmp_path: Path) -> None:
    labels = write_csv(tmp_path / "labels.csv", rows_of(images))
    from_csv, from_folder = load_splits(csv_cfg(labels, images)), load_splits(folder_cfg(images))
    assert from_csv.identity == from_folder.identity  # the file names and labels of each split, in order
    assert from_csv.classes == from_folder.classes == ["ants", "bees"]
    assert (from_csv.train_labels, from_csv.val_labels) == (from_folder.train_labels, from_folder.val_labels)
    assert from_csv.identity["train"]["per_class"] == {"ants": 6, "bees": 4}


def test_relabelling_one_row_changes_the_split_identity(images: Path, tmp_path: Path) -> None:
    rows = rows_of(images)
    before = load_splits(csv_cfg(write_csv(tmp_path / "a.csv", rows), images)).identity
    rows[0][1] = "bees" if rows[0][1] == "ants" else "ants"
    after = load_splits(csv_cfg(write_csv(tmp_path / "b.csv", rows), images)).identity
    assert before != after


def test_a_split_column_chooses_the_splits_and_test_rows_wait_for_eval(images: Path, tmp_path: Path) -> None:
    rows = [[f"ants/{i}.png", "ants", "train"] for i in range(5)] + [[f"bees/{i}.png", "bees", "train"]
                                                                    for i in range(4)]
    rows += [["ants/5.png", "ants", "val"], ["bees/4.png", "bees", "val"], ["ants/6.png", "ants", "test"],
             ["ants/7.png", "ants", "test"], ["bees/5.png", "bees", "test"]]
    labels = write_csv(tmp_path / "labels.csv", rows, ("path", "label", "split"))
    splits = load_splits(csv_cfg(labels, images))
    assert (len(splits.train), splits.val_labels) == (9, [0, 1])
    assert load_splits(csv_cfg(labels, images, val_split="test")).val_labels == [0, 0, 1]


def test_an_unreadable_listed_image_is_skipped_or_refused_as_in_a_folder(images: Path, tmp_path: Path) -> None:
    (images / "ants" / "0.png").write_bytes(b"not a png")
    labels = write_csv(tmp_path / "labels.csv", rows_of(images))
    splits = load_splits(csv_cfg(labels, images))
    assert splits.skipped_images == [str(images / "ants" / "0.png")] and len(splits.train) + len(splits.val) == 13
    with pytest.raises(TransferError, match=r"unreadable image .*ants/0\.png"):
        load_splits(csv_cfg(labels, images, on_bad_image="error"))


def _outside(images: Path, tmp_path: Path) -> str:
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", images / "ants" / "link.png")
    return "ants/link.png"


MISTAKES = {  # what the row says -> (its path, its label, its split), the words the line must hold
    "absolute path": (lambda images, tmp: str(images / "ants" / "0.png"), "leads outside dataset.root"),
    "dot-dot": (lambda images, tmp: "ants/../../images/ants/0.png", "leads outside dataset.root"),
    "link out of root": (_outside, "is a link that leads outside dataset.root"),
    "missing file": (lambda images, tmp: "ants/99.png", "no file ants/99.png under"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_bad_path_is_one_line_naming_the_file_and_row(mistake: str, images: Path, tmp_path: Path) -> None:
    path, words = MISTAKES[mistake]
    rows = rows_of(images) + [[path(images, tmp_path), "ants"]]
    labels = write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(TransferError) as error:
        load_splits(csv_cfg(labels, images))
    assert f"{labels} row {len(rows) + 1}: " in str(error.value) and words in str(error.value)


ROW_MISTAKES = {
    "empty label": ([["ants/0.png", ""]], 2, "empty label for ants/0.png"),
    "duplicated path": ([["ants/0.png", "ants"], ["./ants/0.png", "ants"]], 3,
                        "./ants/0.png is listed twice (also row 2)"),
    "unknown split": ([["ants/0.png", "ants", "trian"]], 2, "unknown split 'trian'"),
    "label with no train image": ([["ants/0.png", "ants", "train"], ["bees/0.png", "bees", "train"],
                                   ["ants/1.png", "wasps", "val"]], 4, "label 'wasps' has no train image"),
}


@pytest.mark.parametrize("mistake", list(ROW_MISTAKES))
def test_a_bad_row_is_one_line_naming_the_file_and_row(mistake: str, images: Path, tmp_path: Path) -> None:
    rows, number, words = ROW_MISTAKES[mistake]
    header = ("path", "label", "split") if len(rows[0]) == 3 else ("path", "label")
    labels = write_csv(tmp_path / "labels.csv", rows, header)
    with pytest.raises(TransferError) as error:
        load_splits(csv_cfg(labels, images))
    assert f"{labels} row {number}: {words}" in str(error.value)


def test_a_missing_column_is_one_line_from_the_command(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       hydra_in_process: None) -> None:
    labels = write_csv(tmp_path / "labels.csv", [["ants/0.png", "ants"]], ("file", "label"))
    code = main(["train", "experiment=smoke", "dataset=csv", f"dataset.csv={labels}", f"dataset.root={images}",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    line = one_error_line(code, err, labels, "row 1", "no path column")
    assert "path,label and optionally split" in line
    assert not (tmp_path / "run" / "summary.json").exists()


RUN = ["experiment=smoke", "dataset.select_fraction=0", "strategy=fine_tune", "trainer.epochs=2",
       "trainer.batch_size=4", "dataset.val_fraction=0.25", "dataset.cache_images=false"]


@pytest.mark.slow
def test_a_csv_run_scores_as_the_folder_run_and_evaluates_unchanged(images: Path, tmp_path: Path,
                                                                    hydra_in_process: None) -> None:
    labels = write_csv(tmp_path / "labels.csv", rows_of(images))
    csv_run = [*RUN, "dataset=csv", f"dataset.csv={labels}", f"dataset.root={images}"]
    from_csv = trained_in_process(tmp_path / "csv", compose_train(csv_run))
    train(compose_train([*RUN, "dataset=folder", f"dataset.root={images}"]), tmp_path / "folder")
    assert_same_metrics(from_csv, tmp_path / "folder")
    assert main(["eval", str(from_csv)]) == 0
    scored = json.loads((from_csv / "eval" / "val" / "best" / "metrics.json").read_text())
    assert scored["images"] == 4


@pytest.mark.slow
def test_resume_refuses_a_relabelled_row(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         hydra_in_process: None) -> None:
    rows = rows_of(images)
    labels = write_csv(tmp_path / "labels.csv", rows)
    cfg = compose_train([*RUN, "dataset=csv", f"dataset.csv={labels}", f"dataset.root={images}",
                         "trainer.checkpoint_every_steps=1"])
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Crash):
        crash_after(patch, epoch=2, step=1)
        trained_in_process(tmp_path / "run", cfg)
    ant = next(row for row in rows if row[1] == "ants")
    ant[1] = "bees"
    write_csv(labels, rows)
    capsys.readouterr()
    line = one_error_line(main(["resume", str(tmp_path / "run")]), capsys.readouterr().err, "changed since the run")
    assert "restore the data as it was, or start a new run" in line


@pytest.mark.slow
def test_a_relabelled_row_is_never_served_cached_features(images: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    rows = [[f"{name}/{i}.png", name, "train" if i < 4 else "val"] for name in ("ants", "bees") for i in range(6)]
    labels = write_csv(tmp_path / "labels.csv", rows, ("path", "label", "split"))
    overrides = ["experiment=smoke", "dataset=csv", "dataset.select_fraction=0", f"dataset.csv={labels}",
                 f"dataset.root={images}",
                 "strategy=feature_extract", "augment=none", "trainer.epochs=1", "trainer.batch_size=4",
                 "dataset.cache_images=false"]
    train(compose_train(overrides), tmp_path / "fill")
    assert len(list((tmp_path / "feature-cache").glob("*.pt"))) == 2, "train and val features cached"
    with caplog.at_level("INFO", logger="transfer_cli.training.feature_cache"):
        train(compose_train(overrides), tmp_path / "again")
    assert "feature cache hit for train split" in caplog.text, "the same rows are served from the cache"
    caplog.clear()
    rows[0][1] = "bees"  # a train row relabelled: the val rows stay as they were
    write_csv(labels, rows, ("path", "label", "split"))
    with caplog.at_level("INFO", logger="transfer_cli.training.feature_cache"):
        train(compose_train(overrides), tmp_path / "relabelled")
    assert "feature cache hit for train split" not in caplog.text
    assert "feature cache hit for val split" in caplog.text
