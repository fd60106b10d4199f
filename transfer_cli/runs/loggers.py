"""Metric sinks besides metrics.jsonl and summary.json: TensorBoard, MLflow and W&B (optional extras).

A logger has six methods: `log_params(config)` once at the start (the resolved config as
nested dicts), `log_metrics(record, step)` after every epoch (the metrics.jsonl record;
numbers only, nested keys joined with '/', e.g. `lr/head`), `log_step(values, step)` every
`trainer.log_every` optimizer steps (`train_step/loss`, `train_step/acc1`: the epoch's running
mean so far, what the progress line shows; `train_step/lr/<group>`: the lr the step ran with;
`step`: the run's optimizer steps so far), `log_image(name, path)` for the run's figures
(curves.png), `log_confusion(confusion)` when training ends (the val split's confusion matrix
after the last epoch, each `eval_splits` split's of best.pt) and `close(status)` at the end.
Only rank 0 of a DDP run logs.
`logger=tensorboard`, `logger=mlflow`, `logger=wandb` or a list (`logger=[tensorboard,mlflow,wandb]`)
choose them; the packages come with `pip install -e ".[tensorboard]"`, `".[mlflow]"`, `".[wandb]"`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transfer_cli.config.schema import LoggerConfig, MLflowLoggerConfig, TensorBoardLoggerConfig, WandbLoggerConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.core.extras import install_hint, installed


log = logging.getLogger(__name__)

MLFLOW_DEFAULT_STORE = Path("outputs") / "mlflow.db"  # sqlite: mlflow's client and UI open it as it is
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
WANDB_RUN_ID_FILE = "wandb_run_id"


@dataclass(frozen=True)
class Confusion:
    """One split's confusion matrix: rows are true classes, columns predicted ones (counts of images)."""

    name: str  # the split: val, test, ...
    classes: list[str]
    matrix: list[list[int]]
    title: str  # which network, which split, its top-1
    figure: Path | None = None  # the matrix drawn (confusion_matrix.png), for trackers that show images


