"""The debug group (as lightning-hydra-template's): debug=fast runs a few batches per epoch, debug=overfit
drives the training loss to about 0 on a few batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import loop as engine
from transfer_cli.training.run import train

from conftest import FAST, compose_train


def test_debug_fast_runs_every_stage_on_a_few_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    seen = {"train": 0, "val": 0}
    real_add = engine.Tally.add

    def counting(self, loss, logits, labels) -> None:
        seen["train" if logits.requires_grad else "val"] += len(labels)
        real_add(self, loss, logits, labels)

    monkeypatch.setattr(engine.Tally, "add", counting)
    cfg = compose_train(FAST + ["debug=fast", "strategy=fine_tune", "trainer.epochs=2", "trainer.log_every=1",
                                "trainer.eval_batch_size=16"])
    assert (cfg.trainer.limit_train_batches, cfg.trainer.limit_val_batches) == (3, 2)
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.epoch_progress"):
        summary = train(cfg, tmp_path)
    # 96 training images at batch 16 would be 6 steps, 48 val images 3 batches: 3 and 2 per epoch instead
    assert seen == {"train": 2 * 3 * 16, "val": 2 * 2 * 16}
    # only the progress lines: other loggers' INFO records reach caplog too where an earlier test in this worker
    # set up logging (a Hydra run configures the root logger)
    steps = [record.getMessage().split(" loss")[0] for record in caplog.records
             if record.name == "transfer_cli.training.epoch_progress"]
    assert steps == [f"epoch {e}/2 [all] step {s}/3" for e in (1, 2) for s in (1, 2, 3)]
    assert summary["status"] == "finished" and len(read_metrics(tmp_path)) == 2
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and (tmp_path / "curves.png").is_file()


@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_to_about_zero(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=smoke", "debug=overfit", "strategy=fine_tune"])
    assert (cfg.dataset.train_subset, cfg.trainer.epochs, cfg.augment.name) == (32, 40, "none")
    train(cfg, tmp_path)
    first, last = read_metrics(tmp_path)[0], read_metrics(tmp_path)[-1]
    assert last["train/acc1"] == 1.0 and last["train/loss"] < 0.1, last
    assert last["train/loss"] < first["train/loss"] / 10
    assert json.loads((tmp_path / "summary.json").read_text())["epochs_run"] == 40
