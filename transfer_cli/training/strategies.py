"""Interpret a strategy (stages written in YAML) against a model's layer groups.

A stage resolves to a map {group name: lr} of the groups that train; every other group
is frozen: `requires_grad=False` (unless `train_bn`, which trains its BatchNorm affine
params) and every module of it in eval mode, so dropout, stochastic depth and BatchNorm
statistics act as at inference. The stage's BatchNorm policy (`bn`) decides what BatchNorm
does in the groups that train: `train` uses batch statistics and updates running ones;
`frozen_stats` keeps every BatchNorm in eval mode (running stats never change, affine params
train with their group); `reestimate` does that after re-estimating the running stats once,
on entering the stage, on the training images (docs/batchnorm.md has the evidence).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transfer_cli.config.loading import load_strategy, strategy_file
from transfer_cli.config.schema import StageConfig, StrategyConfig
from transfer_cli.config.stage_epochs import scale_epochs
from transfer_cli.core.errors import TransferError
from transfer_cli.models.model import HEAD, LayerGroup, TransferModel
from transfer_cli.models.runtime import Precision


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    lrs: dict[str, float]  # trainable group -> lr, ordered from stem to head
    bn: str = "frozen_stats"  # BatchNorm policy: frozen_stats | reestimate | train


def plan_stages(strategy: StrategyConfig, model: TransferModel, total_epochs: int | None,
                lr_scale: float = 1.0, pretrained: bool = True) -> list[Stage]:
    """Resolve every stage of `strategy`; `total_epochs` rescales the stage lengths.

    BatchNorm's default policy follows the weights: pretrained running statistics are worth keeping
    (`frozen_stats`, docs/batchnorm.md); a random init's are not, so they train.
    """
    default_bn = "frozen_stats" if pretrained else "train"
    if not strategy.stages:
        raise TransferError(f"strategy '{strategy.name}' has no stages: give it at least one under strategy.stages")
    epochs = scale_epochs([stage.epochs for stage in strategy.stages], total_epochs)
    return [
        Stage(stage.name, count, {g: lr * lr_scale for g, lr in _stage_lrs(stage, strategy, model).items()},
              stage.bn or strategy.bn or default_bn)
        for stage, count in zip(strategy.stages, epochs)
    ]


def choose_by_size(strategy: StrategyConfig, train_size: int, domain: str) -> tuple[StrategyConfig, str]:
    """Resolve a size-table strategy (`auto`) to the strategy its table picks, and say why."""
    if not strategy.by_train_size:
        return strategy, ""
    rules = strategy.by_train_size
    row = next((i for i, rule in enumerate(rules) if rule.below is None or train_size < rule.below), len(rules) - 1)
    reason = f"{train_size} training images: " + (
        f"fewer than {rules[row].below}" if rules[row].below is not None else "the largest size class")
    if domain == "far" and row + 1 < len(rules):
        row += 1
        reason += "; dataset.domain=far moves one step toward fine-tuning"
    settings = _settings_to_carry(strategy)
    chosen = replace(load_strategy(rules[row].strategy), **settings)
    if settings:
        reason += "; keeping " + ", ".join(f"strategy.{key}={value}" for key, value in settings.items())
    return chosen, f"{strategy.name} chose {chosen.name}: {reason}"


TABLE_ONLY = {"name", "description", "by_train_size"}


def _settings_to_carry(table: StrategyConfig) -> dict[str, Any]:
    """What the user or an experiment set on a size-table strategy (`strategy.train_bn=true`, say),
    which the strategy it picks must keep; stages cannot be both given and picked."""
    if table.stages:
        raise TransferError(f"strategy={table.name} picks its stages by data size: drop strategy.stages, "
                            "or choose a strategy (e.g. strategy=gradual) and give it stages")
    own = load_strategy(table.name) if strategy_file(table.name).is_file() else StrategyConfig(name=table.name)
    return {spec.name: getattr(table, spec.name) for spec in fields(StrategyConfig)
            if spec.name not in TABLE_ONLY | {"stages"} and getattr(table, spec.name) != getattr(own, spec.name)}


def _selected_groups(selectors: list[str], model: TransferModel) -> list[str]:
    names = [group.name for group in model.groups]
    chosen: set[str] = set()
    for selector in selectors:
        if selector == "all":
            chosen.update(names)
        elif selector.startswith("last:"):
            count = _parse_count(selector)
            body = names[:-1]
            chosen.update(body[len(body) - min(count, len(body)):] + [HEAD])
        else:
            chosen.add(model.group(selector).name)
    return [name for name in names if name in chosen]


def _parse_count(selector: str) -> int:
    try:
        count = int(selector.split(":", 1)[1])
    except ValueError:
        count = -1
    if count < 0:
        raise TransferError(f"bad group selector '{selector}': write last:N with N >= 0")
    return count


def _stage_lrs(stage: StageConfig, strategy: StrategyConfig, model: TransferModel) -> dict[str, float]:
    if stage.lrs is not None:
        lrs = {model.group(name).name: float(lr) for name, lr in stage.lrs.items()}
        order = [group.name for group in model.groups]
        lrs = {name: lrs[name] for name in order if name in lrs}
    else:
        base = stage.lr if stage.lr is not None else strategy.lr
        trained = _selected_groups(stage.train, model)
        if stage.lr_decay is None:
            lrs = {name: float(base) for name in trained}
        else:
            depth = len(trained) - 1
            lrs = {name: float(base) * stage.lr_decay ** (depth - i) for i, name in enumerate(trained)}
    bad = [f"{name}={lr}" for name, lr in lrs.items() if not lr > 0]
    if bad:
        raise TransferError(f"stage '{stage.name}' of strategy '{strategy.name}' has lr <= 0 ({', '.join(bad)}): use "
                            "positive rates")
    if not lrs:
        raise TransferError(f"stage '{stage.name}' of strategy '{strategy.name}' trains no layer group: name some in "
                            "its train list")
    return lrs


def apply_stage(model: TransferModel, stage: Stage, train_bn: bool) -> None:
    """Set `requires_grad` so exactly the stage's groups (and, with train_bn, BN affine params) train."""
    params = dict(model.model.named_parameters())
    for group in model.groups:
        trainable = group.name in stage.lrs
        for name in group.params:
            params[name].requires_grad_(trainable)
    if train_bn:
        for module in frozen_batchnorms(model, stage):
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)


