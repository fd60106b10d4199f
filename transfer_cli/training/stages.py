"""A strategy resolved against a model's layer groups, and a stage entered: everything a stage boundary does.

`plan_stages` turns a strategy's YAML stages into `Stage`s (which groups train, at which lr, with
which BatchNorm policy); `choose_by_size` picks the strategy of a size table (`auto`). The
`StagedOptimizer` keys its parameter groups by (layer group, kind): a layer group's parameters
enter the optimizer the first time a stage trains them, so the optimizer never holds a frozen
parameter, and unfreezing at a stage boundary keeps the head's Adam state; weight decay applies to
weights only. `enter_stage` (what fit, resume and the benchmarks all do at a boundary) freezes and
unfreezes (freezing.py), moves the optimizer and returns the `StageRun` its epochs use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.config.loading import load_strategy, strategy_file
from transfer_cli.config.schema import OptimizerConfig, SchedulerConfig, StageConfig, StrategyConfig, TrainerConfig
from transfer_cli.config.stage_epochs import scale_epochs
from transfer_cli.core.errors import TransferError
from transfer_cli.data.loaders import steps_per_epoch
from transfer_cli.models.model import HEAD, TransferModel
from transfer_cli.models.runtime import Precision
from transfer_cli.parallel import distributed
from transfer_cli.runs.frozen import FrozenStore
from transfer_cli.training.compiled import CompileWatch, compile_for_stage
from transfer_cli.training.feature_cache import CachedSplits
from transfer_cli.training.freezing import Stage, apply_stage, frozen_batchnorms, reestimate_batchnorm
from transfer_cli.training.loop import Accumulation, StepRunner
from transfer_cli.training.optim import OPTIMIZERS, build_scheduler
from transfer_cli.training.state import Progress


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- a strategy resolved


def plan_stages(strategy: StrategyConfig, model: TransferModel, total_epochs: int | None,
                lr_scale: float = 1.0, pretrained: bool = True, per_stage: int | None = None) -> list[Stage]:
    """Resolve every stage of `strategy`; `total_epochs` rescales the stage lengths, or `per_stage` sets each.

    BatchNorm's default policy follows the weights: pretrained running statistics are worth keeping
    (`frozen_stats`, docs/batchnorm.md); a random init's are not, so they train.
    """
    default_bn = "frozen_stats" if pretrained else "train"
    if not strategy.stages:
        raise TransferError(f"strategy '{strategy.name}' has no stages: give it at least one under strategy.stages")
    epochs = scale_epochs([stage.epochs for stage in strategy.stages], total_epochs, per_stage)
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
        selected = [(_selected_groups([key], model), float(lr)) for key, lr in stage.lrs.items()]  # errors in order
        chosen = {name: lr for names, lr in reversed(selected) for name in names}  # the first key to select one wins
        lrs = {group.name: chosen[group.name] for group in model.groups if group.name in chosen}
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


# --------------------------------------------------------------------------- the optimizer's groups


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)

KINDS = ("decay", "no_decay", "norm", "bn")



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


# --------------------------------------------------------------------------- a stage entered


@dataclass
class FitSetup:
    """Everything `fit` needs, built once by assemble.py. Not frozen: its parts are live training state (weights,
    optimizer groups, the frozen store), though which parts they are never changes."""

    model: TransferModel
    stages: list[Stage]
    optimizer: StagedOptimizer
    scheduler_cfg: SchedulerConfig
    runner: StepRunner
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    run_dir: Path
    select_loader: DataLoader | None = None  # the selection split's, where the run holds one out
    train_bn: bool = False  # strategy.train_bn
    # limits, checkpoints, accumulation, early stopping, compile, log_every
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # config, classes: saved with weights
    stage_data: Callable[[Stage], CachedSplits | None] = lambda stage: None  # cached features for a head-only stage
    frozen_store: FrozenStore = field(default_factory=FrozenStore)  # the untrained tensors, written once per run
    started: float = field(default_factory=time.perf_counter)  # when this process began the run (wall_time_s)

    @property
    def check_every(self) -> int:
        """Steps between the host syncs that check the loss is finite: every step on the CPU (a sync costs
        nothing there), else trainer.log_every."""
        return 1 if self.runner.precision.device.type == "cpu" else max(1, self.trainer.log_every)

    def accumulation(self, loader: DataLoader) -> Accumulation:
        """An epoch over `loader`: its batches (all, or trainer.limit_train_batches) and their optimizer steps."""
        full, limit = steps_per_epoch(loader), self.trainer.limit_train_batches
        return Accumulation(min(full, limit) if limit else full, self.trainer.accumulate_steps)


@dataclass
class StageRun:
    """One stage as its epochs run it: the runner (DDP-wrapped, compiled, or the head alone on cached
    features), the data it trains on, and the stage's schedule (which steps as the epochs run)."""

    index: int
    stage: Stage
    runner: StepRunner
    train_loader: DataLoader
    scheduler: Any
    cached: CachedSplits | None = None
    compiled: CompileWatch | None = None  # trainer.compile=true: what torch.compile did in this stage


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def enter_stage(setup: FitSetup, progress: Progress, index: int, fresh: bool = True) -> StageRun:
    """Freeze and unfreeze for stage `index` and return how its epochs run; `fresh` (not rebuilding a
    resumed run, whose checkpoint holds the BatchNorm stats) re-estimates them where the stage's policy says so."""
    return stage_run(setup, index, prepare_stage(setup, progress, index, fresh))


