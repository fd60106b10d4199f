"""End-to-end `train()` in-process: run-dir contents, every strategy, repeatability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transfer_cli.core.errors import TransferError
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import run_metrics


STRATEGIES = ["feature_extract", "fine_tune", "gradual", "discriminative", "discriminative_decay", "scratch", "lp_ft"]
TORCHVISION = ["backbone=torchvision", "backbone.name=resnet18", "backbone.weights=null"]
SUMMARY_KEYS = {"reported_val_acc", "selected_on", "selected_acc", "final_val_acc", "best_epoch", "epochs_run",
                "num_classes", "params_total",
                "params_trainable", "wall_time_s", "seed", "versions"}


def test_run_dir_holds_every_artifact(tmp_path: Path) -> None:
    summary = train(compose_train(FAST + ["strategy=gradual", "dataset.select_fraction=0.1"]), tmp_path)

    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["stage"] for r in records] == ["head", "last_block", "all"]
    for record in records:
        assert {"train/loss", "train/acc1", "val/loss", "val/acc1", "seconds", "lr"} <= set(record)
        assert set(record["lr"]) == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}
    assert records[0]["lr"]["layer1"] == 0.0 and records[0]["lr"]["head"] > 0

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk == json.loads(json.dumps(summary))
    assert 0.0 <= on_disk["final_val_acc"] <= 1.0 and on_disk["epochs_run"] == 3
    # best.pt: the epoch the selection split chose (the first of the highest top-1, ties to the lower loss)
    chosen = max(records, key=lambda r: (r["select/acc1"], -r["select/loss"], -r["epoch"]))
    assert on_disk["selected_on"] == "select" and on_disk["best_epoch"] == chosen["epoch"]
    assert on_disk["selected_acc"] == chosen["select/acc1"] and on_disk["reported_val_acc"] == chosen["val/acc1"]
    assert on_disk["params_trainable"]["head"] < on_disk["params_trainable"]["all"] == on_disk["params_total"]
    assert (tmp_path / "curves.png").stat().st_size > 1000

    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "stage", "epoch", "rng", "config", "classes"} <= set(last)
    assert last["epoch"] == 3 and last["stage"] == 2
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == on_disk["best_epoch"]


@pytest.mark.parametrize("backbone", ["timm", pytest.param("torchvision", marks=pytest.mark.slow)])  # resnet18: 11M
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_on_both_sources(tmp_path: Path, strategy: str, backbone: str) -> None:
    overrides = FAST + [f"strategy={strategy}", "trainer.epochs=3"]
    if backbone == "torchvision":
        overrides += TORCHVISION + ["dataset.train_size=48", "dataset.val_size=16"]
    summary = train(compose_train(overrides), tmp_path)
    assert summary["epochs_run"] == 3
    assert len(read_metrics(tmp_path)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["feature_extract", "fine_tune", "gradual", "discriminative", "scratch"])
def test_smoke_learns_with_every_strategy(tmp_path: Path, strategy: str) -> None:
    summary = train(compose_train(["experiment=smoke", f"strategy={strategy}"]), tmp_path)
    assert summary["reported_val_acc"] > 0.6, "4 classes: chance is 0.25"


@pytest.mark.slow
def test_two_seeded_runs_give_identical_metrics(tmp_path: Path) -> None:
    overrides = FAST + ["strategy=gradual", "augment=basic"]
    train(compose_train(overrides), tmp_path / "a")
    train(compose_train(overrides), tmp_path / "b")
    assert run_metrics(tmp_path / "a") == run_metrics(tmp_path / "b")


def test_a_different_seed_changes_the_run(tmp_path: Path) -> None:
    train(compose_train(FAST + ["strategy=fine_tune", "trainer.epochs=1"]), tmp_path / "a")
    train(compose_train(FAST + ["strategy=fine_tune", "trainer.epochs=1", "trainer.seed=7"]), tmp_path / "b")
    assert read_metrics(tmp_path / "a")[0]["train/loss"] != read_metrics(tmp_path / "b")[0]["train/loss"]


def test_discriminative_lrs_reach_the_optimizer(tmp_path: Path) -> None:
    train(compose_train(FAST + ["strategy=discriminative", "scheduler=constant", "optimizer.lr_scale=1"]), tmp_path)
    lrs = read_metrics(tmp_path)[0]["lr"]
    assert lrs == {"stem": 0.0, "layer1": 1e-5, "layer2": 5e-5, "layer3": 1e-4, "layer4": 5e-4, "head": 1e-3}


@pytest.mark.parametrize("override", ["trainer.epochs=0", "trainer.epochs=-2", "strategy.lr=0"])
def test_bad_numbers_are_user_errors(tmp_path: Path, override: str) -> None:
    with pytest.raises(TransferError):
        train(compose_train(FAST + ["strategy=fine_tune", override]), tmp_path)