class Logger(Protocol):
    def log_params(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, record: dict[str, Any], step: int) -> None: ...

    def log_step(self, values: dict[str, Any], step: int) -> None: ...

    def log_image(self, name: str, path: Path) -> None: ...

    def log_confusion(self, confusion: Confusion) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def flatten(tree: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Leaves of nested dicts under joined keys: {'lr': {'head': 0.1}} -> {'lr/head': 0.1}; an empty dict
    is a leaf (a config node that holds nothing still differs from one that holds something)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a (nested) record; strings, lists, None and the epoch (the step) are left out."""
    return {key: float(value) for key, value in flatten(record).items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class Loggers:
    """Fans each call out to every configured logger."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def __bool__(self) -> bool:
        """Whether any logger listens: without one, nothing is read from the device for it."""
        return bool(self.loggers)

    def log_params(self, config: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_params(config)

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(record, step)

    def log_step(self, values: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log_step(values, step)

    def log_image(self, name: str, path: Path) -> None:
        for logger in self.loggers:
            logger.log_image(name, path)

    def log_confusion(self, confusion: Confusion) -> None:
        for logger in self.loggers:
            logger.log_confusion(confusion)

    def close(self, status: str = "FINISHED") -> None:
        for logger in self.loggers:
            try:
                logger.close(status)
            except Exception as error:  # noqa: BLE001 - closing a sink must not hide the run's own outcome
                log.warning("closing %s failed: %s", type(logger).__name__, error)


PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def chosen(cfg: LoggerConfig) -> bool:
    """Whether any logger is configured (the same answer on every rank, unlike the rank-0 `build`)."""
    return any(getattr(cfg, name) is not None for name in PACKAGES)


def check_available(cfg: LoggerConfig) -> None:
    """A one-line error before any training when a chosen logger's package is missing."""
    for name, (module, extra) in PACKAGES.items():
        if getattr(cfg, name) is not None and not installed(module):
            raise TransferError(f"logger={name} needs the {module} package: {install_hint(extra)}")


def build(cfg: LoggerConfig, run_dir: Path) -> Loggers:
    check_available(cfg)
    chosen: list[Logger] = []
    if cfg.tensorboard is not None:
        chosen.append(TensorBoardLogger(cfg.tensorboard, run_dir))
    if cfg.mlflow is not None:
        chosen.append(MLflowLogger(cfg.mlflow, run_dir))
    if cfg.wandb is not None:
        chosen.append(WandbLogger(cfg.wandb, run_dir))
    return Loggers(chosen)


class TensorBoardLogger:
    """Scalars per epoch (`train/loss`, `val/acc1`, `lr/head`, ...) and per `log_every` steps (`train_step/...`,
    their own tags, so each keeps its own x-axis), and the config as text."""

    def __init__(self, cfg: TensorBoardLoggerConfig, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(cfg.log_dir).expanduser() if cfg.log_dir else run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    log_step = log_metrics  # distinct tags: a step's value never lands on an epoch's series

    def log_image(self, name: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")

    def log_confusion(self, confusion: Confusion) -> None:
        if confusion.figure is not None:
            self.log_image(f"confusion/{confusion.name}", confusion.figure)

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class MLflowLogger:
    """One MLflow run per run directory, named after it; a resumed run continues the same MLflow run.

    Uses MlflowClient (no global active run), so sweeps in one process never mix runs.
    """

    def __init__(self, cfg: MLflowLoggerConfig, run_dir: Path) -> None:
        from mlflow.tracking import MlflowClient

        default = f"sqlite:///{MLFLOW_DEFAULT_STORE.resolve()}"
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
        if uri == default:
            MLFLOW_DEFAULT_STORE.parent.mkdir(parents=True, exist_ok=True)
        if "://" not in uri or uri.startswith("file:"):
            # a file store the user chose: MLflow 3 keeps it in maintenance mode behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.tracking_uri = uri
        id_file = run_dir / MLFLOW_RUN_ID_FILE
        self.run_id = self._existing_run(id_file.read_text().strip()) if id_file.is_file() else None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
            run = self.client.create_run(experiment_id, run_name=cfg.run_name or run_dir.resolve().name,
                                         tags={"run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n", encoding="utf-8")
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _existing_run(self, run_id: str) -> str | None:
        try:
            return self.client.get_run(run_id).info.run_id
        except Exception:  # noqa: BLE001 - deleted run or another store: start a new one
            return None

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:500]) for key, value in flatten(config, sep=".").items()]
        existing = self.client.get_run(self.run_id).data.params
        params = [p for p in params if p.key not in existing]  # a resumed run keeps the params it has
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars(record).items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    log_step = log_metrics  # distinct keys: each metric's history has its own steps

    def log_image(self, name: str, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_confusion(self, confusion: Confusion) -> None:
        """confusion/<split>/confusion_matrix.json (as `transfer eval` writes it) and its figure."""
        folder = f"confusion/{confusion.name}"
        self.client.log_dict(self.run_id, {"classes": confusion.classes, "rows": "true class",
                                           "columns": "predicted class", "matrix": confusion.matrix,
                                           "title": confusion.title}, f"{folder}/confusion_matrix.json")
        if confusion.figure is not None:
            self.client.log_artifact(self.run_id, str(confusion.figure), artifact_path=folder)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class WandbLogger:
    """One W&B run per run directory (its id kept in `wandb_run_id`, so a resumed run continues it), its
    files under <run dir>/wandb; the summary holds the last values.

    W&B keeps one step counter that only grows, so epochs and optimizer steps cannot both be it: each row
    carries its own x-axis instead (`epoch`, or `train_step/step` for the step values), declared with
    `define_metric`, and W&B counts its rows."""

    def __init__(self, cfg: WandbLoggerConfig, run_dir: Path) -> None:
        import wandb

        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B: [a-z0-9]
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), mode=cfg.mode,
                              settings=wandb.Settings(silent=True, console="off"))
        id_file.write_text(run_id + "\n", encoding="utf-8")
        self.run.define_metric("epoch")
        self.run.define_metric("train_step/*", step_metric="train_step/step")
        self.per_epoch: set[str] = set()  # the keys already declared to plot against `epoch`

    def log_params(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        row = scalars(record)
        for key in sorted(row.keys() - self.per_epoch):
            self.run.define_metric(key, step_metric="epoch")
        self.per_epoch |= row.keys()
        self.run.log({**row, "epoch": step})

    def log_step(self, values: dict[str, Any], step: int) -> None:
        self.run.log({**scalars(values), "train_step/step": step})

    def log_image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))})

    def log_confusion(self, confusion: Confusion) -> None:
        """W&B's own confusion-matrix chart (`wandb.plot.confusion_matrix`, its table under media/table/),
        fed one (true, predicted) pair per counted image."""
        import wandb

        pairs = [(true, predicted) for true, row in enumerate(confusion.matrix)
                 for predicted, count in enumerate(row) for _ in range(count)]
        chart = wandb.plot.confusion_matrix(y_true=[true for true, _ in pairs], preds=[p for _, p in pairs],
                                            class_names=confusion.classes, title=confusion.title)
        self.run.log({f"confusion/{confusion.name}": chart})

    def close(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