def stage_run(setup: FitSetup, index: int, scheduler: Any) -> StageRun:
    """The runner and data of an entered stage (a resumed one's after its weights are loaded: the cached
    features are computed from them)."""
    stage = setup.stages[index]
    cached = setup.stage_data(stage)
    forward, watch = _stage_forward(setup, stage, cached)
    # cached features are (batch, channels) tensors: no memory format to choose
    precision = setup.runner.precision if cached is None else replace(setup.runner.precision, channels_last=False)
    runner = replace(setup.runner, model=forward, precision=precision)
    train_loader = setup.train_loader if cached is None else cached.train_loader
    return StageRun(index, stage, runner, train_loader, scheduler, cached, watch)


def _stage_forward(setup: FitSetup, stage: Stage, cached: CachedSplits | None) -> tuple[nn.Module, CompileWatch | None]:
    """What the stage's steps run forward: the head on cached features, else the network; DDP-wrapped after the
    stage's freezing (DDP syncs only the parameters that now require grad); with trainer.compile, compiled
    afresh (compiled.py says why)."""
    device = setup.runner.precision.device
    if cached is not None:
        return (distributed.wrap(cached.head, device) if distributed.active() else cached.head), None
    forward = distributed.wrap(setup.model.model, device) if distributed.active() else setup.runner.model
    if setup.trainer.compile:
        return compile_for_stage(forward, stage.name)
    return forward, None


def prepare_stage(setup: FitSetup, progress: Progress, index: int, fresh: bool) -> Any:
    """The part of entering a stage that a resume repeats for every stage before its own: the frozen
    groups, the BatchNorm policy, the optimizer's groups; returns the stage's scheduler."""
    stage = setup.stages[index]
    apply_stage(setup.model, stage, setup.train_bn)
    if fresh and stage.bn == "reestimate":
        loader = setup.train_loader
        count, images = reestimate_batchnorm(setup.model, stage, loader.dataset, loader.batch_size,
                                             loader.num_workers, setup.runner.precision)
        log.info("stage '%s': re-estimated the running stats of %d BatchNorm layers on %d training images",
                 stage.name, count, images)
    setup.optimizer.enter(stage)
    trainable = count_trainable(setup.model.model)
    progress.params_trainable[stage_labels(setup.stages)[index]] = trainable
    log.info("stage %d/%d '%s': %d epochs, trainable %s (%d params)", index + 1, len(setup.stages), stage.name,
             stage.epochs, ", ".join(f"{g}@{lr:g}" for g, lr in stage.lrs.items()), trainable)
    steps = stage.epochs * setup.accumulation(setup.train_loader).steps
    return build_scheduler(setup.optimizer.optimizer, setup.scheduler_cfg, steps)


def stage_labels(stages: list[Stage]) -> list[str]:
    """Each stage's key in params_trainable: its name, or, where an earlier stage took that name, the name with
    the first free `#k` (head, all, head#2), so a strategy that repeats a name keeps one count per stage."""
    labels: list[str] = []
    for stage in stages:
        label, k = stage.name, 1
        while label in labels:
            k += 1
            label = f"{stage.name}#{k}"
        labels.append(label)
    return labels


def validation_target(setup: FitSetup, run: StageRun) -> tuple[nn.Module, dict[str, DataLoader], Precision]:
    """What an epoch of `run` validates (the EMA where there is one), on which data (split name -> loader: the
    selection split first where there is one, then val), at which precision.

    On cached features the head runs alone. The EMA's head may use them only while the EMA's backbone
    equals the live one (an average of weights frozen since the EMA began is those weights); after a stage
    that trained the backbone it lags behind, and the whole EMA runs on the images.
    """
    ema, cached = setup.runner.ema, run.cached
    on_images = _eval_loaders(setup.select_loader, setup.val_loader)
    if cached is None:
        return run.runner.eval_network(), on_images, setup.runner.precision
    on_features = _eval_loaders(cached.select_loader, cached.val_loader)
    if ema is None:
        return cached.head, on_features, run.runner.precision
    if _same_backbone(setup.model, ema.module):
        return ema.module.get_submodule(setup.model.head_path), on_features, run.runner.precision
    return ema.module, on_images, setup.runner.precision


def _eval_loaders(select: DataLoader | None, val: DataLoader) -> dict[str, DataLoader]:
    return {"select": select, "val": val} if select is not None else {"val": val}


def _same_backbone(model: TransferModel, other: nn.Module) -> bool:
    """Whether `other` (the same architecture) computes the head's input as `model` does: every floating-point
    tensor outside the head equal (integer buffers, BatchNorm's batch counter, never enter an eval forward)."""
    head = model.head_path + "."
    theirs = other.state_dict()
    return all(torch.equal(tensor, theirs[name]) for name, tensor in model.model.state_dict().items()
               if not name.startswith(head) and tensor.is_floating_point())
