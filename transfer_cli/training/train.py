"""`transfer train`: build data, model, strategy and loop from a config; write the run dir."""

from __future__ import annotations

import logging
import os
import platform
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from transfer_cli.parallel import distributed

from transfer_cli.runs import loggers

from transfer_cli.runs import runlog
from transfer_cli.config.schema import StrategyConfig, TrainConfig, TrainerConfig, to_plain
from transfer_cli.data.datasets import RawSplits, check_classes, load_splits
from transfer_cli.data.image_cache import maybe_cache
from transfer_cli.data.loaders import TransformedDataset, make_loader
from transfer_cli.data.transforms import (
    Preprocessing,
    cache_resize,
    eval_transform,
    is_deterministic,
    resolve_preprocessing,
    train_transform,
)
from transfer_cli.training.feature_cache import NoIdentity, backbone_is_deterministic, cached_splits
from transfer_cli.training.feature_cache import default_cache_dir as default_feature_cache
from transfer_cli.data.mixing import batch_mixer
from transfer_cli.training.engine import Precision, StepRunner
from transfer_cli.core.errors import Interrupted, TransferError
from transfer_cli.models.model import HEAD, TransferModel, build_model, starts_pretrained
from transfer_cli.training.optim import StagedOptimizer
from transfer_cli.training.strategies import Stage, choose_by_size, plan_stages
from transfer_cli.training.plan import build_plan, format_plan
from transfer_cli.training.trainer import FitResult, FitSetup, Progress, check_history, fit, sigterm_stops

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
    """AMP (bf16 where supported, else fp16 with a grad scaler) on CUDA by default; channels_last on
    CUDA and CPU by default (on a 2-core CPU: EfficientNet steps 1.4-1.7x faster, ResNets unchanged)."""
    on_cuda = device.type == "cuda"
    amp = on_cuda if trainer.amp == "auto" else _flag(trainer.amp)
    channels_last = device.type in {"cuda", "cpu"} if trainer.channels_last == "auto" else _flag(trainer.channels_last)
    if not amp:
        return Precision(device, None, channels_last), None
    if on_cuda and not torch.cuda.is_bf16_supported():
        return Precision(device, torch.float16, channels_last), torch.amp.GradScaler("cuda")
    return Precision(device, torch.bfloat16, channels_last), None


def _flag(value: str) -> bool:
    """A true/false config flag (the schema allows no other value; YAML may have capitalised it)."""
    return str(value).lower() == "true"


@dataclass
class Prepared:
    """A run ready to fit: what train and resume both build from a config."""

    splits: RawSplits
    model: TransferModel
    stages: list[Stage]
    preprocessing: Preprocessing
    setup: FitSetup
    strategy: StrategyConfig  # the one that runs (auto resolves to another)
    strategy_choice: str = ""


def _runner(cfg: TrainConfig, model: TransferModel, optimizer: StagedOptimizer, precision: Precision,
            scaler: torch.amp.GradScaler | None, num_classes: int) -> StepRunner:
    forward = torch.compile(model.model) if cfg.trainer.compile else model.model
    ema = None
    if cfg.trainer.ema_decay is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            model.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.trainer.ema_decay), use_buffers=True)
    return StepRunner(forward, optimizer.optimizer, nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing),
                      precision, scaler, cfg.trainer.grad_clip, ema, model.model if ema is not None else None,
                      batch_mixer(cfg.augment, num_classes))


