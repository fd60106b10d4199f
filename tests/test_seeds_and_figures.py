"""Seeds and the figures a run records, from the user's side: an EMA on cached features, a split seed apart from
the training seed (a saved config must name it), report rows whose n counts seeds, and the lr an epoch ended
with."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import TensorDataset

from transfer_cli.cli import main
from transfer_cli.config.loading import load_run_config
from transfer_cli.core.errors import TransferError
from transfer_cli.data.datasets import load_splits
from transfer_cli.runs import checkpoint
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import fit as trainer
from transfer_cli.training.optim import build_scheduler
from transfer_cli.training.run import train

from conftest import compose_train
from helpers import assert_same_metrics, parse_markdown, run_metrics, write_run


TINY = ["experiment=smoke", "dataset.train_size=64", "dataset.val_size=32", "trainer.epochs=2",
        "dataset.select_fraction=0"]
HEAD_ALL_HEAD = ["strategy=feature_extract", "trainer.epochs=null", "strategy.stages=[{name: probe, epochs: 1, "
                 "train: [head]}, {name: all, epochs: 1, train: [all]}, {name: again, epochs: 1, train: [head]}]"]






# --------------------------------------------------------------------------- an EMA on cached features


@pytest.mark.slow
def test_an_ema_on_cached_features_matches_the_uncached_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The EMA averages the whole network either way. In the first head-only stage the EMA's backbone is the
    frozen live one and its head runs on the cached features; after a stage that trained the backbone the EMA's
    lags the live one, and the cached stage must validate the whole EMA on the images."""
    monkeypatch.setenv("TRANSFER_CACHE", str(tmp_path / "feature-cache"))
    on_features: list[bool] = []  # per epoch: whether it validated on the cached features (else on the images)
    real = trainer.evaluate

    def evaluate(model: Any, loader: Any, *args: Any, **kwargs: Any) -> Any:
        on_features.append(isinstance(loader.dataset, TensorDataset))
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    overrides = [*TINY, *HEAD_ALL_HEAD, "trainer.ema_decay=0.8"]
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.feature_cache"):
        cached = train(compose_train(overrides), tmp_path / "cached")  # auto: an EMA no longer turns the cache off
    assert "cached train features" in caplog.text
    # the first stage's EMA head on the features; the third stage's EMA lags the live backbone: on the images
    assert on_features == [True, False, False]
    plain = train(compose_train(overrides + ["trainer.cache_features=false"]), tmp_path / "plain")
    assert_same_metrics(tmp_path / "cached", tmp_path / "plain")
    assert cached["reported_val_acc"] == plain["reported_val_acc"] and cached["ema"] is True


# --------------------------------------------------------------------------- dataset.split_seed


def image_folder(root: Path, per_class: int = 10) -> Path:
    """Three classes in one folder (no train/ or val/): split by dataset.val_fraction."""
    for label, name in enumerate(["ants", "bees", "wasps"]):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            colour = [40 + 20 * index] * 3
            colour[label] = 250 - 10 * index
            Image.new("RGB", (36, 36), tuple(colour)).save(root / name / f"{index}.png")
    return root


def _val_indices(overrides: list[str]) -> list[int]:
    return load_splits(compose_train(overrides).dataset).val.indices


@pytest.mark.slow
def test_training_seeds_share_the_split_and_the_split_seed_moves_it(tmp_path: Path) -> None:
    folder = ["dataset=folder", f"dataset.root={image_folder(tmp_path / 'data')}", "dataset.val_fraction=0.3"]
    first = _val_indices(folder + ["trainer.seed=1"])
    assert _val_indices(folder + ["trainer.seed=2"]) == first
    assert _val_indices(folder + ["trainer.seed=2", "dataset.split_seed=7"]) != first
    subset = folder + ["dataset.train_subset=6"]
    pick = lambda seeds: load_splits(compose_train(subset + seeds).dataset).train.indices  # noqa: E731
    assert pick(["trainer.seed=1"]) == pick(["trainer.seed=2"]) != pick(["dataset.split_seed=7"])
    images = lambda seeds: load_splits(compose_train(TINY + seeds).dataset).val[0][0]  # noqa: E731
    assert torch.equal(images(["trainer.seed=1"]), images(["trainer.seed=2"]))
    assert not torch.equal(images(["trainer.seed=1"]), images(["dataset.split_seed=7"]))


