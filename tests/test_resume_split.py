"""A resume continues on the images its run started on; hidden files and one-image classes never slip into a split.

A flat folder (`<class>/` subfolders only) holds out dataset.val_fraction of each class: files added, moved to
another class folder or renamed between a Ctrl-C and `transfer resume` would re-draw both splits, so the resume
is refused, in one line, before it changes the run.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from transfer_cli.cli import main
from transfer_cli.config.schema import DatasetConfig
from transfer_cli.core.errors import Interrupted, TransferError
from transfer_cli.data.datasets import load_splits
from transfer_cli.runs import checkpoint
from transfer_cli.runs.rundir import resume_point
from transfer_cli.training.run import train

from conftest import compose_train


# 8 images a class, val_fraction 0.25: 6 + 6 train, 2 + 2 val; batch 4 makes 3 steps an epoch
RUN = ["experiment=smoke", "dataset=folder", "dataset.val_fraction=0.25", "dataset.select_fraction=0",
       "strategy=fine_tune", "trainer.epochs=2", "trainer.batch_size=4", "dataset.cache_images=false"]
CTRL_C_AT_STEP = 4  # the first step of epoch 2: last.pt keeps epoch 1 and that step


def write_class(root: Path, name: str, count: int, start: int = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    shade = 40 if name == "ants" else 200
    for index in range(start, start + count):
        Image.new("RGB", (40, 40), (shade, 3 * index, 255 - shade)).save(folder / f"{index}.png")
    return folder


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run but its log (resume appends to train.log before it reads the data) and its lock."""
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*"))
            if path.is_file() and path.name not in ("train.log", ".lock")}


@pytest.fixture
def interrupted(tmp_path: Path) -> tuple[Path, Path]:
    """A run on ants/bees stopped by Ctrl-C early in epoch 2, its config.yaml written as `transfer train` writes it."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    for name in ("ants", "bees"):
        write_class(data, name, 8)
    cfg = compose_train([*RUN, f"dataset.root={data}"])
    run_dir.mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    real, steps = torch.Tensor.backward, [0]

    def backward_then_ctrl_c(self: torch.Tensor, *args, **kwargs) -> None:
        real(self, *args, **kwargs)
        steps[0] += 1
        if steps[0] == CTRL_C_AT_STEP:
            signal.raise_signal(signal.SIGINT)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupted):
        patch.setattr(torch.Tensor, "backward", backward_then_ctrl_c)
        train(cfg, run_dir)
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 1)
    assert state["splits"]["train"]["images"] == 12 and state["splits"]["val"]["images"] == 4
    return data, run_dir


def refused(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`transfer resume`'s one stderr line, after checking that it exited 2 and left the run as it was."""
    before = run_files(run_dir)
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert run_files(run_dir) == before, "a refused resume changed the run"
    return err[0]


@pytest.mark.slow
def test_resume_refuses_images_added_and_succeeds_once_they_are_gone(
        interrupted: tuple[Path, Path], capsys: pytest.CaptureFixture[str], hydra_in_process: None) -> None:
    data, run_dir = interrupted
    write_class(data, "ants", 10, start=100)  # 18 + 8 images: 14 + 6 train, 4 + 2 val
    line = refused(run_dir, capsys)
    assert f"the train and val splits of {data} changed since the run started" in line
    assert "train 12 -> 20 images; val 4 -> 6 images" in line
    assert "restore the data as it was, or start a new run" in line

    for path in (data / "ants").glob("1??.png"):
        path.unlink()
    assert main(["resume", str(run_dir)]) == 0
    assert (run_dir / "summary.json").is_file()


