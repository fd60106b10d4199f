"""Shared helpers for the unit tests: tiny offline models, configs from conf/, a fit setup.

Everything here builds random-init networks (no downloads) and synthetic data, so the
tests run offline on a CPU in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from transfer_cli.config.schema import (
    BackboneConfig,
    HeadConfig,
    OptimizerConfig,
    SchedulerConfig,
    StrategyConfig,
)
from transfer_cli.models.model import TransferModel, build_model
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.strategies import Stage


ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

RESNET_GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


# --------------------------------------------------------------------------- configs


def load_conf(group: str, name: str, schema: type) -> Any:
    """conf/<group>/<name>.yaml merged onto its dataclass schema, as that dataclass."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def load_strategy(name: str) -> StrategyConfig:
    return load_conf("strategy", name, StrategyConfig)


def strategy_names() -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / "strategy").glob("*.yaml"))


def load_optimizer(name: str, **overrides: Any) -> OptimizerConfig:
    cfg = load_conf("optimizer", name, OptimizerConfig)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def load_scheduler(name: str) -> SchedulerConfig:
    return load_conf("scheduler", name, SchedulerConfig)


# --------------------------------------------------------------------------- models


def timm_backbone(name: str = "test_resnet", **kwargs: Any) -> BackboneConfig:
    kwargs.setdefault("pretrained", False)
    return BackboneConfig(source="timm", name=name, **kwargs)


def tv_backbone(name: str = "resnet18", **kwargs: Any) -> BackboneConfig:
    kwargs.setdefault("pretrained", False)
    return BackboneConfig(source="torchvision", name=name, **kwargs)


def build(backbone: BackboneConfig | None = None, num_classes: int = 3, head: HeadConfig | None = None,
          pretrained: bool = True, seed: int = 0) -> TransferModel:
    """A TransferModel (random init unless the backbone config loads a checkpoint)."""
    torch.manual_seed(seed)
    return build_model(backbone or timm_backbone(), head or HeadConfig(), num_classes, pretrained=pretrained)


def tiny_resnet(num_classes: int = 3, head: HeadConfig | None = None, seed: int = 0) -> TransferModel:
    return build(timm_backbone("test_resnet"), num_classes, head, seed=seed)


def group_names(model: TransferModel) -> list[str]:
    return [group.name for group in model.groups]


def params_of(model: TransferModel, *groups: str) -> list[str]:
    """Parameter names of the named layer groups (all groups when none are named)."""
    wanted = set(groups) if groups else {g.name for g in model.groups}
    return [name for g in model.groups if g.name in wanted for name in g.params]


def stage(name: str, lrs: dict[str, float], epochs: int = 1) -> Stage:
    return Stage(name, epochs, dict(lrs))


def snapshot_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def snapshot_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def batchnorms(module: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


# --------------------------------------------------------------------------- training


def make_fit_setup(model: TransferModel, stages: list[Stage], run_dir: Path, *, train_bn: bool = False,
                   optimizer: OptimizerConfig | None = None, scheduler: SchedulerConfig | None = None,
                   num_classes: int = 3, image_size: int = 32, train_size: int = 48, val_size: int = 24,
                   batch_size: int = 16, seed: int = 0):
    """A FitSetup built the way training/assemble.py builds one, on synthetic data, on CPU."""
    from transfer_cli.config.schema import AugmentConfig, TransformsConfig
    from transfer_cli.data.loaders import TransformedDataset, make_loader
    from transfer_cli.data.synthetic import SyntheticImages
    from transfer_cli.data.transforms import eval_transform, resolve_preprocessing, train_transform
    from transfer_cli.models.runtime import Precision
    from transfer_cli.training.optim import StagedOptimizer
    from transfer_cli.training.stages import FitSetup

    preprocessing = resolve_preprocessing(model.preprocessing, TransformsConfig(image_size=image_size, crop_pct=1.0),
                                          model.pretrained)
    train = SyntheticImages(num_classes, train_size, image_size, seed)
    val = SyntheticImages(num_classes, val_size, image_size, seed + 1)
    train_loader = make_loader(TransformedDataset(train, train_transform(preprocessing, AugmentConfig(name="none"))),
                               batch_size, train=True, num_workers=0, seed=seed, pin_memory=False)
    val_loader = make_loader(TransformedDataset(val, eval_transform(preprocessing)), batch_size, train=False,
                             num_workers=0, seed=seed, pin_memory=False)
    optimizer = optimizer or OptimizerConfig(name="adamw", weight_decay=0.01)
    staged = StagedOptimizer(model, optimizer, stages[0], train_bn)
    loss_fn, precision = nn.CrossEntropyLoss(), Precision(torch.device("cpu"))
    common = dict(
        model=model, stages=stages, optimizer=staged,
        scheduler_cfg=scheduler or SchedulerConfig(name="constant", warmup_pct=0.0),
        train_loader=train_loader, val_loader=val_loader, num_classes=num_classes, run_dir=Path(run_dir),
        train_bn=train_bn,
    )
    fields = {f.name for f in dataclasses.fields(FitSetup)}
    if "runner" in fields:  # the loop steps through a StepRunner (as train.py builds it)
        from transfer_cli.training.loop import StepRunner

        common["runner"] = StepRunner(model.model, staged.optimizer, loss_fn, precision)
    else:
        common.update(loss_fn=loss_fn, precision=precision)
    return FitSetup(**common)


def setup_loss_and_precision(setup) -> tuple[nn.Module, Any]:
    """The loss function and Precision a FitSetup evaluates with (wherever it keeps them)."""
    holder = getattr(setup, "runner", setup)
    return holder.loss_fn, holder.precision


def params_trainable(result) -> dict[str, int]:
    """Trainable-parameter counts per stage from a FitResult."""
    holder = getattr(result, "progress", result)
    return holder.params_trainable


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metric records without their timing keys, which differ between any two runs."""
    return [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in records]


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, comparable."""
    return comparable(read_metrics(run_dir))


def assert_same_metrics(a: Path, b: Path) -> None:
    """Two runs logged the same epochs with the same metrics (floats within float32 reduction noise)."""
    first, second = run_metrics(a), run_metrics(b)
    assert len(first) == len(second) > 0
    for one, other in zip(first, second):
        assert one.keys() == other.keys()
        for key, value in one.items():
            expected = pytest.approx(other[key], rel=1e-5, abs=1e-7) if isinstance(value, float) else other[key]
            assert value == expected, key


def write_split_folders(root: Path, per_class: int = 8) -> None:
    """train/, val/ and test/ with two classes of flat colours plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for index, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class_{index}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def tree_snapshot(folder: Path) -> dict[str, Any]:
    """Every entry under `folder`: a file's bytes, a link's target, "dir" for a folder (to prove nothing changed)."""
    def entry(path: Path) -> Any:
        if path.is_symlink():
            return ("link", str(path.readlink()))
        return path.read_bytes() if path.is_file() else "dir"
    return {str(p.relative_to(folder)): entry(p) for p in sorted(folder.rglob("*"))}


def one_error_line(code: int, err: str, *names: object, out: str = "") -> str:
    """The single `transfer: error:` line of a command that exited 2 (no traceback anywhere), naming each of `names`."""
    assert code == 2, out + err
    assert "Traceback" not in out + err, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("transfer: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]
