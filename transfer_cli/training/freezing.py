"""What a stage does to the network: the groups it trains train, every other group is frozen.

A resolved stage (`Stage`) is a map {group name: lr} of the groups that train; every other group
is frozen: `requires_grad=False` (unless `train_bn`, which trains its BatchNorm affine
params) and every module of it in eval mode, so dropout, stochastic depth and BatchNorm
statistics act as at inference. The stage's BatchNorm policy (`bn`) decides what BatchNorm
does in the groups that train: `train` uses batch statistics and updates running ones;
`frozen_stats` keeps every BatchNorm in eval mode (running stats never change, affine params
train with their group); `reestimate` does that after re-estimating the running stats once,
on entering the stage, on the training images (docs/batchnorm.md has the evidence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transfer_cli.models.model import LayerGroup, TransferModel
from transfer_cli.models.runtime import Precision


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    lrs: dict[str, float]  # trainable group -> lr, ordered from stem to head
    bn: str = "frozen_stats"  # BatchNorm policy: frozen_stats | reestimate | train


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
def reestimate_batchnorm(model: TransferModel, stage: Stage, data: Dataset, batch_size: int, num_workers: int,
                         precision: Precision) -> tuple[int, int]:
    """Replace the running stats of every BatchNorm in a group `stage` trains by their average over the full
    batches of `data` (one pass in order, momentum=None, the rest of the model in eval mode); a frozen group's
    stay the pretrained ones, as frozen means. Returns (layers, images). Leaves the global RNG where it was, so
    a run's dropout and MixUp streams do not depend on the policy."""
    frozen = {id(module) for module in frozen_batchnorms(model, stage)}
    norms = [m for m in model.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in frozen]
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
