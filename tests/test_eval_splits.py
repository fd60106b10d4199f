"""eval_splits=[...]: when training ends, best.pt is scored on each listed split exactly as `transfer eval` scores
it, into eval/<split>/ and summary.json; a split that does not exist fails before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transfer_cli.cli import main
from transfer_cli.core.errors import TransferError
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import write_split_folders


@pytest.mark.slow
def test_held_out_splits_are_scored_like_transfer_eval(tmp_path: Path, hydra_in_process: None) -> None:
    data, run_dir = tmp_path / "data", tmp_path / "run"
    write_split_folders(data)
    assert main(["train", *FAST, "dataset=folder", f"dataset.root={data}", "strategy=fine_tune", "trainer.epochs=2",
                 "eval_splits=[test,val]", f"hydra.run.dir={run_dir}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval"]) == {"test", "val"}
    for split in ("test", "val"):
        written = json.loads((run_dir / "eval" / split / "best" / "metrics.json").read_text())
        assert summary["eval"][split]["acc1"] == written["acc1"] and written["images"] == 16
    assert summary["eval"]["val"]["acc1"] == pytest.approx(summary["reported_val_acc"])  # best.pt on val: its epoch
    (run_dir / "eval" / "test").rename(tmp_path / "written_by_train")
    assert main(["eval", str(run_dir), "dataset.val_split=test", "trainer.device=cpu"]) == 0
    again = json.loads((run_dir / "eval" / "test" / "best" / "metrics.json").read_text())
    assert again["acc1"] == summary["eval"]["test"]["acc1"] and again["loss"] == summary["eval"]["test"]["loss"]


def test_a_split_that_does_not_exist_fails_before_training(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_split_folders(data)
    cfg = compose_train(FAST + ["dataset=folder", f"dataset.root={data}", "eval_splits=[holdout]"])
    with pytest.raises(TransferError, match="holdout"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(TransferError, match="single held-out split"):
        train(compose_train(FAST + ["eval_splits=[test]"]), tmp_path / "synthetic")
