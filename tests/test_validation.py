"""Every config value is checked against its range when the config is composed: one stderr line
naming the key, exit 2, nothing written, for `transfer train`, a sweep's every value and
`transfer eval` overrides; the boundary values that are valid still run."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.config import schema as schema
from transfer_cli.config.checks import RULE
from transfer_cli.config.compose import compose_config
from transfer_cli.config.loading import apply_overrides
from transfer_cli.core.errors import TransferError


# (overrides, the key the error line must start with)
INVALID = [
    ("head.dropout=1.0", "head.dropout"), ("head.dropout=-0.1", "head.dropout"), ("head.dropout=nan", "head.dropout"),
    ("head.dropouts=[0.5,1.0]", "head.dropouts[1]"), ("head.dropouts=[-0.5,0.3]", "head.dropouts[0]"),
    ("head.dropouts=[0.5]", "head.dropouts"), ("head.kind=conv", "head.kind"), ("head.hidden=0", "head.hidden"),
    ("transforms.image_size=0", "transforms.image_size"), ("dataset.image_size=0", "dataset.image_size"),
    ("dataset.image_size=-32", "dataset.image_size"), ("trainer.num_workers=-1", "trainer.num_workers"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas[1]"), ("optimizer.betas=[-0.1,0.999]", "optimizer.betas[0]"),
    ("optimizer.betas=[0.9]", "optimizer.betas"), ("trainer.label_smoothing=1.0", "trainer.label_smoothing"),
    ("trainer.label_smoothing=-0.1", "trainer.label_smoothing"), ("trainer.ema_decay=0", "trainer.ema_decay"),
    ("trainer.ema_decay=1.0", "trainer.ema_decay"), ("trainer.device=gpu", "trainer.device"),
    ("trainer.device=cuda:x", "trainer.device"), ("trainer.device=CPU", "trainer.device"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"), ("trainer.grad_clip=0", "trainer.grad_clip"),
    ("scheduler.warmup_pct=1.0", "scheduler.warmup_pct"), ("scheduler.warmup_pct=-0.1", "scheduler.warmup_pct"),
    ("optimizer.weight_decay=-0.01", "optimizer.weight_decay"), ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.epochs=-2", "trainer.epochs"), ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size"), ("strategy.lr=0", "strategy.lr"),
    ("strategy.stages.0.lr=-1e-3", "strategy.stages[0].lr"),
    ("strategy.stages.2.epochs=0", "strategy.stages[2].epochs"),
    (["strategy=discriminative", "strategy.stages.0.lrs.layer2=0"], "strategy.stages[0].lrs.layer2"),
    (["strategy=discriminative_decay", "strategy.stages.0.lr_decay=0"], "strategy.stages[0].lr_decay"),
    (["strategy=discriminative_decay", "strategy.stages.0.lr_decay=1.5"], "strategy.stages[0].lr_decay"),
    (["strategy=auto", "strategy.by_train_size.0.below=0"], "strategy.by_train_size[0].below"),
    (["optimizer=sgd", "optimizer.momentum=1.0"], "optimizer.momentum"),
    ("optimizer.momentum=-0.5", "optimizer.momentum"),
    ("optimizer.lr_scale=0", "optimizer.lr_scale"), ("transforms.crop_pct=0", "transforms.crop_pct"),
    ("transforms.crop_pct=1.5", "transforms.crop_pct"), ("transforms.mean=[0.5,0.5]", "transforms.mean"),
    ("transforms.std=[0.5,0,0.5]", "transforms.std[1]"),
    ("transforms.interpolation=lanczos", "transforms.interpolation"),
    ("dataset.val_fraction=0", "dataset.val_fraction"), ("dataset.val_fraction=1", "dataset.val_fraction"),
    ("dataset.cache_budget_mb=-1", "dataset.cache_budget_mb"), ("dataset.train_subset=0", "dataset.train_subset"),
    ("dataset.val_subset=0", "dataset.val_subset"), ("dataset.train_size=0", "dataset.train_size"),
    ("dataset.val_size=0", "dataset.val_size"), ("dataset.num_classes=1", "dataset.num_classes"),
    ("dataset.cache_images=always", "dataset.cache_images"), ("dataset.on_bad_image=ignore", "dataset.on_bad_image"),
    ("dataset.domain=mid", "dataset.domain"), ("dataset.name=mnist", "dataset.name"),
    ("trainer.amp=maybe", "trainer.amp"), ("trainer.channels_last=yes", "trainer.channels_last"),
    ("trainer.cache_features=sometimes", "trainer.cache_features"),
    ("trainer.early_stopping.patience=0", "trainer.early_stopping.patience"),
    ("trainer.early_stopping.min_delta=-0.1", "trainer.early_stopping.min_delta"),
    ("trainer.checkpoint_every_steps=0", "trainer.checkpoint_every_steps"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("augment.hflip=1.5", "augment.hflip"), ("augment.rotation=-10", "augment.rotation"),
    ("augment.random_resized_crop=[0.5,0.1]", "augment.random_resized_crop"),
    ("augment.random_resized_crop=[0,1]", "augment.random_resized_crop[0]"),
    ("augment.color_jitter=[-0.1]", "augment.color_jitter[0]"),
    ("augment.color_jitter=[0.1,0.1,0.1,0.6]", "augment.color_jitter"),
    ("augment.translate=[0.1,1.5]", "augment.translate[1]"), ("augment.mixup_alpha=-1", "augment.mixup_alpha"),
    ("augment.cutmix_alpha=-0.5", "augment.cutmix_alpha"), ("optimizer.name=adamax", "optimizer.name"),
    ("scheduler.name=step", "scheduler.name"), ("backbone.source=hf", "backbone.source"),
]


def _ids(cases: list) -> list[str]:
    return [case if isinstance(case, str) else " ".join(case) for case, _ in cases]


@pytest.mark.parametrize(("overrides", "key"), INVALID, ids=_ids(INVALID))
def test_a_value_out_of_range_is_one_line_naming_the_key_and_writes_nothing(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], overrides: str | list[str],
        key: str) -> None:
    run_dir = tmp_path / "run"
    given = [overrides] if isinstance(overrides, str) else overrides
    assert main(["train", "experiment=smoke", *given, f"hydra.run.dir={run_dir}"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"transfer: error: {key}="), lines[0]
    assert "must" in lines[0] and "Traceback" not in out + err
    assert not run_dir.exists()


def test_a_required_value_left_out_is_one_line_naming_the_key(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", "experiment=smoke", "backbone=timm", "backbone.name=???", f"hydra.run.dir={run_dir}"]) == 2
    assert capsys.readouterr().err == "transfer: error: backbone.name has no value: give one (backbone.name=...)\n"
    assert not run_dir.exists()


VALID_EDGES = ["head.dropout=0", "head.dropouts=[0,0.99]", "scheduler.warmup_pct=0", "optimizer.betas=[0,0]",
               "trainer.label_smoothing=0", "trainer.num_workers=0", "optimizer.weight_decay=0",
               "transforms.crop_pct=1", "transforms.mean=[0]", "transforms.std=[0.5]", "dataset.cache_budget_mb=0",
               "trainer.early_stopping.min_delta=0", "trainer.early_stopping.patience=1", "trainer.ema_decay=0.5",
               "augment.hflip=1", "augment.color_jitter=[0,0,0,0.5]", "augment.translate=[0,1]",
               "augment.random_resized_crop=[1,1]", "trainer.amp=False", "trainer.channels_last=TRUE",
               "optimizer.momentum=0", "trainer.grad_clip=1e-6", "dataset.num_classes=2", "trainer.log_every=1"]


def test_valid_boundary_values_compose_and_a_dry_run_goes_through(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_config(["experiment=smoke", *VALID_EDGES])
    assert (cfg.head.dropout, cfg.scheduler.warmup_pct, cfg.optimizer.betas) == (0.0, 0.0, [0.0, 0.0])
    assert main(["train", "experiment=smoke", *VALID_EDGES, "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    assert "transfer: error" not in capsys.readouterr().err


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_every_documented_device_composes(device: str) -> None:
    assert compose_config(["experiment=smoke", f"trainer.device={device}"]).trainer.device == device


@pytest.mark.parametrize(("sweep", "key"), [
    (["head.dropout=0.1,0.2,1.0"], "head.dropout=1.0"),
    (["strategy=feature_extract,fine_tune", "trainer.grad_clip=1,-1"], "trainer.grad_clip=-1.0"),
    (["trainer.batch_size=range(0,16,4)"], "trainer.batch_size=0"),
])
def test_a_sweep_with_one_value_out_of_range_fails_before_any_job(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], sweep: list[str],
        key: str) -> None:
    sweep_dir = tmp_path / "sweep"
    assert main(["train", "-m", "experiment=smoke", *sweep, f"hydra.sweep.dir={sweep_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"transfer: error: {key}: must") and len(err.strip().splitlines()) == 1
    assert not sweep_dir.exists()


def test_eval_overrides_are_checked_the_same_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`transfer eval` refuses an out-of-range override before it builds a model or reads a checkpoint."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(OmegaConf.structured(compose_config(["experiment=smoke"])), run_dir / "config.yaml")
    for override, key in [("trainer.batch_size=0", "trainer.batch_size"),
                          ("transforms.crop_pct=2", "transforms.crop_pct"),
                          ("trainer.device=tpu", "trainer.device")]:
        assert main(["eval", str(run_dir), override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"transfer: error: {key}=") and len(err.strip().splitlines()) == 1
    with pytest.raises(TransferError, match=r"^dataset\.val_fraction=1\.5: must be in \(0, 1\)$"):
        apply_overrides(compose_config(["experiment=smoke"]), ["dataset.val_fraction=1.5"])


def test_a_run_config_out_of_range_is_refused_naming_the_file(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-edited config.yaml is checked as a composed one: `transfer resume` and `eval` refuse it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tree = OmegaConf.structured(compose_config(["experiment=smoke"]))
    tree.trainer.grad_clip = -1.0
    OmegaConf.save(tree, run_dir / "config.yaml")
    for command in (["resume", str(run_dir)], ["eval", str(run_dir)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == f"transfer: error: {run_dir / 'config.yaml'}: trainer.grad_clip=-1.0: must be > 0\n"


# Fields left free, and why: names, paths and text any value of which is meaningful here.
FREE = {"backbone.name", "backbone.weights", "backbone.checkpoint", "backbone.kwargs", "strategy.name",
        "strategy.description", "dataset.csv",
        "strategy.stages.name", "strategy.stages.train", "strategy.by_train_size.strategy", "dataset.root",
        "dataset.train_split", "dataset.val_split", "eval_splits", "augment.name", "trainer.cache_dir",
        "logger.tensorboard.log_dir", "logger.mlflow.tracking_uri",
        "logger.mlflow.experiment", "logger.mlflow.run_name", "logger.wandb.project", "logger.wandb.entity",
        "logger.wandb.name"}  # free text: names and paths


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """Every non-dataclass field of the schema below `cls` (list items of dataclasses included)."""
    hints = typing.get_type_hints(cls)
    found = []
    for spec in dataclasses.fields(cls):
        kind = hints[spec.name]
        inner = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        kind = inner[0] if typing.get_origin(kind) is typing.Union else kind
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        nested = kind if dataclasses.is_dataclass(kind) else item if dataclasses.is_dataclass(item) else None
        if nested is not None:
            found += _leaves(nested, f"{prefix}{spec.name}.")
        else:
            found.append((f"{prefix}{spec.name}", spec, kind))
    return found


def test_every_number_and_choice_of_the_schema_has_a_rule() -> None:
    """A field added to config/schema.py without its range fails here (booleans need none)."""
    leaves = _leaves(schema.TrainConfig)
    unchecked = sorted(key for key, spec, kind in leaves if kind is not bool and RULE not in spec.metadata)
    assert unchecked == sorted(FREE & {key for key, _, _ in leaves})
    assert FREE <= {key for key, _, _ in leaves}  # no stale names in FREE
