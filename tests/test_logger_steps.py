"""Trackers get step-level values every trainer.log_every optimizer steps: the epoch's running train loss and
accuracy (the progress line's numbers) and each group's lr, at the run's optimizer step; MLflow names a run after
its directory."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from transfer_cli.config.schema import MLflowLoggerConfig
from transfer_cli.runs import checkpoint, loggers
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.fit import Callback
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import Crash, crash_after


class FakeLogger:
    """A Logger that keeps what it is given."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.epochs: list[tuple[int, dict[str, Any]]] = []

    def log_params(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        self.epochs.append((step, record))

    def log_step(self, values: dict[str, Any], step: int) -> None:
        self.steps.append((step, loggers.scalars(values)))

    def log_image(self, name: str, path: Path) -> None:
        pass

    def log_confusion(self, confusion: loggers.Confusion) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class StepCounter(Callback):
    """Where each optimizer step of the run falls: (epoch, batches done in it)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def on_step(self, epoch: int, step: int) -> None:
        self.steps.append((epoch, step))


PROGRESS = re.compile(r"epoch (\d+)/\d+ \[\w+\] step (\d+)/(\d+) loss (\S+) acc (\S+) lr (\S+) ")


def test_a_logger_gets_the_loops_running_loss_and_lr_every_log_every_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Three epochs of 4 steps, log_every=2: the values at the run's steps 2, 4, ..., 12; at an epoch's last
    step the running mean is the epoch's train loss and accuracy in metrics.jsonl, and the lr its `lr`; at every
    logged step (mid-epoch too) the numbers are those the progress line printed."""
    fake, counter = FakeLogger(), StepCounter()
    monkeypatch.setattr(loggers, "build", lambda cfg, run_dir: loggers.Loggers([fake]))
    cfg = compose_train(FAST + ["strategy=feature_extract", "dataset.train_size=32", "dataset.val_size=8",
                                "trainer.batch_size=8", "trainer.log_every=2"])
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.epoch_progress"):
        train(cfg, tmp_path / "run", callbacks=[counter])
    records = read_metrics(tmp_path / "run")
    assert [r["stage"] for r in records] == ["head"] * 3

    assert len(counter.steps) == 12
    assert [step for step, _ in fake.steps] == [2, 4, 6, 8, 10, 12]
    assert all(set(values) >= {"train_step/loss", "train_step/acc1", "train_step/lr/head"} for _, values in fake.steps)
    by_step = dict(fake.steps)
    for number, record in enumerate(records, start=1):
        last = by_step[4 * number]  # the epoch's last step: its running mean is the epoch's figure
        assert last["train_step/loss"] == pytest.approx(record["train/loss"], rel=1e-12)
        assert last["train_step/acc1"] == pytest.approx(record["train/acc1"], rel=1e-12)
        assert {key.rsplit("/", 1)[1]: lr for key, lr in last.items() if key.startswith("train_step/lr/")} == {
            group: lr for group, lr in record["lr"].items() if lr}
    # every logged step: the progress line's numbers, at the run's step
    lines = [PROGRESS.search(r.getMessage()) for r in caplog.records]
    printed = {(int(m[1]) - 1) * int(m[3]) + int(m[2]): m for m in lines if m}
    for step, values in fake.steps:
        line = printed[step]
        assert (f"{values['train_step/loss']:.3f}", f"{values['train_step/acc1']:.3f}") == (line[4], line[5])
        assert f"{max(v for k, v in values.items() if k.startswith('train_step/lr/')):.1e}" == line[6]
    # the epochs' records still reach the logger as they are, at their epochs
    assert [(step, record["val/acc1"]) for step, record in fake.epochs if "val/acc1" in record] == [
        (r["epoch"], r["val/acc1"]) for r in records]


@pytest.mark.slow
def test_a_resumed_run_logs_the_steps_and_values_of_an_uninterrupted_one(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after step 3 of epoch 2 (the run's step 7) and resumed from that step's checkpoint: the steps go on
    counting from 7 and the running mean from the epoch's first batch, as if nothing had happened."""
    overrides = FAST + ["strategy=feature_extract", "dataset.train_size=32", "dataset.val_size=8",
                        "trainer.batch_size=8", "trainer.log_every=2", "trainer.checkpoint_every_steps=1"]
    whole, parts = FakeLogger(), FakeLogger()
    with monkeypatch.context() as patch:
        patch.setattr(loggers, "build", lambda cfg, run_dir: loggers.Loggers([whole]))
        train(compose_train(overrides), tmp_path / "whole")
    monkeypatch.setattr(loggers, "build", lambda cfg, run_dir: loggers.Loggers([parts]))
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        crash_after(patch, epoch=2, step=3)
        with pytest.raises(Crash):
            train(compose_train(overrides), crashed)
    assert [step for step, _ in parts.steps] == [2, 4, 6]
    train(compose_train(overrides), crashed, resume=checkpoint.load(crashed / "checkpoints" / "last.pt"))
    assert [step for step, _ in parts.steps] == [step for step, _ in whole.steps] == [2, 4, 6, 8, 10, 12]
    assert [values for _, values in parts.steps] == [pytest.approx(values) for _, values in whole.steps]


def test_no_logger_gets_no_step_values_and_an_empty_fan_out_is_false() -> None:
    assert not loggers.Loggers([]) and loggers.Loggers([FakeLogger()])


def test_the_step_values_keep_their_own_keys() -> None:
    """A step's values never share a key with an epoch's, so a tracker never puts them on one series."""
    epoch = loggers.scalars({"epoch": 1, "train/loss": 0.5, "lr": {"head": 0.1}})
    step = loggers.scalars({"train_step/loss": 0.5, "train_step/acc1": 0.2, "train_step/lr": {"head": 0.1}})
    assert set(step) == {"train_step/loss", "train_step/acc1", "train_step/lr/head"}
    assert not set(epoch) & set(step)


class FakeMlflowClient:
    """What MLflowLogger asks of mlflow's client, recorded."""

    created: list[dict[str, Any]] = []

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def get_experiment_by_name(self, name: str) -> None:
        return None

    def create_experiment(self, name: str) -> str:
        return "1"

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> Any:
        FakeMlflowClient.created.append({"run_name": run_name, "tags": tags})
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="abc123"))


def test_mlflow_names_a_run_after_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extra: mlflow's client stood in for; the run name is the directory's name, its path a tag."""
    tracking = types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = FakeMlflowClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))
    monkeypatch.setitem(sys.modules, "mlflow.tracking", tracking)
    FakeMlflowClient.created.clear()
    run_dir = tmp_path / "outputs" / "multirun" / "2026-01-02_03-04-05" / "7"
    run_dir.mkdir(parents=True)
    loggers.MLflowLogger(MLflowLoggerConfig(tracking_uri="sqlite:///x.db"), run_dir)
    loggers.MLflowLogger(MLflowLoggerConfig(tracking_uri="sqlite:///x.db", run_name="mine"), tmp_path / "outputs")
    assert [c["run_name"] for c in FakeMlflowClient.created] == ["7", "mine"]
    assert FakeMlflowClient.created[0]["tags"] == {"run_dir": str(run_dir.resolve())}


def test_mlflow_run_name_and_step_history_in_a_real_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the extra: the run's name in mlflow's own store, and a step value's history at its steps."""
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip('mlflow is not installed: pip install -e ".[mlflow]" to test logger=mlflow')
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "2026-01-02_03-04-05"
    run_dir.mkdir()
    logger = loggers.MLflowLogger(MLflowLoggerConfig(tracking_uri=store), run_dir)
    logger.log_step({"train_step/loss": 0.75, "train_step/lr": {"head": 0.01}}, 50)
    logger.log_step({"train_step/loss": 0.5, "train_step/lr": {"head": 0.02}}, 100)
    logger.close()
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(logger.run_id).info.run_name == "2026-01-02_03-04-05"
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "train_step/loss")] == [
        (50, 0.75), (100, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "train_step/lr/head")] == [
        (50, 0.01), (100, 0.02)]

