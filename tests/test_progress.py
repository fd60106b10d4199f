"""Progress a person can read: log lines inside every epoch where no terminal shows a bar, and one line
saying why the feature cache is off for a head-only stage."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from transfer_cli.training.epoch_progress import EpochProgress
from transfer_cli.training.run import train

from conftest import FAST, REPO, compose_train


LINE = re.compile(r"^epoch (\d+)/(\d+) \[(\w+)\] step (\d+)/(\d+) loss \d+\.\d{3} acc \d\.\d{3} lr \d\.\de[-+]\d\d "
                  r"\d+ img/s eta \d+:\d\d:\d\d$")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tally(loss_sum: float, hits: float, count: int) -> SimpleNamespace:
    return SimpleNamespace(loss=torch.tensor(loss_sum), hits=torch.tensor([hits]), count=count)


def test_a_line_every_log_every_steps_and_every_30_seconds(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = EpochProgress("epoch 3/20 [last_block]", 120, 0, 32, lambda: {"stem": 0.0, "head": 1e-4}, 40,
                             bar=False, clock=clock)
    steps_logged = []
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.epoch_progress"):
        for step in range(1, 121):
            clock.now = step * 0.5 if step <= 60 else 30 + (step - 60) * 2.0  # slower after step 60
            before = len(caplog.records)
            progress.step(step, tally(0.412 * step * 32, 0.871 * step * 32, step * 32))
            if len(caplog.records) > before:
                steps_logged.append(step)
    # every 40 steps, and 30 s after the last line once steps take 2 s (70, 95, 110)
    assert steps_logged == [40, 70, 80, 95, 110, 120]
    first = caplog.records[0].getMessage()
    assert LINE.match(first), first
    assert first.startswith("epoch 3/20 [last_block] step 40/120 loss 0.412 acc 0.871 lr 1.0e-04 ")
    assert first.endswith("64 img/s eta 0:00:40")  # 40 steps of 32 images in 20 s; 80 steps to go at 0.5 s


def test_a_resumed_epoch_counts_from_where_it_resumed(caplog: pytest.LogCaptureFixture) -> None:
    progress = EpochProgress("epoch 2/4 [all]", 10, 6, 8, lambda: {"head": 1e-3}, 2, bar=False, clock=Clock())
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.epoch_progress"):
        for step in range(7, 11):
            progress.step(step, tally(1.0, 1.0, 2))
    assert [r.getMessage().split(" loss")[0] for r in caplog.records] == [
        "epoch 2/4 [all] step 8/10", "epoch 2/4 [all] step 10/10"]


@pytest.mark.slow
def test_a_run_with_stdout_in_a_file_logs_progress_inside_each_epoch(tmp_path: Path) -> None:
    out = tmp_path / "stdout.txt"
    run_dir = tmp_path / "run"
    with open(out, "w") as file:
        done = subprocess.run([sys.executable, "-m", "transfer_cli", "train", *FAST, "strategy=fine_tune",
                               "trainer.epochs=2", "trainer.log_every=3", f"hydra.run.dir={run_dir}"],
                              cwd=REPO, stdout=file, stderr=subprocess.STDOUT, text=True, timeout=300)
    text = out.read_text()
    assert done.returncode == 0, text[-2000:]
    for where in (text, (run_dir / "train.log").read_text()):
        lines = [line.split(" - ", 1)[-1] for line in where.splitlines()]
        progress = [m for m in map(LINE.match, lines) if m]
        assert {(m.group(1), m.group(2), m.group(3)) for m in progress} == {("1", "2", "all"), ("2", "2", "all")}
        for epoch in ("1", "2"):
            inside = [i for i, m in enumerate(map(LINE.match, lines)) if m and m.group(1) == epoch]
            summary = next(i for i, line in enumerate(lines) if line.startswith(f"epoch {epoch} [all] train loss"))
            assert inside and max(inside) < summary, "progress comes during the epoch, before its summary line"
            [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                        if json.loads(line)["epoch"] == int(epoch)]
            ran = max(record["lr"].values())
            assert re.search(r" lr (\S+) ", lines[max(inside)]).group(1) == f"{ran:.1e}", "the lr its last step ran at"


@pytest.mark.slow
def test_the_feature_cache_says_why_it_is_off_for_a_head_only_stage(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.assemble"):
        train(compose_train(FAST + ["strategy=feature_extract", "augment=basic", "trainer.epochs=1"]), tmp_path / "a")
    off = [r.getMessage() for r in caplog.records if r.getMessage().startswith("feature cache off")]
    assert len(off) == 1 and "augment=basic is random" in off[0] and "augment=none" in off[0], off
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.assemble"):
        train(compose_train(FAST + ["strategy=feature_extract", "trainer.epochs=1"]), tmp_path / "b")
        train(compose_train(FAST + ["strategy=fine_tune", "augment=basic", "trainer.epochs=1"]), tmp_path / "c")
    assert not [r for r in caplog.records if r.getMessage().startswith("feature cache off")], \
        "nothing to say when the cache is on, or when no stage trains the head alone"


def test_on_a_terminal_the_bar_shows_epoch_stage_loss_and_accuracy(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = EpochProgress("epoch 1/3 [head]", 4, 0, 8, lambda: {"head": 1e-3}, 1, bar=True, clock=clock)
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.epoch_progress"):
        for step, _ in enumerate(progress.wrap(range(4)), start=1):
            clock.now += 1.5
            progress.step(step, tally(0.5 * step, 0.25 * step, step))
    assert progress.bar.desc.startswith("epoch 1/3 [head]")
    assert progress.bar.postfix == "loss 0.500 acc 0.250"
    assert not caplog.records, "a bar, not log lines"
