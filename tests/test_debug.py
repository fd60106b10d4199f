"""The debug group (as lightning-hydra-template's): debug=fast runs one epoch a stage of a few batches, debug=overfit
drives the training loss to about 0 on a few batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from transfer_cli.config.stage_epochs import scale_epochs
from transfer_cli.core.errors import TransferError
from transfer_cli.runs.rundir import format_result
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import loop as engine
from transfer_cli.training.run import train

from conftest import FAST, compose_train


@pytest.mark.parametrize(("strategy", "stages"),
                         [(None, ["head", "last_block", "all"]), ("lp_ft", ["probe", "fine_tune"])])
def test_debug_fast_runs_one_epoch_a_stage_on_a_few_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture, strategy: str | None,
                                                            stages: list[str]) -> None:
    seen = {"train": 0, "val": 0}
    real_add = engine.Tally.add

    def counting(self, loss, logits, labels) -> None:
        seen["train" if logits.requires_grad else "val"] += len(labels)
        real_add(self, loss, logits, labels)

    monkeypatch.setattr(engine.Tally, "add", counting)
    # the smoke experiment's trainer.epochs (4) gives way to one epoch a stage, whatever the stage count
    chosen = [f"strategy={strategy}"] if strategy else []
    overrides = [o for o in FAST if not o.startswith("trainer.epochs=")]
    cfg = compose_train(overrides + ["debug=fast", *chosen, "trainer.log_every=1", "trainer.eval_batch_size=16"])
    assert (cfg.trainer.limit_train_batches, cfg.trainer.limit_val_batches) == (3, 2)
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.epoch_progress"):
        summary = train(cfg, tmp_path)
    epochs = len(stages)
    # 96 training images at batch 16 would be 6 steps, 48 val images 3 batches: 3 and 2 per epoch instead (and
    # the selection split held out where the strategy has one: under 16 images, one batch)
    assert summary["select_images"] < 16
    assert seen == {"train": epochs * 3 * 16, "val": epochs * (2 * 16 + summary["select_images"])}
    # only the progress lines: other loggers' INFO records reach caplog too where an earlier test in this worker
    # set up logging (a Hydra run configures the root logger)
    steps = [record.getMessage().split(" loss")[0] for record in caplog.records
             if record.name == "transfer_cli.training.epoch_progress"]
    assert steps == [f"epoch {e}/{epochs} [{name}] step {s}/3" for e, name in enumerate(stages, 1) for s in (1, 2, 3)]
    records = read_metrics(tmp_path)
    assert [record["epoch"] for record in records] == list(range(1, epochs + 1))
    assert [stage["epochs"] for stage in summary["stages"]] == [1] * epochs
    assert summary["status"] == "finished" and summary["limited_val_batches"] == 2
    assert format_result(summary).endswith("(val: 2 batches only, trainer.limit_val_batches)")
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and (tmp_path / "curves.png").is_file()


def test_all_of_val_is_not_reported_as_limited(tmp_path: Path) -> None:
    # a limit above val's 3 batches cuts nothing: the figures are not flagged
    summary = train(compose_train(FAST + ["strategy=fine_tune", "trainer.epochs=1", "trainer.eval_batch_size=16",
                                          "trainer.limit_val_batches=3"]), tmp_path)
    assert summary["limited_val_batches"] is None and "batches only" not in format_result(summary)


def test_debug_fast_with_a_disagreeing_total_is_one_line() -> None:
    cfg = compose_train(FAST + ["debug=fast", "trainer.epochs=5"])
    with pytest.raises(TransferError, match=r"^trainer.epochs=5 and trainer.epochs_per_stage=1 disagree"):
        scale_epochs([stage.epochs for stage in cfg.strategy.stages], cfg.trainer.epochs,
                     cfg.trainer.epochs_per_stage)


@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_to_about_zero(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=smoke", "debug=overfit", "strategy=fine_tune"])
    assert (cfg.dataset.train_subset, cfg.trainer.epochs, cfg.augment.name) == (32, 40, "none")
    train(cfg, tmp_path)
    first, last = read_metrics(tmp_path)[0], read_metrics(tmp_path)[-1]
    assert last["train/acc1"] == 1.0 and last["train/loss"] < 0.1, last
    assert last["train/loss"] < first["train/loss"] / 10
    assert json.loads((tmp_path / "summary.json").read_text())["epochs_run"] == 40
