"""dataset.balance: a 9:1 training set drawn evenly (sampler) or weighted evenly in the loss (loss), exactly
repeatable and resumable, recorded in summary.json, and warned about in the plan when left unbalanced."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from transfer_cli.cli import main
from transfer_cli.data.balance import loss_weights, sample_weights
from transfer_cli.data.loaders import EpochSampler, make_loader
from transfer_cli.inference.evaluate import evaluate_run
from transfer_cli.runs import checkpoint
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.assemble import prepare
from transfer_cli.training.run import train

from conftest import compose_train
from helpers import Crash, comparable, crash_after, run_metrics, trained_in_process


pytestmark = pytest.mark.usefixtures("fresh_feature_cache")

TRAIN = {"many": 18, "few": 2}  # 9:1
VAL = {"many": 4, "few": 4}


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ folders of two classes of flat colours (plus a gradient), 9:1 in train."""
    root = tmp_path_factory.mktemp("skewed")
    for split, counts in (("train", TRAIN), ("val", VAL)):
        for shade, (name, count) in zip((40, 200), counts.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (shade, 11 * i, 255 - shade)).save(root / split / name / f"{i}.png")
    return root


def run_on(root: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", "dataset=folder", f"dataset.root={root}", "dataset.select_fraction=0",
            "strategy=fine_tune", "trainer.epochs=2",
            "trainer.batch_size=4", "dataset.cache_images=false", *extra]


def drawn(labels: list[int], seed: int, epoch: int, weights: list[float] | None) -> list[int]:
    """The indices one epoch of a training loader over `labels` draws."""
    loader = make_loader(TensorDataset(torch.arange(len(labels))), 100, train=True, num_workers=0, seed=seed,
                         pin_memory=False, weights=weights)
    loader.sampler.set_epoch(epoch)
    return [int(i) for (batch,) in loader for i in batch]


def test_the_sampler_draws_a_nine_to_one_set_evenly_differently_per_epoch_and_again_per_seed() -> None:
    labels = [0] * 900 + [1] * 100
    weights = sample_weights(labels, ["many", "few"])
    assert weights == [1 / 900] * 900 + [1 / 100] * 100
    first = drawn(labels, seed=7, epoch=0, weights=weights)
    per_class = Counter(labels[i] for i in first)
    assert len(first) == 1000 and abs(per_class[0] - 500) < 80 and abs(per_class[1] - 500) < 80  # ~5 sigma
    assert Counter(labels[i] for i in drawn(labels, seed=7, epoch=0, weights=None))[1] == 100  # unbalanced: 1 in 10
    assert drawn(labels, seed=7, epoch=1, weights=weights) != first
    assert drawn(labels, seed=7, epoch=0, weights=weights) == first
    assert drawn(labels, seed=8, epoch=0, weights=weights) != first


def test_data_parallel_ranks_share_out_one_weighted_draw() -> None:
    weights = sample_weights([0] * 90 + [1] * 10, ["many", "few"])
    whole = list(EpochSampler(100, seed=3, weights=weights))
    ranks = [list(EpochSampler(100, seed=3, rank=r, world_size=2, weights=weights)) for r in (0, 1)]
    assert [i for pair in zip(*ranks) for i in pair] == whole


def test_balance_needs_training_images_of_every_class() -> None:
    with pytest.raises(Exception, match="dataset.balance=loss needs training images of every class, and few"):
        loss_weights([0, 0, 0], ["many", "few"])


@pytest.mark.slow
def test_the_loss_weights_classes_by_n_over_k_count_and_validation_stays_unweighted(skewed: Path,
                                                                                    tmp_path: Path) -> None:
    counts = {name: len(list((skewed / "train" / name).iterdir())) for name in ("few", "many")}  # sorted classes
    n, k = sum(counts.values()), len(counts)
    expected = torch.tensor([n / (k * counts["few"]), n / (k * counts["many"])])  # [5.0, 0.5556]
    prepared = prepare(compose_train(run_on(skewed, "dataset.balance=loss")), tmp_path / "prepared")
    assert torch.allclose(prepared.setup.runner.loss_fn.weight, expected)
    assert prepare(compose_train(run_on(skewed)), tmp_path / "plain").setup.runner.loss_fn.weight is None

    run_dir = tmp_path / "run"
    trained_in_process(run_dir, compose_train(run_on(skewed, "dataset.balance=loss", "trainer.epochs=1")))
    scored, _ = evaluate_run(run_dir, ["checkpoint=last"])  # plain cross-entropy over the val images
    assert read_metrics(run_dir)[-1]["val/loss"] == pytest.approx(scored["loss"], rel=1e-5)


@pytest.mark.slow
def test_cached_features_are_drawn_as_the_images_are_and_summary_records_the_balance(skewed: Path,
                                                                                     tmp_path: Path) -> None:
    overrides = run_on(skewed, "dataset.balance=sampler", "strategy=feature_extract", "augment=none")
    train(compose_train(overrides + ["trainer.cache_features=true"]), tmp_path / "cached")
    assert list((tmp_path / "feature-cache").glob("*.pt")), "the head trained on cached features"
    train(compose_train(overrides + ["trainer.cache_features=false"]), tmp_path / "plain")
    cached, plain = run_metrics(tmp_path / "cached"), run_metrics(tmp_path / "plain")
    for a, b in zip(cached, plain, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5), "another draw of the training images"
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["balance"] == "sampler" and summary["train_per_class"] == {"few": 2, "many": 18}


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_draws_and_ends_bit_for_bit_as_the_uninterrupted_one(skewed: Path,
                                                                                    tmp_path: Path) -> None:
    overrides = run_on(skewed, "dataset.balance=sampler", "trainer.checkpoint_every_steps=2")
    train(compose_train(overrides), tmp_path / "whole")
    crashed = tmp_path / "crashed"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Crash):
        crash_after(patch, epoch=2, step=2)
        train(compose_train(overrides), crashed)
    state = checkpoint.load(crashed / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 2)
    train(compose_train(overrides), crashed, resume=state)
    assert comparable(read_metrics(crashed)) == comparable(read_metrics(tmp_path / "whole"))
    ends = [checkpoint.load(run / "checkpoints" / "last.pt")["model"] for run in (crashed, tmp_path / "whole")]
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][name], ends[1][name]) for name in ends[0])


def test_the_plan_counts_images_per_class_and_warns_of_a_nine_to_one_set(skewed: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         hydra_in_process: None) -> None:
    assert main(["train", *run_on(skewed), "dry_run=true", f"hydra.run.dir={tmp_path / 'a'}"]) == 0
    out = capsys.readouterr().out
    assert "per class train few 2, many 18; val few 4, many 4" in out
    assert ("warning   imbalanced classes: 'many' has 9.0x the train images of 'few' (18 vs 2): "
            "dataset.balance=sampler draws every class equally often") in out
    assert main(["train", "experiment=smoke", "dataset.select_fraction=0", "dry_run=true",
                 f"hydra.run.dir={tmp_path / 'b'}"]) == 0
    out = capsys.readouterr().out
    assert "per class train class_0 96, class_1 96, class_2 96, class_3 96;" in out and "warning" not in out


def test_the_plan_sums_up_many_classes_by_their_range(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      hydra_in_process: None) -> None:
    """384 images over 13 classes: 7 classes of 30, 6 of 29 (the synthetic set deals labels in turn)."""
    assert main(["train", "experiment=smoke", "dataset.num_classes=13", "dataset.select_fraction=0", "dry_run=true",
                 f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "per class train 29 (class_7) to 30 (class_0) images over 13 classes;" in out and "warning" not in out
