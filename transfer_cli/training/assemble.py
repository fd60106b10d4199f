"""Assembling a run from its config: data, model, stages, loaders, the step runner and the fit setup."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from transfer_cli.config.checks import is_auto, resolve_toggle
from transfer_cli.config.schema import StrategyConfig, TrainConfig, to_plain
from transfer_cli.core.errors import TransferError
from transfer_cli.data.balance import loss_weights, sample_weights
from transfer_cli.data.datasets import RawSplits, load_splits
from transfer_cli.data.device_decode import EncodedImages
from transfer_cli.data.downloads import planned_splits
from transfer_cli.data.image_cache import maybe_cache
from transfer_cli.data.loaders import TransformedDataset, make_loader
from transfer_cli.data.mixing import batch_mixer
from transfer_cli.data.transforms import (
    Preprocessing,
    cache_resize,
    eval_transform,
    is_deterministic,
    resolve_preprocessing,
    train_transform,
)
from transfer_cli.models.model import HEAD, TransferModel, build_model, check_batch_statistics, starts_pretrained
from transfer_cli.models.runtime import (
    Precision,
    configure_cuda_math,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from transfer_cli.parallel import distributed
from transfer_cli.training.feature_cache import NoIdentity, backbone_is_deterministic, cached_splits
from transfer_cli.training.feature_cache import default_cache_dir as default_feature_cache
from transfer_cli.training.freezing import Stage
from transfer_cli.training.loop import EMA, StepRunner
from transfer_cli.training.stages import FitSetup, StagedOptimizer, choose_by_size, plan_stages
from transfer_cli.training.state import check_monitor


log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A run ready to fit: its fit setup (model, stages, loaders, runner) and the rest that train and resume
    build from a config. Not frozen: the setup's parts are live training state."""

    splits: RawSplits
    preprocessing: Preprocessing
    setup: FitSetup
    strategy: StrategyConfig  # the one that runs (auto resolves to another)
    strategy_choice: str = ""


RunnerAdapter = Callable[[StepRunner], StepRunner]  # the runner built from the config -> the one to train with


