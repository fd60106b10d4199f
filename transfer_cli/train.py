"""`transfer train`: build data, model, strategy and loop from a config; write the run dir."""

from __future__ import annotations

import logging
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transfer_cli import runlog
from transfer_cli.config import TrainConfig, TrainerConfig, to_plain
from transfer_cli.data.datasets import RawSplits, load_splits
from transfer_cli.data.loaders import TransformedDataset, make_loader
from transfer_cli.data.transforms import Preprocessing, eval_transform, resolve_preprocessing, train_transform
from transfer_cli.engine import Precision
from transfer_cli.errors import TransferError
from transfer_cli.models import TransferModel, build_model
from transfer_cli.optim import StagedOptimizer
from transfer_cli.strategies import Stage, plan_stages
from transfer_cli.trainer import FitResult, FitSetup, fit

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TransferError(f"trainer.device={name} but CUDA is not available here: use trainer.device=auto or cpu")
    return device


def resolve_precision(trainer: TrainerConfig, device: torch.device) -> tuple[Precision, torch.amp.GradScaler | None]:
    """AMP (bf16 where supported, else fp16 with a grad scaler) and channels_last, on CUDA by default."""
    on_cuda = device.type == "cuda"
    amp = on_cuda if trainer.amp == "auto" else _flag(trainer.amp, "trainer.amp")
    channels_last = on_cuda if trainer.channels_last == "auto" else _flag(trainer.channels_last, "trainer.channels_last")
    if not amp:
        return Precision(device, None, channels_last), None
    if on_cuda and not torch.cuda.is_bf16_supported():
        return Precision(device, torch.float16, channels_last), torch.amp.GradScaler("cuda")
    return Precision(device, torch.bfloat16, channels_last), None


def _flag(value: str, option: str) -> bool:
    lowered = str(value).lower()
    if lowered not in {"true", "false"}:
        raise TransferError(f"{option}={value}: use auto, true or false")
    return lowered == "true"


def _validate(cfg: TrainConfig) -> None:
    if cfg.trainer.epochs is not None and cfg.trainer.epochs <= 0:
        raise TransferError(f"trainer.epochs={cfg.trainer.epochs} must be positive (or null for the strategy's own)")
    if cfg.trainer.batch_size <= 0:
        raise TransferError(f"trainer.batch_size={cfg.trainer.batch_size} must be positive")
    if cfg.optimizer.lr_scale <= 0:
        raise TransferError(f"optimizer.lr_scale={cfg.optimizer.lr_scale} must be positive")


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Run one experiment into `run_dir` and return its summary."""
    _validate(cfg)
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    precision, scaler = resolve_precision(cfg.trainer, device)

    splits = load_splits(cfg.dataset, cfg.trainer.seed)
    num_classes = len(splits.classes)
    model = build_model(cfg.backbone, cfg.head, num_classes, pretrained=cfg.strategy.pretrained)
    stages = plan_stages(cfg.strategy, model, cfg.trainer.epochs, cfg.optimizer.lr_scale)
    preprocessing = resolve_preprocessing(model.preprocessing, cfg.transforms, model.pretrained)
    model.model.to(device, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)

    pin = device.type == "cuda"
    train_loader = make_loader(TransformedDataset(splits.train, train_transform(preprocessing, cfg.augment)),
                               cfg.trainer.batch_size, train=True, num_workers=cfg.trainer.num_workers,
                               seed=cfg.trainer.seed, pin_memory=pin)
    val_loader = make_loader(TransformedDataset(splits.val, eval_transform(preprocessing)),
                             cfg.trainer.eval_batch_size or cfg.trainer.batch_size, train=False,
                             num_workers=cfg.trainer.num_workers, seed=cfg.trainer.seed, pin_memory=pin)
    log.info("%s (%s) -> %d classes; %d train / %d val images; input %dpx mean=%s std=%s",
             cfg.backbone.name, model.weights_source, num_classes, len(splits.train), len(splits.val),
             preprocessing.image_size, preprocessing.mean, preprocessing.std)

    plain_cfg = to_plain(cfg)
    result = fit(FitSetup(
        model=model, stages=stages,
        optimizer=StagedOptimizer(model, cfg.optimizer, stages[0], cfg.strategy.train_bn),
        scheduler_cfg=cfg.scheduler, train_loader=train_loader, val_loader=val_loader,
        loss_fn=nn.CrossEntropyLoss(), precision=precision, num_classes=num_classes, run_dir=run_dir,
        train_bn=cfg.strategy.train_bn, grad_clip=cfg.trainer.grad_clip, scaler=scaler,
        checkpoint_extra={"config": plain_cfg, "classes": splits.classes},
    ))
    summary = _summary(result, splits, model, stages, preprocessing, precision, cfg.trainer.seed)
    summary["wall_time_s"] = time.perf_counter() - started
    runlog.write_json(run_dir / "summary.json", summary)
    runlog.plot_curves(result.records, run_dir / "curves.png",
                       title=f"{cfg.backbone.name} / {cfg.strategy.name} / {cfg.dataset.name}")
    return summary


def _summary(result: FitResult, splits: RawSplits, model: TransferModel, stages: list[Stage],
             preprocessing: Preprocessing, precision: Precision, seed: int) -> dict[str, Any]:
    """summary.json: the figures to compare runs by, and what produced them."""
    final = result.records[-1]
    return {
        "best_val_acc": result.best_val_acc,
        "final_val_acc": final["val/acc1"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.records),
        "num_classes": len(splits.classes),
        "classes": splits.classes,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "params_total": sum(p.numel() for p in model.model.parameters()),
        "params_trainable": result.params_trainable,
        "stages": [{"name": s.name, "epochs": s.epochs, "lrs": s.lrs} for s in stages],
        "layer_groups": [g.name for g in model.groups],
        "weights": model.weights_source,
        "preprocessing": {**vars(preprocessing), "resize_size": preprocessing.resize_size},
        "device": str(precision.device),
        "amp": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else None,
        "train_images_per_s": _mean([r["train/images_per_s"] for r in result.records]),
        **{k: v for k, v in final.items() if k.startswith("val/")},
        "seed": seed,
        "versions": _versions(),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _versions() -> dict[str, str]:
    import hydra
    import timm
    import torchvision

    from transfer_cli import __version__

    return {"transfer": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "hydra": hydra.__version__}
