"""The optimizers and the per-stage schedulers a config names (the staged optimizer's groups: stages.py)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from transfer_cli.config.schema import OPTIMIZER_NAMES, SCHEDULER_NAMES, OptimizerConfig, SchedulerConfig
from transfer_cli.core.registry import Registry


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


def mean_factor(cfg: SchedulerConfig, total_steps: int) -> float:
    """The mean, over a stage of `total_steps` steps, of the multiplier `cfg`'s schedule puts on each group's
    stated lr (its peak): read off the scheduler itself, stepped on a stand-in parameter, so every schedule's
    warmup and decay count as they run (OneCycle with 10% warmup: about 0.5)."""
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(stand_in, cfg, total_steps)
    total = 0.0
    for _ in range(max(total_steps, 1)):
        total += stand_in.param_groups[0]["lr"]
        stand_in.step()
        scheduler.step()
    return total / max(total_steps, 1)