def _runner(cfg: TrainConfig, model: TransferModel, optimizer: StagedOptimizer, precision: Precision,
            scaler: torch.amp.GradScaler | None, splits: RawSplits) -> StepRunner:
    # the plain network: torch.compile comes at each stage's start (stages.stage_run), after its freezing
    ema = EMA(model.model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay is not None else None
    # dataset.balance=loss weights the training loss alone: validation scores every image alike (fit.py)
    weight = loss_weights(splits.train_labels, splits.classes) if cfg.dataset.balance == "loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.trainer.label_smoothing).to(precision.device)
    num_classes = len(splits.classes)
    return StepRunner(model.model, optimizer.optimizer, loss_fn, precision, scaler, cfg.trainer.grad_clip, ema,
                      model.model if ema is not None else None, batch_mixer(cfg.augment, num_classes))


def prepare(cfg: TrainConfig, run_dir: Path, adapt_runner: RunnerAdapter | None = None,
            resuming: bool = False) -> Prepared:
    """Build data, model, stages, loaders and the fit setup (building `cfg` checked its values). `adapt_runner`
    gets the step runner built from the config and returns the one to train with: another loss
    (`lambda runner: dataclasses.replace(runner, loss_fn=FocalLoss())`), a hook on its model or optimizer.
    `resuming`: the checkpoint brings every tensor, so the backbone's weights are neither downloaded nor read."""
    seed_everything(cfg.trainer.seed)
    device = distributed.device_for(resolve_device(cfg.trainer.device))
    precision, scaler = resolve_precision(cfg.trainer, device)
    configure_cuda_math(device, deterministic=cfg.trainer.deterministic)  # cudnn.benchmark, TF32: as the bench
    batch_size = distributed.per_process_batch(cfg.trainer.batch_size)  # DDP: batch_size is the global batch
    eval_batch_size = max(1, (cfg.trainer.eval_batch_size or cfg.trainer.batch_size) // distributed.world_size())
    with distributed.main_first():  # DDP: rank 0 downloads data and weights, the others read its copies
        splits = planned_splits(cfg.dataset) if cfg.dry_run else load_splits(cfg.dataset)  # a dry run downloads nothing
        num_classes = len(splits.classes)
        check_monitor(cfg.trainer.early_stopping, num_classes, selecting=splits.select is not None)
        strategy, choice = choose_by_size(cfg.strategy, len(splits.train), cfg.dataset.domain)
        if choice:
            log.info("%s", choice)
        model = build_model(cfg.backbone, cfg.head, num_classes, pretrained=strategy.pretrained and not cfg.dry_run,
                            load_weights=not resuming)
    stages = plan_stages(strategy, model, cfg.trainer.epochs, cfg.optimizer.lr_scale,
                         # not model.pretrained: a dry run builds no weights
                         starts_pretrained(cfg.backbone, strategy.pretrained), cfg.trainer.epochs_per_stage)
    check_batch_statistics(model, stages, min(batch_size, len(splits.train) // distributed.world_size()), batch_size)
    preprocessing = resolve_preprocessing(model.preprocessing, cfg.transforms, model.pretrained)
    model.model.to(device, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
    if not cfg.dry_run:
        splits = _decoded_once(splits, cfg, preprocessing)
    pin = device.type == "cuda"
    shard = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    precision = _normalizing(cfg, precision, preprocessing)
    images, decode_on = _device_decoding(cfg, stages, precision)
    tf = {"draft": cfg.transforms.draft_decode and decode_on is None, "normalize": precision.normalize is None}
    train_loader = make_loader(images(splits.train, train_transform(preprocessing, cfg.augment, **tf)),
                               batch_size, train=True, num_workers=cfg.trainer.num_workers, decode_on=decode_on,
                               seed=cfg.trainer.seed, pin_memory=pin, weights=_sampling(cfg, splits), **shard)
    val_loader = make_loader(images(splits.val, eval_transform(preprocessing, **tf)), eval_batch_size, train=False,
                             num_workers=cfg.trainer.num_workers, decode_on=decode_on, seed=cfg.trainer.seed,
                             pin_memory=pin, **shard)
    select_loader = None if splits.select is None else make_loader(
        images(splits.select, eval_transform(preprocessing, **tf)), eval_batch_size, train=False,
        num_workers=cfg.trainer.num_workers, decode_on=decode_on, seed=cfg.trainer.seed, pin_memory=pin, **shard)
    optimizer = StagedOptimizer(model, cfg.optimizer, stages[0], strategy.train_bn)
    runner = _runner(cfg, model, optimizer, precision, scaler, splits)
    if adapt_runner is not None:
        runner = adapt_runner(runner)
    obstacles = _cache_obstacles(cfg, model, runner, strategy)
    if obstacles and is_auto(cfg.trainer.cache_features) and any(set(s.lrs) == {HEAD} for s in stages):
        log.info("feature cache off: %s; head-only stages run the backbone on every image", "; ".join(obstacles))
    stage_data = _feature_cache_source(cfg, model, splits, preprocessing, precision, not obstacles,
                                       (batch_size, eval_batch_size))
    setup = FitSetup(
        model=model, stages=stages, optimizer=optimizer, scheduler_cfg=cfg.scheduler, runner=runner,
        train_loader=train_loader, val_loader=val_loader, select_loader=select_loader, num_classes=num_classes,
        run_dir=run_dir, train_bn=strategy.train_bn, trainer=cfg.trainer,
        checkpoint_extra={"config": to_plain(cfg), "classes": splits.classes, "splits": splits.identity},
        stage_data=stage_data,
    )
    if distributed.active():  # distinct dropout and MixUp streams per rank (augmentation is per sample)
        seed_everything(cfg.trainer.seed + 1_000_003 * distributed.rank())
    return Prepared(splits, preprocessing, setup, strategy, choice)


def _sampling(cfg: TrainConfig, splits: RawSplits) -> list[float] | None:
    """Each training image's draw weight where dataset.balance=sampler (images and cached features alike)."""
    return sample_weights(splits.train_labels, splits.classes) if cfg.dataset.balance == "sampler" else None


def _normalizing(cfg: TrainConfig, precision: Precision, preprocessing: Preprocessing) -> Precision:
    """`precision`, normalizing uint8 batches on the device where trainer.normalize_on_device says (auto: on
    CUDA): the loaders then stop before ToDtype and Normalize, and 4x fewer bytes cross to the device."""
    on = resolve_toggle(cfg.trainer.normalize_on_device, auto=precision.device.type == "cuda")
    if not (on or cfg.trainer.decode_on_device):  # device-decoded batches are uint8 too
        return precision
    return replace(precision, normalize=(preprocessing.mean, preprocessing.std))


def _device_decoding(cfg: TrainConfig, stages: list[Stage], precision: Precision) -> tuple[type, torch.device | None]:
    """The dataset type the loaders wrap the splits in, and the device that decodes their batches
    (trainer.decode_on_device), or None: TransformedDataset, decoded in the loader."""
    if not cfg.trainer.decode_on_device:
        return TransformedDataset, None
    if any(stage.bn == "reestimate" for stage in stages):
        raise TransferError("trainer.decode_on_device=true cannot re-estimate BatchNorm statistics (a stage with "
                            "bn=reestimate reads the training set through a plain DataLoader): drop one or the other")
    return EncodedImages, precision.device


def _decoded_once(splits: RawSplits, cfg: TrainConfig, preprocessing: Preprocessing) -> RawSplits:
    """The splits with their images decoded and resized once, in memory, where dataset.cache_images allows."""
    def kept(data: Any, split: str) -> Any:
        return maybe_cache(data, cfg.dataset.cache_images, cfg.dataset.cache_budget_mb, cache_resize(preprocessing),
                           preprocessing.resize_size, split, workers=max(1, min(4, os.cpu_count() or 1)),
                           draft=cfg.transforms.draft_decode)

    select = None if splits.select is None else kept(splits.select, "select")
    return replace(splits, train=kept(splits.train, "train"), val=kept(splits.val, "val"), select=select)


def _cache_obstacles(cfg: TrainConfig, model: TransferModel, runner: StepRunner, strategy: StrategyConfig) -> list[str]:
    """Why features computed once would not be what a head-only epoch sees (each with its way out)."""
    obstacles = []
    if not is_deterministic(cfg.augment):
        obstacles.append(f"augment={cfg.augment.name} is random (augment=none, or trainer.cache_features=true "
                         "to train on one centre view)")
    if runner.mix is not None:
        obstacles.append("MixUp/CutMix mix the images (augment.mixup_alpha=0 augment.cutmix_alpha=0)")
    if not backbone_is_deterministic(model):
        obstacles.append("the backbone runs dropout or drop-path before the head")
    if strategy.train_bn:
        obstacles.append("strategy.train_bn=true trains BatchNorm in frozen groups")
    return obstacles


def _feature_cache_source(cfg: TrainConfig, model: TransferModel, splits: RawSplits, preprocessing: Preprocessing,
                          precision: Precision, exact: bool, batch_sizes: tuple[int, int]) -> Callable[[Stage], Any]:
    """The data source a stage asks for its inputs: cached-feature loaders where only the head trains and the
    cache is allowed (`exact`: the features are what each epoch would compute), else None (the images)."""
    setting = cfg.trainer.cache_features
    if not resolve_toggle(setting, auto=exact):
        return lambda stage: None
    if not exact:
        log.warning("trainer.cache_features=true: head-only stages train on one centre view per image "
                    "(no augmentation, no backbone dropout)")
    eval_tf = eval_transform(preprocessing, draft=cfg.transforms.draft_decode, normalize=precision.normalize is None)
    batch, eval_batch = batch_sizes  # per process under DDP
    cache_dir = Path(cfg.trainer.cache_dir).expanduser() if cfg.trainer.cache_dir else default_feature_cache()
    memo: dict[tuple[str, ...], Any] = {}  # by the entries' keys (the backbone's weights), never by stage name

    def make(data: Any, size: int, train: bool) -> Any:
        return make_loader(data, size, train=train, num_workers=cfg.trainer.num_workers, seed=cfg.trainer.seed,
                           pin_memory=precision.device.type == "cuda")

    key_extra = (f"{cfg.backbone.source}:{cfg.backbone.name}|{preprocessing}|{precision.device.type}|"
                 f"{precision.amp_dtype}|channels_last={precision.channels_last}")
    unidentified: list[str] = []  # why the data has no content identity: then no stage caches, said once
    parts = [("train", (splits.train, splits.train_labels)), ("val", (splits.val, splits.val_labels))]
    if splits.select is not None:
        parts.append(("select", (splits.select, splits.select_labels)))

    def for_stage(stage: Stage) -> Any:
        if set(stage.lrs) != {HEAD} or unidentified:
            return None
        try:
            # DDP: every rank computes all features; each trains and validates on its share
            return cached_splits(
                model, {name: (TransformedDataset(data, eval_tf), labels) for name, (data, labels) in parts}, make,
                train_weights=_sampling(cfg, splits),
                batch_size=batch,
                eval_batch_size=eval_batch, seed=cfg.trainer.seed, precision=precision, key_extra=key_extra,
                cache_dir=cache_dir, memo=memo, shard=(distributed.rank(), distributed.world_size()))
        except NoIdentity as why:
            unidentified.append(str(why))
            log.log(logging.INFO if is_auto(setting) else logging.WARNING,
                    "feature cache off: %s; head-only stages run the backbone on every image", why)
            return None

    return for_stage