def test_a_saved_config_without_a_split_seed_is_refused_and_one_naming_it_keeps_it(tmp_path: Path) -> None:
    """The schema's default in place of the seed a run split with would evaluate it on other images."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_train([*TINY, "strategy=feature_extract", "dataset.split_seed=5", "trainer.epochs=1"])
    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    del tree["dataset"]["split_seed"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree), encoding="utf-8")
    with pytest.raises(TransferError, match="names no dataset.split_seed"):
        load_run_config(run_dir)
    tree["dataset"]["split_seed"] = 9
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree), encoding="utf-8")
    assert load_run_config(run_dir).dataset.split_seed == 9


def test_summary_and_plan_record_both_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = train(compose_train([*TINY, "strategy=feature_extract", "trainer.epochs=1", "trainer.seed=3",
                                   "dataset.split_seed=8"]), tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (summary["seed"], summary["split_seed"]) == (3, 8)
    assert plan["seeds"] == {"split": 8, "training": 3}
    train(compose_train([*TINY, "strategy=feature_extract", "trainer.seed=3", "dry_run=true"]), tmp_path / "dry")
    assert "seeds     split 42 (dataset.split_seed), training 3 (trainer.seed)" in capsys.readouterr().out


# --------------------------------------------------------------------------- report: n counts seeds


def test_report_counts_distinct_seeds_and_shows_repeats_apart(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    write_run(root / "0", "feature_extract", 0, [0.5, 0.6], True)
    write_run(root / "1", "feature_extract", 0, [0.5, 0.7], True)  # the same config and seed again
    write_run(root / "2", "feature_extract", 1, [0.6, 0.6], True)
    write_run(root / "3", "fine_tune", 0, [0.8, 0.9], True)
    write_run(root / "4", "fine_tune", 1, [0.7, 0.9], True)
    assert main(["report", str(root)]) == 0
    captured = capsys.readouterr()
    rows = {row["run"]: row for row in parse_markdown(captured.out.strip())}
    assert set(rows) == {"0, 2", "1", "3, 4"}
    assert rows["0, 2"]["n"] == "2" and rows["0, 2"]["status"] == "finished"
    assert rows["0, 2"]["val acc (best.pt)"] == "0.6000 ± 0.0000"  # seeds that agree exactly say so
    assert rows["0, 2"]["final val acc"] == "0.6000 ± 0.0000"
    assert rows["1"]["n"] == "1" and rows["1"]["status"] == "repeat of 0" and rows["1"]["val acc (best.pt)"] == "0.7000"
    assert rows["3, 4"]["val acc (best.pt)"] == "0.9000 ± 0.0000" and rows["3, 4"]["final val acc"] == "0.9000 ± 0.0000"
    note = "1 run(s) repeat the config and trainer.seed of an earlier run"
    assert note in captured.err and note in (root / "results.md").read_text()
    with open(root / "results.csv", newline="", encoding="utf-8") as file:
        statuses = {row["runs"]: (row["n"], row["status"]) for row in csv.DictReader(file)}
    assert statuses == {"0, 2": ("2", "finished"), "1": ("1", "repeat of 0"), "3, 4": ("2", "finished")}


def test_runs_identical_in_everything_are_not_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b"):
        write_run(tmp_path / name, "fine_tune", 0, [0.5, 0.8], True)
    assert main(["report", str(tmp_path)]) == 0
    rows = parse_markdown(capsys.readouterr().out.strip())
    assert [(row["n"], row["status"]) for row in rows] == [("1", "finished"), ("1", "repeat of a")]


# --------------------------------------------------------------------------- lrs at an epoch's end


def _stage_lrs(steps: int, lr: float, scheduler: str) -> list[float]:
    """The lr of each step of a stage of `steps` steps, from a scheduler of our own."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = build_scheduler(optimizer, compose_train([f"scheduler={scheduler}"]).scheduler, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_metrics_log_the_lr_of_each_epochs_last_step_and_summary_the_peak(tmp_path: Path) -> None:
    overrides = [*TINY, "strategy=feature_extract", "trainer.epochs=3", "optimizer.lr_scale=1"]
    summary = train(compose_train(overrides), tmp_path)
    steps = 64 // 16
    expected = _stage_lrs(3 * steps, 1e-3, "onecycle")  # one stage of 3 epochs at the lesson's head lr
    records = read_metrics(tmp_path)
    assert [r["lr_start"]["head"] for r in records] == pytest.approx(expected[::steps], rel=1e-12)
    assert [r["lr"]["head"] for r in records] == pytest.approx(expected[steps - 1::steps], rel=1e-12)
    assert records[0]["lr_start"]["head"] == pytest.approx(1e-3 / 25), "OneCycle starts at max_lr/25"
    assert records[0]["lr"]["head"] > 10 * records[0]["lr_start"]["head"]
    assert all(r["lr"]["stem"] == 0.0 for r in records)
    (stage,) = summary["stages"]
    assert stage["peak_lrs"] == {"head": pytest.approx(max(expected), rel=1e-12)}
    assert stage["lrs"] == {"head": 1e-3} and max(expected) <= 1e-3
    assert stage["mean_lrs"] == {"head": pytest.approx(sum(expected) / len(expected), rel=1e-12)}