def frozen_batchnorms(model: TransferModel, stage: Stage) -> list[nn.Module]:
    """BatchNorm layers whose parameters belong to groups the stage freezes."""
    frozen = {name for group in model.groups if group.name not in stage.lrs for name in group.params}
    return [
        module for path, module in model.model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and any(f"{path}.{name}" in frozen for name, _ in module.named_parameters(recurse=False))
    ]


def frozen_modules(model: TransferModel, stage: Stage) -> list[nn.Module]:
    """Modules that compute for frozen groups: those whose parameters all belong to them, and each
    parameter-free leaf (dropout, stochastic depth, pooling) whose output feeds a frozen parameter first."""
    frozen = {name for group in model.groups if group.name not in stage.lrs for name in group.params}
    found: list[nn.Module] = []
    waiting: list[nn.Module] = []  # parameter-free leaves since the last leaf with parameters
    for path, module in model.model.named_modules():
        names = [f"{path}.{name}" if path else name for name, _ in module.named_parameters()]
        if names and all(name in frozen for name in names):
            found.append(module)
        is_leaf = next(module.children(), None) is None
        if is_leaf and not names:
            waiting.append(module)
        elif is_leaf:
            found.extend(waiting if names[0] in frozen else [])
            waiting = []
    return found


def hold_frozen_batchnorm(model: TransferModel, stage: Stage) -> None:
    """Call after `model.train()`: frozen groups run as at inference; with `frozen_stats` or
    `reestimate`, so does every BatchNorm (its running stats stay as they are)."""
    for module in frozen_modules(model, stage):
        module.eval()
    if stage.bn != "train":
        for module in model.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.no_grad()
def reestimate_batchnorm(model: TransferModel, data: Dataset, batch_size: int, num_workers: int,
                         precision: Precision) -> tuple[int, int]:
    """Replace every BatchNorm's running stats by their average over the full batches of `data` (one
    pass in order, momentum=None, the rest of the model in eval mode); returns (layers, images). Leaves
    the global RNG where it was, so a run's dropout and MixUp streams do not depend on the policy."""
    norms = [m for m in model.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, drop_last=len(data) > batch_size)
    was_training = model.model.training
    momenta = [norm.momentum for norm in norms]
    model.model.eval()
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.random.fork_rng(devices=[precision.device] if precision.device.type == "cuda" else []):
            for images, labels in loader:
                images, _ = precision.to_device(images, labels)
                with precision.autocast():
                    model.model(images)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.model.train(was_training)
    return len(norms), min(len(data), len(loader) * batch_size)


def group_of(groups: list[LayerGroup]) -> dict[str, str]:
    """Parameter name -> layer group name."""
    return {param: group.name for group in groups for param in group.params}
