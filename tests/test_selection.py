"""best.pt is chosen on a selection split held out of train; val only reports (runs/selection.py).

The decisive case: a val split whose labels are swapped. As the network learns the training classes, its top-1
on the selection split (train's own labels) rises while val's falls; a checkpoint chosen on val would be an early,
untrained epoch, one chosen on the selection split a late one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from transfer_cli.config.loading import load_run_config
from transfer_cli.config.schema import DatasetConfig, EarlyStoppingConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.datasets import check_same_splits, load_splits
from transfer_cli.runs.report import build_report
from transfer_cli.runs.selection import best_record
from transfer_cli.training.run import train
from transfer_cli.training.state import check_monitor

from conftest import compose_train
from helpers import one_error_line, run_metrics, trained_in_process, transfer, write_run


COLOURS = ((210, 30, 30), (30, 30, 210))


def write_swapped(root: Path, per_class: int = 40) -> None:
    """train/ red = class_0, blue = class_1; val/ the other way round."""
    rng = np.random.default_rng(0)
    for split, order in (("train", (0, 1)), ("val", (1, 0))):
        for label, colour in zip(order, COLOURS, strict=True):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def folder_run(root: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", "dataset=folder", f"dataset.root={root}", "dataset.select_fraction=0.25",
            "trainer.epochs=5", "trainer.batch_size=8", "strategy=fine_tune", *extra]


def synthetic(**kwargs: object) -> DatasetConfig:
    return DatasetConfig(name="synthetic", num_classes=3, train_size=60, val_size=30, **kwargs)


# --------------------------------------------------------------------------- the split itself


def test_the_selection_split_is_a_stratified_seeded_part_of_train_never_trained_on() -> None:
    whole = load_splits(synthetic(select_fraction=0))
    carved = load_splits(synthetic(select_fraction=0.2))
    assert carved.select is not None and whole.select is None
    train_items = [carved.train.indices[i] for i in range(len(carved.train))]
    select_items = [carved.select.indices[i] for i in range(len(carved.select))]
    assert not set(train_items) & set(select_items)  # disjoint
    assert sorted(train_items + select_items) == list(range(len(whole.train)))  # together: all of train
    assert [carved.select_labels.count(c) for c in range(3)] == [4, 4, 4]  # 20% of each class's 20
    assert carved.val_labels == whole.val_labels  # val untouched
    assert load_splits(synthetic(select_fraction=0.2)).select.indices == carved.select.indices  # seeded
    assert load_splits(synthetic(select_fraction=0.2, split_seed=7)).select.indices != carved.select.indices
    assert carved.identity["select"]["images"] == 12 and "select" not in whole.identity


def test_a_class_too_small_to_hold_one_out_is_one_line_naming_it_and_the_way_out(tmp_path: Path) -> None:
    write_swapped(tmp_path, per_class=1)
    with pytest.raises(TransferError, match="class 'class_0' has 1 image: dataset.select_fraction .* "
                                            "dataset.select_fraction=0"):
        load_splits(DatasetConfig(name="folder", root=str(tmp_path), select_fraction=0.1))


def test_resume_refuses_a_changed_selection_split() -> None:
    before = load_splits(synthetic(select_fraction=0.2)).identity
    after = load_splits(synthetic(select_fraction=0.3)).identity
    with pytest.raises(TransferError, match="train and select splits"):
        check_same_splits(after, before)
    only_select = {**before, "select": after["select"]}
    with pytest.raises(TransferError, match="select split .* would choose the best epoch on other images"):
        check_same_splits(only_select, before)


def test_a_saved_config_without_select_fraction_is_refused(tmp_path: Path) -> None:
    tree = OmegaConf.to_container(OmegaConf.structured(compose_train(["experiment=smoke"])))
    del tree["dataset"]["select_fraction"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(tree))
    with pytest.raises(TransferError, match="names no dataset.select_fraction"):
        load_run_config(tmp_path)


def test_early_stopping_watches_the_selection_split_unless_told_otherwise() -> None:
    check_monitor(EarlyStoppingConfig(patience=2), 3, selecting=True)
    check_monitor(EarlyStoppingConfig(patience=2), 3, selecting=False)  # null: val/acc1 without a selection split
    with pytest.raises(TransferError, match="monitor=select/loss: dataset.select_fraction=0 .* monitor val/loss"):
        check_monitor(EarlyStoppingConfig(patience=2, monitor="select/loss"), 3, selecting=False)
    with pytest.raises(TransferError, match="top-5 .* monitor select/acc1 or select/loss"):
        check_monitor(EarlyStoppingConfig(patience=2, monitor="select/acc5"), 5, selecting=True)


# --------------------------------------------------------------------------- choosing on it


def test_best_record_takes_the_highest_selection_top1_then_the_lower_loss_then_the_earlier_epoch() -> None:
    records = [{"epoch": 1, "select/acc1": 0.5, "select/loss": 0.9, "val/acc1": 0.9},
               {"epoch": 2, "select/acc1": 0.8, "select/loss": 0.7, "val/acc1": 0.1},
               {"epoch": 3, "select/acc1": 0.8, "select/loss": 0.6, "val/acc1": 0.2},
               {"epoch": 4, "select/acc1": 0.8, "select/loss": 0.6, "val/acc1": 0.3},
               {"epoch": 5, "select/acc1": float("nan"), "select/loss": 0.1, "val/acc1": 1.0}]
    assert best_record(records)["epoch"] == 3
    on_val = [{"epoch": r["epoch"], "val/acc1": r["val/acc1"], "val/loss": 1.0} for r in records[:4]]
    assert best_record(on_val)["epoch"] == 1


def test_best_pt_is_chosen_on_the_selection_split_and_val_is_reported_for_it(tmp_path: Path) -> None:
    write_swapped(tmp_path / "data")
    summary = train(compose_train(folder_run(tmp_path / "data")), tmp_path / "run")
    records = run_metrics(tmp_path / "run")
    chosen = max(records, key=lambda r: (r["select/acc1"], -r["select/loss"], -r["epoch"]))
    assert summary["selected_on"] == "select" and summary["best_epoch"] == chosen["epoch"]
    assert summary["selected_acc"] == chosen["select/acc1"] >= 0.9, "the network learns the training colours"
    assert summary["reported_val_acc"] == chosen["val/acc1"]
    # val's labels are swapped: choosing on val would have kept a worse-trained epoch with a higher number
    assert max(r["val/acc1"] for r in records) > summary["reported_val_acc"]
    assert summary["select_images"] == 20 and summary["train_images"] == 60 and summary["val_images"] == 80
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]


def test_without_a_selection_split_best_pt_is_chosen_on_val_and_every_output_says_so(tmp_path: Path) -> None:
    write_swapped(tmp_path / "data")
    trained_in_process(tmp_path / "run", compose_train(folder_run(tmp_path / "data", "dataset.select_fraction=0")))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    records = run_metrics(tmp_path / "run")
    assert not any("select/acc1" in r for r in records)
    assert summary["selected_on"] == "val" and summary["select_images"] == 0 and summary["train_images"] == 80
    assert summary["reported_val_acc"] == summary["selected_acc"] == max(r["val/acc1"] for r in records)
    table, _ = build_report([tmp_path / "run"], tmp_path / "report")
    assert "(selected on val)" in table


def test_the_console_line_says_where_best_pt_was_chosen(tmp_path: Path) -> None:
    small = ["experiment=smoke", "trainer.epochs=3", "strategy=feature_extract", "dataset.train_size=40",
             "dataset.val_size=16"]
    done = transfer("train", *small, f"hydra.run.dir={tmp_path / 'a'}")
    assert done.returncode == 0, done.stderr
    assert re.search(r"val acc \d\.\d{4} \(best\.pt, epoch \d, chosen on the selection split at \d\.\d{4}\)",
                     done.stdout), done.stdout
    off = transfer("train", *small, "dataset.select_fraction=0", f"hydra.run.dir={tmp_path / 'b'}")
    assert re.search(r"\(best\.pt, epoch \d, selected on val: optimistic\)", off.stdout), off.stdout
    bad = transfer("train", "experiment=smoke", "dataset.select_fraction=1", f"hydra.run.dir={tmp_path / 'c'}")
    assert "dataset.select_fraction" in one_error_line(bad.returncode, bad.stderr)


def test_report_headline_is_the_reported_number_and_marks_runs_selected_on_val(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "fine_tune", 0, [0.5, 0.9, 0.7], finished=True)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    summary |= {"reported_val_acc": 0.7, "selected_on": "select", "selected_acc": 0.95, "best_epoch": 3}
    (tmp_path / "a" / "summary.json").write_text(json.dumps(summary))
    write_run(tmp_path / "b", "feature_extract", 0, [0.6, 0.8, 0.7], finished=True)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    (tmp_path / "b" / "summary.json").write_text(json.dumps(summary | {"selected_on": "val"}))
    table, _ = build_report([tmp_path], tmp_path / "report")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if "fine_tune" in line or "feature_extract" in line}
    assert "| 0.7000 |" in rows["fine_tune"] and "select: 0.9500" in rows["fine_tune"]
    assert "0.8000 (selected on val)" in rows["feature_extract"] and "val: 0.8000" in rows["feature_extract"]


def test_the_selection_split_is_scored_on_cached_features_as_on_images(tmp_path: Path, fresh_feature_cache: None,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    overrides = ["experiment=smoke", "strategy=feature_extract", "trainer.epochs=2", "dataset.train_size=60",
                 "dataset.val_size=24"]
    with caplog.at_level("INFO", logger="transfer_cli"):
        train(compose_train(overrides), tmp_path / "cached")
    assert "cached select features" in caplog.text
    train(compose_train(overrides + ["trainer.cache_features=false"]), tmp_path / "plain")
    cached, plain = run_metrics(tmp_path / "cached"), run_metrics(tmp_path / "plain")
    for split in ("select", "val"):
        assert [r[f"{split}/acc1"] for r in cached] == [r[f"{split}/acc1"] for r in plain]
        assert [r[f"{split}/loss"] for r in cached] == pytest.approx([r[f"{split}/loss"] for r in plain], rel=1e-5)
    caplog.clear()
    with caplog.at_level("INFO", logger="transfer_cli"):
        train(compose_train(overrides), tmp_path / "again")
    assert "feature cache hit for select split" in caplog.text