@pytest.mark.parametrize(("scheduler", "between"), [("onecycle", (0.3, 0.7)), ("cosine", (0.3, 0.7)),
                                                    ("constant", (1.0, 1.0))])
def test_the_plan_states_each_stages_mean_rate_and_the_run_ran_at_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], scheduler: str, between: tuple[float, float]) -> None:
    """A stated lr is a stage's peak: the plan says the schedule's mean beside it, and summary.json's mean_lrs
    (what the steps ran at) equal the plan's."""
    overrides = [*TINY, "strategy=gradual", "trainer.epochs=6", f"scheduler={scheduler}"]
    summary = train(compose_train(overrides), tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    for planned, ran in zip(plan["stages"], summary["stages"], strict=True):
        assert planned["schedule"] == scheduler and between[0] <= planned["mean_lr_factor"] <= between[1]
        assert ran["mean_lrs"] == {g["name"]: pytest.approx(g["mean_lr"], rel=1e-9) for g in planned["groups"]}
    train(compose_train([*overrides, "dry_run=true"]), tmp_path / "dry")
    assert f"(peak lr; {scheduler}: mean " in capsys.readouterr().out


@pytest.mark.slow
def test_a_resume_after_an_epochs_last_step_keeps_its_lr(tmp_path: Path) -> None:
    """Killed after a checkpoint at the epoch's last step, before its validation: the resumed run trains no step
    of that epoch, yet logs the lr its last step ran with (a checkpoint that did not note it is refused)."""
    overrides = [*TINY, "strategy=gradual", "trainer.epochs=3", "trainer.checkpoint_every_steps=4"]  # 4 steps an epoch
    train(compose_train(overrides), tmp_path / "plain")

    class KilledAfterEpoch2sLastStep(trainer.Callback):
        def on_step(self, epoch: int, step: int) -> None:
            if (epoch, step) == (2, 4):
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(compose_train(overrides), tmp_path / "killed", callbacks=[KilledAfterEpoch2sLastStep()])
    state = checkpoint.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 4)
    summary = train(compose_train(overrides), tmp_path / "killed", resume=state)
    assert run_metrics(tmp_path / "killed") == run_metrics(tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["stages"] == plain["stages"] and all(s["peak_lrs"] for s in plain["stages"])

    unnoted = {**state, "progress": {k: v for k, v in state["progress"].items() if k != "step_lrs"}}
    with pytest.raises(TransferError, match="progress record lacks step_lrs"):
        train(compose_train(overrides), tmp_path / "killed", resume=unnoted)
