"""Resuming a run whose class folders changed since its checkpoint is refused, never trained on permuted labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from transfer_cli.cli import main
from transfer_cli.core.errors import TransferError
from transfer_cli.runs import checkpoint
from transfer_cli.training.run import train

from conftest import FAST, compose_train


COLOURS = {"ants": (200, 30, 30), "bees": (30, 200, 30), "wasps": (30, 30, 200)}


def image_folder(root: Path, classes: list[str]) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(6):
            Image.new("RGB", (40, 40), tuple(c + 5 * index for c in COLOURS[name])).save(root / name / f"{index}.png")
    return root


@pytest.fixture
def interrupted_run(tmp_path: Path) -> tuple[Path, Path]:
    """A two-epoch run on ants/bees/wasps, cut back to its first checkpoint."""
    data = image_folder(tmp_path / "data", ["ants", "bees", "wasps"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_train(FAST + ["dataset=folder", f"dataset.root={data}", "strategy=fine_tune", "trainer.epochs=2",
                                "trainer.checkpoint_every_steps=1"])
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    train(cfg, run_dir)
    (run_dir / "summary.json").unlink()  # as if killed before the end
    return data, run_dir


@pytest.mark.parametrize("change", ["rename", "add", "swap-order"])
@pytest.mark.slow
def test_resume_refuses_data_whose_classes_changed(interrupted_run: tuple[Path, Path], change: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str], hydra_in_process: None) -> None:
    data, run_dir = interrupted_run
    if change == "rename":
        (data / "bees").rename(data / "bumblebees")
    elif change == "add":
        image_folder(tmp_path / "extra", ["ants"])
        (tmp_path / "extra" / "ants").rename(data / "flies")
    else:  # same names, other order: "aaa" sorts first, so every label index moves
        (data / "wasps").rename(data / "aaa_wasps")
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    with pytest.raises(TransferError, match="the data's classes are not the run's"):
        train(compose_train(FAST + ["dataset=folder", f"dataset.root={data}", "strategy=fine_tune",
                                   "trainer.epochs=2"]), run_dir, resume=state)
    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the data's classes are not the run's" in err[0] and "train a new run" in err[0]
    assert not (run_dir / "summary.json").exists()


def test_resume_refuses_a_checkpoint_that_does_not_fit_the_model(interrupted_run: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture[str],
                                                                hydra_in_process: None) -> None:
    """A checkpoint from a version that named the classifier otherwise: one line, not a state-dict traceback."""
    _, run_dir = interrupted_run
    last = run_dir / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    state["model"] = {key.replace("fc.", "classifier.1."): value for key, value in state["model"].items()}
    checkpoint.save_atomic(state, last)
    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the model" in err[0] and "start a new run" in err[0], err
