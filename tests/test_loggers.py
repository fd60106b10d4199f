"""Metric sinks: metrics.jsonl and summary.json always; TensorBoard and MLflow when installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from transfer_cli.config.schema import LoggerConfig, MLflowLoggerConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.runs import loggers
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.train import train

from conftest import FAST, compose_train


QUICK = FAST + ["strategy=feature_extract", "trainer.epochs=2"]


def needs(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: pip install -e \".[{extra}]\" to test logger={extra}")


def test_records_flatten_to_numbers() -> None:
    record = {"epoch": 3, "stage": "head", "lr": {"head": 0.1, "stem": 0.0}, "val/acc1": 0.5, "bad": float("nan"),
              "flag": True, "none": None}
    assert loggers.scalars(record) == {"lr/head": 0.1, "lr/stem": 0.0, "val/acc1": 0.5}
    assert loggers.flatten({"trainer": {"seed": 1}}, sep=".") == {"trainer.seed": 1}


def test_no_logger_by_default_and_files_regardless(tmp_path: Path) -> None:
    cfg = compose_train(QUICK)
    assert cfg.logger == LoggerConfig()
    assert loggers.build(cfg.logger, tmp_path).loggers == []


def test_a_missing_package_stops_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TransferError, match=r'logger=mlflow needs the mlflow package: pip install -e "\.\[mlflow\]"'):
        train(compose_train(QUICK + ["logger=mlflow"]), tmp_path)
    assert not (tmp_path / "plan.json").exists()


def test_tensorboard_gets_every_epoch(tmp_path: Path) -> None:
    needs("tensorboard", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose_train(QUICK + ["logger=tensorboard"]), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = read_metrics(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("val/acc1")] == [
        (r["epoch"], pytest.approx(r["val/acc1"])) for r in metrics]
    assert {"train/loss", "val/loss", "lr/head", "summary/best_val_acc"} <= set(events.Tags()["scalars"])
    assert (tmp_path / "summary.json").is_file() and len(metrics) == 2


def test_mlflow_gets_params_metrics_and_status(tmp_path: Path) -> None:
    needs("mlflow", "mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    train(compose_train(QUICK + ["logger=mlflow", f"logger.mlflow.tracking_uri={store}"]), run_dir)
    client = MlflowClient(tracking_uri=store)
    run_id = (run_dir / loggers.MLFLOW_RUN_ID_FILE).read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.seed"] == "42" and run.data.params["strategy.name"] == "feature_extract"
    history = client.get_metric_history(run_id, "val/acc1")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["val/acc1"]))
                                                    for r in read_metrics(run_dir)]

    # a resumed run directory continues its MLflow run
    again = loggers.MLflowLogger(MLflowLoggerConfig(tracking_uri=store), run_dir)
    assert again.run_id == run_id
    again.close()


def test_mlflow_default_store_is_under_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs("mlflow", "mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = loggers.MLflowLogger(MLflowLoggerConfig(), tmp_path)
    logger.close()
    assert logger.tracking_uri == (tmp_path / "outputs" / "mlruns").as_uri()
    assert (tmp_path / "outputs" / "mlruns").is_dir()
