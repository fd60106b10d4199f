"""Metric sinks: metrics.jsonl and summary.json always; TensorBoard, MLflow and W&B when installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from transfer_cli.config.schema import LoggerConfig, MLflowLoggerConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.runs import loggers
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import write_split_folders


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

    train(compose_train(QUICK + ["logger=tensorboard", "trainer.log_every=3"]), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = read_metrics(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("val/acc1")] == [
        (r["epoch"], pytest.approx(r["val/acc1"])) for r in metrics]
    # step values on their own tags, at the run's optimizer steps (6 an epoch): an epoch's last is its train loss
    steps = [(e.step, e.value) for e in events.Scalars("train_step/loss")]
    assert [step for step, _ in steps] == [3, 6, 9, 12]
    assert [value for step, value in steps if step % 6 == 0] == [pytest.approx(r["train/loss"]) for r in metrics]
    assert {"train/loss", "val/loss", "lr/head", "summary/reported_val_acc"} <= set(events.Tags()["scalars"])
    assert (tmp_path / "summary.json").is_file() and len(metrics) == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_mlflow_default_store_is_a_database_mlflows_own_client_opens(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The default store (sqlite under outputs/) needs no MLFLOW_ALLOW_FILE_STORE: a fresh process with a clean
    environment lists the run."""
    needs("mlflow", "mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = loggers.MLflowLogger(MLflowLoggerConfig(), tmp_path)
    logger.close()
    database = tmp_path / "outputs" / "mlflow.db"
    assert logger.tracking_uri == f"sqlite:///{database}" and database.is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    code = ("import mlflow; c = mlflow.MlflowClient(tracking_uri='sqlite:///outputs/mlflow.db'); "
            "e = c.get_experiment_by_name('transfer'); "
            "print([r.info.run_id for r in c.search_runs([e.experiment_id])])")
    listed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr[-1500:]
    assert logger.run_id in listed.stdout


class FakeWandb(types.ModuleType):
    """What the logger asks of `wandb`, recorded: init's arguments, config, logged rows, the finish."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.runs: list[SimpleNamespace] = []
        self.Settings = lambda **kwargs: kwargs
        self.Image = lambda path: ("image", Path(path).name)
        self.plot = SimpleNamespace(confusion_matrix=lambda **kwargs: ("confusion_matrix", kwargs))

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = SimpleNamespace(config={}, rows=[], exit_code=None)
        values: dict = {}
        run.config = SimpleNamespace(values=values, update=lambda new, allow_val_change: values.update(new))
        run.log = lambda row, step=None: run.rows.append((step, row))
        run.finish = lambda exit_code=0: setattr(run, "exit_code", exit_code)
        run.axes = {}
        run.define_metric = lambda name, step_metric=None: run.axes.__setitem__(name, step_metric)
        self.runs.append(run)
        return run


@pytest.mark.slow
def test_wandb_gets_config_every_epoch_the_summary_and_curves(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(loggers, "check_available", lambda cfg: None)
    run_dir = tmp_path / "run"
    train(compose_train(QUICK + ["logger=wandb", "logger.wandb.project=lesson", "logger.wandb.mode=offline",
                                 "trainer.log_every=2"]), run_dir)
    (init,), (run,) = fake.inits, fake.runs
    assert (init["project"], init["name"], init["mode"], init["dir"]) == ("lesson", "run", "offline", str(run_dir))
    assert init["id"] == (run_dir / loggers.WANDB_RUN_ID_FILE).read_text().strip() and init["resume"] == "allow"
    assert run.config.values["strategy"]["name"] == "feature_extract"
    # W&B's one step counter only grows: each row carries its x-axis (epoch, or the step values' own)
    assert all(step is None for step, _ in run.rows)
    epochs = [row for _, row in run.rows if "val/acc1" in row]
    assert [(row["epoch"], row["val/acc1"]) for row in epochs] == [
        (r["epoch"], pytest.approx(r["val/acc1"])) for r in read_metrics(run_dir)]
    assert run.axes["epoch"] is None and run.axes["val/acc1"] == run.axes["lr/head"] == "epoch"
    assert run.axes["train_step/*"] == "train_step/step"
    steps = [row for _, row in run.rows if "train_step/step" in row]
    assert steps and all("train_step/loss" in row and not row.keys() & run.axes.keys() - {"train_step/step"}
                         for row in steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (None, {**{f"summary/{key}": summary[key] for key in ("reported_val_acc", "selected_acc", "final_val_acc")},
                   "epoch": 2}) in run.rows
    assert run.rows[-1] == (None, {"curves": ("image", "curves.png")}) and run.exit_code == 0
    # the val split's confusion matrix after the last epoch, as W&B's confusion-matrix chart
    (chart,) = [row["confusion/val_last_epoch"] for step, row in run.rows if "confusion/val_last_epoch" in row]
    kind, drawn = chart
    assert kind == "confusion_matrix" and drawn["class_names"] == summary["classes"]
    matrix = as_matrix(drawn["y_true"], drawn["preds"], len(summary["classes"]))
    assert sum(map(sum, matrix)) == summary["val_images"]
    assert sum(matrix[i][i] for i in range(len(matrix))) / summary["val_images"] == pytest.approx(
        summary["final_val_acc"])

    # a resumed run directory continues its W&B run
    loggers.WandbLogger(compose_train(QUICK + ["logger=wandb"]).logger.wandb, run_dir).close()
    assert fake.inits[1]["id"] == init["id"]


@pytest.fixture
def offline_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All three trackers installed (else skip), run from tmp_path (MLflow's default outputs/mlflow.db there),
    W&B offline and quiet."""
    for module, extra in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")):
        needs(module, extra)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.slow
def test_three_trackers_at_once_offline(tmp_path: Path, offline_trackers: None) -> None:
    """`WANDB_MODE=offline logger=[tensorboard,mlflow,wandb]`: TensorBoard events, an MLflow run in the default
    database, and a W&B offline run in the run directory."""
    run_dir = tmp_path / "run"
    train(compose_train(QUICK + ["logger=[tensorboard,mlflow,wandb]"]), run_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    mlflow_run = client.get_run((run_dir / loggers.MLFLOW_RUN_ID_FILE).read_text().strip())
    assert mlflow_run.info.status == "FINISHED" and "val/acc1" in mlflow_run.data.metrics
    wandb_id = (run_dir / loggers.WANDB_RUN_ID_FILE).read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def as_matrix(true: list[int], predicted: list[int], classes: int) -> list[list[int]]:
    matrix = [[0] * classes for _ in range(classes)]
    for t, p in zip(true, predicted):
        matrix[t][p] += 1
    return matrix


@pytest.mark.slow
def test_every_tracker_gets_the_confusion_matrices(tmp_path: Path, offline_trackers: None) -> None:
    """The val split's matrix after the last epoch equals `transfer eval checkpoint=last` on it; an eval_splits
    split's equals eval/<split>/confusion_matrix.json (best.pt). W&B's offline run holds both as tables, MLflow
    both as JSON artifacts with their figures, TensorBoard both figures."""
    import transfer_cli
    from transfer_cli.inference.evaluate import evaluate_run

    data, run_dir = tmp_path / "data", tmp_path / "run"
    write_split_folders(data)
    transfer_cli.train(FAST + ["dataset=folder", f"dataset.root={data}", "strategy=fine_tune", "trainer.epochs=2",
                               "eval_splits=[test]", "logger=[tensorboard,mlflow,wandb]"], run_dir=run_dir)
    classes = ["class_0", "class_1"]
    last = evaluate_run(run_dir, ["checkpoint=last"])[1] / "confusion_matrix.json"
    expected = {"val_last_epoch": json.loads(last.read_text())["matrix"],
                "test": json.loads((run_dir / "eval" / "test" / "best" / "confusion_matrix.json").read_text())[
                    "matrix"]}
    assert sum(map(sum, expected["val_last_epoch"])) == sum(map(sum, expected["test"])) == 16

    wandb_id = (run_dir / loggers.WANDB_RUN_ID_FILE).read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{wandb_id}")
    for split, matrix in expected.items():
        (table,) = (offline / "files" / "media" / "table" / "confusion").glob(f"{split}_table_*.table.json")
        rows = json.loads(table.read_text())
        assert rows["columns"] == ["Actual", "Predicted", "nPredictions"]
        assert {(a, p): n for a, p, n in rows["data"]} == {
            (classes[i], classes[j]): matrix[i][j] for i in range(2) for j in range(2)}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    run_id = (run_dir / loggers.MLFLOW_RUN_ID_FILE).read_text().strip()
    for split, matrix in expected.items():
        stored = json.loads(Path(client.download_artifacts(run_id, f"confusion/{split}/confusion_matrix.json",
                                                           str(tmp_path))).read_text())
        assert stored["matrix"] == matrix and stored["classes"] == classes
        assert [f.path for f in client.list_artifacts(run_id, f"confusion/{split}")] == [
            f"confusion/{split}/confusion_matrix.json", f"confusion/{split}/confusion_matrix.png"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"confusion/val_last_epoch", "confusion/test"} <= set(events.Tags()["images"])