def prepare(cfg: TrainConfig, run_dir: Path) -> Prepared:
    """Build data, model, stages, loaders and the fit setup (building `cfg` checked its values)."""
    seed_everything(cfg.trainer.seed)
    device = distributed.device_for(resolve_device(cfg.trainer.device))
    precision, scaler = resolve_precision(cfg.trainer, device)
    batch_size = distributed.per_process_batch(cfg.trainer.batch_size)  # DDP: batch_size is the global batch
    eval_batch_size = max(1, (cfg.trainer.eval_batch_size or cfg.trainer.batch_size) // distributed.world_size())
    with distributed.main_first():  # DDP: rank 0 downloads data and weights, the others read its copies
        splits = load_splits(cfg.dataset)
        num_classes = len(splits.classes)
        strategy, choice = choose_by_size(cfg.strategy, len(splits.train), cfg.dataset.domain)
        if choice:
            log.info("%s", choice)
        model = build_model(cfg.backbone, cfg.head, num_classes, pretrained=strategy.pretrained and not cfg.dry_run)
    stages = plan_stages(strategy, model, cfg.trainer.epochs, cfg.optimizer.lr_scale,
                         starts_pretrained(cfg.backbone, strategy.pretrained))  # not model.pretrained: a dry run builds none
    preprocessing = resolve_preprocessing(model.preprocessing, cfg.transforms, model.pretrained)
    model.model.to(device, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
    if not cfg.dry_run:
        for split in ("train", "val"):
            setattr(splits, split, maybe_cache(getattr(splits, split), cfg.dataset.cache_images, cfg.dataset.cache_budget_mb,
                                               cache_resize(preprocessing), preprocessing.resize_size, split,
                                               workers=max(1, min(4, os.cpu_count() or 1))))
    pin = device.type == "cuda"
    shard = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    train_loader = make_loader(TransformedDataset(splits.train, train_transform(preprocessing, cfg.augment)),
                               batch_size, train=True, num_workers=cfg.trainer.num_workers,
                               seed=cfg.trainer.seed, pin_memory=pin, **shard)
    val_loader = make_loader(TransformedDataset(splits.val, eval_transform(preprocessing)),
                             eval_batch_size, train=False,
                             num_workers=cfg.trainer.num_workers, seed=cfg.trainer.seed, pin_memory=pin, **shard)
    optimizer = StagedOptimizer(model, cfg.optimizer, stages[0], strategy.train_bn)
    setup = FitSetup(
        model=model, stages=stages, optimizer=optimizer, scheduler_cfg=cfg.scheduler,
        runner=_runner(cfg, model, optimizer, precision, scaler, num_classes),
        train_loader=train_loader, val_loader=val_loader, num_classes=num_classes, run_dir=run_dir,
        train_bn=strategy.train_bn, early_stopping=cfg.trainer.early_stopping,
        checkpoint_every_steps=cfg.trainer.checkpoint_every_steps,
        check_every=1 if device.type == "cpu" else max(1, cfg.trainer.log_every),
        checkpoint_extra={"config": to_plain(cfg), "classes": splits.classes},
        compile=cfg.trainer.compile,
    )
    setup.head_only = _head_only_path(cfg, model, splits, preprocessing, precision, setup, strategy)
    if distributed.active():  # distinct dropout and MixUp streams per rank (augmentation is per sample)
        seed_everything(cfg.trainer.seed + 1_000_003 * distributed.rank())
    return Prepared(splits, model, stages, preprocessing, setup, strategy, choice)


def _head_only_path(cfg: TrainConfig, model: TransferModel, splits: RawSplits, preprocessing: Preprocessing,
                    precision: Precision, setup: FitSetup, strategy: StrategyConfig) -> Callable[[Stage], Any]:
    """Per stage: cached-feature loaders where only the head trains and the cache is allowed, else None."""
    mode = str(cfg.trainer.cache_features).lower()  # auto | true | false (the schema's rule)
    random_input = not is_deterministic(cfg.augment) or setup.runner.mix is not None
    exact = not random_input and backbone_is_deterministic(model) and not strategy.train_bn
    if mode == "false" or (mode == "auto" and not exact):
        return lambda stage: None
    if not exact:
        log.warning("trainer.cache_features=true: head-only stages train on one centre view per image "
                    "(no augmentation, no backbone dropout)")
    eval_tf = eval_transform(preprocessing)
    batch, eval_batch = setup.train_loader.batch_size, setup.val_loader.batch_size  # per process under DDP
    cache_dir = Path(cfg.trainer.cache_dir).expanduser() if cfg.trainer.cache_dir else default_feature_cache()
    memo: dict[str, Any] = {}

    def make(data: Any, size: int, train: bool) -> Any:
        return make_loader(data, size, train=train, num_workers=cfg.trainer.num_workers, seed=cfg.trainer.seed,
                           pin_memory=precision.device.type == "cuda")

    key_extra = (f"{cfg.backbone.source}:{cfg.backbone.name}|{preprocessing}|{precision.device.type}|"
                 f"{precision.amp_dtype}|channels_last={precision.channels_last}")
    unidentified: list[str] = []  # why the data has no content identity: then no stage caches, said once

    def for_stage(stage: Stage) -> Any:
        if set(stage.lrs) != {HEAD} or unidentified:
            return None
        if stage.name not in memo:
            try:
                memo[stage.name] = cached_splits(
                    model, TransformedDataset(splits.train, eval_tf), TransformedDataset(splits.val, eval_tf), make,
                    train_labels=splits.train_labels, val_labels=splits.val_labels, batch_size=batch,
                    eval_batch_size=eval_batch, seed=cfg.trainer.seed, precision=precision, key_extra=key_extra,
                    cache_dir=cache_dir)
            except NoIdentity as why:
                unidentified.append(str(why))
                log.log(logging.WARNING if mode == "true" else logging.INFO,
                        "feature cache off: %s; head-only stages run the backbone on every image", why)
                return None
            if distributed.active():  # every rank computed all features; each trains and validates on its share
                cached = memo[stage.name]
                shard = {"num_workers": 0, "seed": cfg.trainer.seed, "pin_memory": False,
                         "rank": distributed.rank(), "world_size": distributed.world_size()}
                memo[stage.name] = replace(cached, train_loader=make_loader(cached.train_loader.dataset, batch,
                                                                            train=True, **shard),
                                           val_loader=make_loader(cached.val_loader.dataset, eval_batch,
                                                                  train=False, **shard))
        return memo[stage.name]

    return for_stage


def train(cfg: TrainConfig, run_dir: Path, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one experiment into `run_dir` (continuing from checkpoint `resume`) and return its summary.

    Under torchrun every rank calls this with the same `run_dir`; rank 0 writes the files.
    """
    started = time.perf_counter()
    distributed.init_from_env()
    distributed.quiet_logging()
    main = distributed.is_main()
    loggers.check_available(cfg.logger)
    run_dir.mkdir(parents=True, exist_ok=True)
    with sigterm_stops("before training started"):
        prepared = prepare(cfg, run_dir)
    if resume is not None:
        check_classes(prepared.splits.classes, resume["classes"],
                      "restore the dataset's class folders as they were, or train a new run")
    plan = build_plan(cfg, prepared)
    if cfg.dry_run:
        print(format_plan(plan))
        return {"dry_run": True, "plan": plan}
    if main:
        runlog.write_json(run_dir / "plan.json", plan)
    log.info("%s (%s) -> %d classes; %d train / %d val images; input %dpx mean=%s std=%s",
             cfg.backbone.name, prepared.model.weights_source, len(prepared.splits.classes), len(prepared.splits.train),
             len(prepared.splits.val), prepared.preprocessing.image_size, prepared.preprocessing.mean,
             prepared.preprocessing.std)
    if distributed.active():
        log.info("data parallel: %d processes, %d images per process per step (global batch %d)",
                 distributed.world_size(), prepared.setup.train_loader.batch_size, cfg.trainer.batch_size)
    done = resume["progress"]["epoch"] if resume is not None else 0
    history = [record for record in runlog.read_metrics(run_dir) if record["epoch"] <= done]
    check_history(run_dir, history, done)
    if main:
        runlog.write_metrics(run_dir, history)  # drops epochs logged after the checkpoint
    sinks = loggers.build(cfg.logger, run_dir) if main else loggers.Loggers([])  # TensorBoard, MLflow: rank 0
    prepared.setup.logger = sinks
    sinks.log_params(to_plain(cfg))
    try:
        result = fit(prepared.setup, resume, history)
    except BaseException as error:
        sinks.close("KILLED" if isinstance(error, (Interrupted, KeyboardInterrupt)) else "FAILED")
        raise
    summary = _summary(result, prepared, cfg)
    summary["wall_time_s"] = time.perf_counter() - started
    if main:
        runlog.write_json(run_dir / "summary.json", summary)
        if result.records:
            runlog.plot_curves(result.records, run_dir / "curves.png",
                               title=f"{cfg.backbone.name} / {prepared.strategy.name} / {cfg.dataset.name}")
    sinks.log_metrics({f"summary/{key}": summary[key] for key in ("best_val_acc", "final_val_acc")}, summary["epochs_run"])
    sinks.close("FAILED" if result.error else "FINISHED")
    if result.error:
        raise TransferError(result.error)
    return summary


def _summary(result: FitResult, prepared: Prepared, cfg: TrainConfig) -> dict[str, Any]:
    """summary.json: the figures to compare runs by, what produced them, and why it stopped."""
    splits, model, stages, preprocessing = prepared.splits, prepared.model, prepared.stages, prepared.preprocessing
    precision = prepared.setup.runner.precision
    final = result.records[-1] if result.records else {}
    progress = result.progress
    return {
        "status": "failed" if result.error else "finished",
        "stop_reason": result.error or progress.stop_reason or "completed all stages",
        "best_val_acc": progress.best_val_acc if result.records else None,
        "final_val_acc": final.get("val/acc1"),
        "best_epoch": progress.best_epoch,
        "epochs_run": len(result.records),
        "num_classes": len(splits.classes),
        "classes": splits.classes,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "params_total": sum(p.numel() for p in model.model.parameters()),
        "params_trainable": progress.params_trainable,
        "skipped_images": len(splits.skipped_images),
        "strategy": prepared.strategy.name,
        "strategy_choice": prepared.strategy_choice or None,
        "stages": [{"name": s.name, "epochs": s.epochs, "lrs": s.lrs, "peak_lrs": _peak_lrs(progress, i, s)}
                   for i, s in enumerate(stages)],
        "layer_groups": [g.name for g in model.groups],
        "weights": model.weights_source,
        "preprocessing": {**vars(preprocessing), "resize_size": preprocessing.resize_size},
        "device": str(precision.device),
        "amp": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else None,
        "ema": prepared.setup.runner.ema is not None,
        "train_images_per_s": _mean([r["train/images_per_s"] for r in result.records]),
        **{k: v for k, v in final.items() if k.startswith("val/")},
        "seed": cfg.trainer.seed,
        "split_seed": cfg.dataset.split_seed,
        "world_size": distributed.world_size(),
        "versions": _versions(),
    }


def _peak_lrs(progress: Progress, index: int, stage: Stage) -> dict[str, float] | None:
    """The highest lr each group of stage `index` ran at (a OneCycle stage's max_lr where a step lands on it);
    None for a stage never run, or begun before a resume from a checkpoint that did not note it."""
    peak = progress.peak_lrs[index] if index < len(progress.peak_lrs) else None
    return {group: peak.get(group, 0.0) for group in stage.lrs} if peak else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _versions() -> dict[str, str]:
    import hydra
    import timm
    import torchvision

    from transfer_cli import __version__
    return {"transfer": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "hydra": hydra.__version__}
