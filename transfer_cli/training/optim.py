"""Optimizer and per-stage schedulers for staged training.

Parameter groups are keyed by (layer group, kind). A layer group's parameters enter the
optimizer the first time a stage trains them, so the optimizer never holds a frozen
parameter, and unfreezing at a stage boundary keeps the head's Adam state. Weight decay
applies to weights only: biases and normalization parameters get none.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from transfer_cli.config.schema import OPTIMIZER_NAMES, SCHEDULER_NAMES, OptimizerConfig, SchedulerConfig
from transfer_cli.core.registry import Registry
from transfer_cli.models.model import TransferModel
from transfer_cli.training.strategies import Stage, frozen_batchnorms


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)

KINDS = ("decay", "no_decay", "norm", "bn")

OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer", "optimizer.name", OPTIMIZER_NAMES)


def _fused(groups: list[dict]) -> bool:
    """Fused Adam kernels (CPU and CUDA): one kernel per step instead of one per tensor."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])


@OPTIMIZERS.register("adam")
def _adam(groups: list[dict], cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.Adam(groups, betas=tuple(cfg.betas), fused=_fused(groups))


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), fused=_fused(groups))


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], cfg: OptimizerConfig) -> Optimizer:
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _param_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name -> 'decay' | 'no_decay' | 'norm' | 'bn' (BatchNorm: what train_bn trains)."""
    kinds = {}
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                kinds[full] = "bn"
            elif isinstance(module, NORM_TYPES):
                kinds[full] = "norm"
            else:
                kinds[full] = "decay" if param.ndim > 1 else "no_decay"
    return kinds


class StagedOptimizer:
    """Owns the optimizer and moves it from stage to stage without rebuilding it."""

    def __init__(self, model: TransferModel, cfg: OptimizerConfig, first: Stage, train_bn: bool) -> None:
        self.model = model
        self.cfg = cfg
        self.train_bn = train_bn
        self._params = dict(model.model.named_parameters())
        self._kinds = _param_kinds(model.model)
        self.optimizer = OPTIMIZERS.get(cfg.name)(self._new_groups(self._wanted(first), set()), cfg)
        self.enter(first)

    def _wanted(self, stage: Stage) -> dict[tuple[str, str], float]:
        """(layer group, kind) -> lr for everything `stage` trains."""
        wanted = {(group, kind): lr for group, lr in stage.lrs.items() for kind in KINDS}
        if self.train_bn:
            owner = {id(self._params[name]): group.name for group in self.model.groups for name in group.params}
            top = max(stage.lrs.values())
            for module in frozen_batchnorms(self.model, stage):
                for param in module.parameters(recurse=False):
                    wanted[(owner[id(param)], "bn")] = top
        return wanted

    def _new_groups(self, wanted: dict[tuple[str, str], float], present: set[tuple[str, str]]) -> list[dict]:
        groups = []
        for group in self.model.groups:
            for kind in KINDS:
                key = (group.name, kind)
                if key in present or key not in wanted:
                    continue
                params = [self._params[n] for n in group.params if self._kinds[n] == kind]
                if params:
                    decay = self.cfg.weight_decay if kind == "decay" else 0.0
                    groups.append({"params": params, "lr": 0.0, "weight_decay": decay,
                                   "layer_group": group.name, "kind": kind})
        return groups

    def enter(self, stage: Stage) -> None:
        """Add the param groups `stage` unfreezes and set every group's lr for it."""
        wanted = self._wanted(stage)
        present = {(group["layer_group"], group["kind"]) for group in self.optimizer.param_groups}
        for group in self._new_groups(wanted, present):
            self.optimizer.add_param_group(group)
        for group in self.optimizer.param_groups:
            group["lr"] = wanted.get((group["layer_group"], group["kind"]), 0.0)
            for key in ("initial_lr", "max_lr", "min_lr"):
                group.pop(key, None)

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups if group["lr"] > 0 for p in group["params"]]

    def lrs_by_group(self) -> dict[str, float]:
        """Current lr of every layer group in the optimizer (the decay kind's, else any)."""
        lrs: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            if group["kind"] not in ("norm", "bn") or group["layer_group"] not in lrs:
                lrs[group["layer_group"]] = float(group["lr"])
        return lrs


SCHEDULERS: Registry[Callable[..., LRScheduler]] = Registry("scheduler", "scheduler.name", SCHEDULER_NAMES)


@SCHEDULERS.register("onecycle")
def _onecycle(optimizer: Optimizer, total_steps: int, cfg: SchedulerConfig) -> LRScheduler:
    """The lesson's OneCycleLR: warm up for `warmup_pct` of the stage, then cosine decay."""
    max_lrs = [group["lr"] for group in optimizer.param_groups]
    steps = max(total_steps, 2)
    # OneCycleLR divides by (warmup steps - 1) and by the annealing length: keep both non-zero.
    warmup = min(max(cfg.warmup_pct, 1.5 / steps), 1 - 0.5 / steps)
    return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=steps, pct_start=warmup, cycle_momentum=False)


@SCHEDULERS.register("cosine")
def _cosine(optimizer: Optimizer, total_steps: int, cfg: SchedulerConfig) -> LRScheduler:
    warmup = int(total_steps * cfg.warmup_pct)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("constant")
def _constant(optimizer: Optimizer, total_steps: int, cfg: SchedulerConfig) -> LRScheduler:
    return LambdaLR(optimizer, lambda step: 1.0)


def build_scheduler(optimizer: Optimizer, cfg: SchedulerConfig, total_steps: int) -> LRScheduler:
    """A scheduler covering one stage of `total_steps` optimizer steps."""
    return SCHEDULERS.get(cfg.name)(optimizer, total_steps, cfg)