@pytest.mark.slow
def test_resume_refuses_files_relabelled_or_replaced(interrupted: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                     hydra_in_process: None) -> None:
    """Counts that stay the same do not hide a change: per class counts name a move, paths a replacement."""
    data, run_dir = interrupted
    shutil.move(data / "ants" / "0.png", data / "bees" / "ant.png")  # 7 + 9: 5 + 7 train, 2 + 2 val
    line = refused(run_dir, capsys)
    assert "(train images per class: ants 6 -> 5, bees 6 -> 7; val other files, as many per class)" in line, line
    shutil.move(data / "bees" / "ant.png", data / "ants" / "0.png")

    (data / "bees" / "3.png").rename(data / "bees" / "three.png")  # a file replaced by another
    assert "other files, as many per class" in refused(run_dir, capsys)

    cfg, state = resume_point(run_dir)  # a sweep re-run resuming this job calls train() as resume does
    with pytest.raises(TransferError, match="changed since the run started"):
        train(cfg, run_dir, resume=state)


@pytest.mark.slow
def test_a_checkpoint_without_its_split_record_is_refused(interrupted: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          hydra_in_process: None) -> None:
    """Nothing proves such a run would go on with its own images: refused, every file as it was."""
    _, run_dir = interrupted
    copy = tmp_path / "unrecorded"
    shutil.copytree(run_dir, copy)
    last = copy / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    del state["splits"]
    checkpoint.save_atomic(state, last)
    before = last.read_bytes()
    assert main(["resume", str(copy)]) == 2
    assert "holds no record of the images the run trained on" in capsys.readouterr().err
    assert last.read_bytes() == before and not (copy / "summary.json").exists()


def folder_cfg(root: Path, **overrides) -> DatasetConfig:
    return DatasetConfig(name="folder", root=str(root), val_fraction=0.25, select_fraction=0, **overrides)


def test_hidden_files_and_folders_are_no_images_at_any_depth(tmp_path: Path) -> None:
    for name in ("ants", "bees"):
        write_class(tmp_path, name, 4)
    write_class(tmp_path / "bees", ".thumbs", 3)  # a hidden folder inside a class folder: thumbnails
    write_class(tmp_path / "ants" / "more", ".hidden", 2)  # deeper still
    write_class(tmp_path, ".cache", 4)  # a hidden class folder
    (tmp_path / "ants" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "ants" / "._0.png").write_bytes(b"\0\5\26\7AppleDouble")  # macOS's resource-fork twin of 0.png
    (tmp_path / "bees" / ".1.png").write_bytes((tmp_path / "bees" / "1.png").read_bytes())

    splits = load_splits(folder_cfg(tmp_path, on_bad_image="error"))  # no hidden file is read, not even a bad one
    assert splits.classes == ["ants", "bees"]
    assert (len(splits.train), len(splits.val)) == (6, 2) and splits.skipped_images == []


@pytest.mark.slow
def test_a_class_folder_with_one_image_is_one_line_naming_it(tmp_path: Path, hydra_in_process: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_class(data, "ants", 4)
    wasps = write_class(data, "wasps", 1)
    (wasps / "broken.png").write_bytes(b"not a png")
    assert main(["train", *RUN, f"dataset.root={data}", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"class folder 'wasps' ({wasps}) holds a single readable image (1 more unreadable, skipped)" in err[0]
    assert f"add images to it, or split the data yourself into {data}/train/<class>/ and {data}/val/<class>/" in err[0]

    (wasps / "broken.png").unlink()
    (wasps / "0.png").unlink()
    with pytest.raises(TransferError, match=f"class folder {wasps} holds no images"):
        load_splits(folder_cfg(data))


def test_a_val_folder_lets_a_class_have_one_training_image(tmp_path: Path) -> None:
    """No share held out: one image to train on is enough."""
    write_class(tmp_path / "train", "ants", 3)
    write_class(tmp_path / "train", "bees", 1)
    for name in ("ants", "bees"):
        write_class(tmp_path / "val", name, 2)
    splits = load_splits(folder_cfg(tmp_path))
    assert sorted(splits.train_labels) == [0, 0, 0, 1] and len(splits.val) == 4
