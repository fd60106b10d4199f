"""A resumed run's wall_time_s counts the processes before the interruption, up to their last checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from transfer_cli.runs import checkpoint
from transfer_cli.training.fit import Callback
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import Crash, crash_after


class SlowFirstEpoch(Callback):
    """Spends `seconds` at the end of epoch 1, so the first process's time is large and known."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_epoch_end(self, record: dict) -> None:
        if record["epoch"] == 1:
            time.sleep(self.seconds)


def test_a_resumed_run_counts_the_time_before_its_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = FAST + ["trainer.checkpoint_every_steps=1"]
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    with monkeypatch.context() as patch:
        crash_after(patch, epoch=2, step=2)
        with pytest.raises(Crash):
            train(compose_train(overrides), run_dir, callbacks=[SlowFirstEpoch(5.0)])
    first_process = time.perf_counter() - started
    before = checkpoint.load(run_dir / "checkpoints" / "last.pt")["progress"]["elapsed_s"]
    assert 5.0 < before <= first_process, "the checkpoint holds the first process's seconds up to it"

    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    resumed_at = time.perf_counter()
    summary = train(compose_train(overrides), run_dir, resume=state)
    second_process = time.perf_counter() - resumed_at
    # the resumed process's own seconds (it ends after wall_time_s is taken: <=), on top of the first's
    assert before < summary["wall_time_s"] <= before + second_process, "the sleep before the interruption is counted"
    assert json.loads((run_dir / "summary.json").read_text())["wall_time_s"] == summary["wall_time_s"]
