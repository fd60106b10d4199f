"""One training epoch and one evaluation pass, and how an epoch's batches make optimizer steps; `fit` owns
the rest.

Metrics accumulate on the device and are read at the end of an epoch; the only host sync
inside the loop is the finite-loss check every `check_every` steps.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from transfer_cli.core.errors import TransferError
from transfer_cli.inference.topk import topk_for, topk_hits
from transfer_cli.models.runtime import Precision
from transfer_cli.parallel import distributed
from transfer_cli.training.epoch_progress import EpochProgress


class NonFiniteLoss(TransferError):
    """The loss became NaN or inf: training stops and keeps the last good checkpoint."""


class Tally:
    """Running sums of loss and top-k hits, kept on the device; resumable mid-epoch."""

    def __init__(self, device: torch.device, topk: tuple[int, ...]) -> None:
        self.topk = topk
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.hits = torch.zeros(len(topk), device=device, dtype=torch.float64)
        self.nonfinite = torch.zeros((), device=device, dtype=torch.int64)
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.size(0)
        loss = loss.detach()
        self.nonfinite += (~torch.isfinite(loss)).long()
        self.loss += loss.double() * n
        self.hits += topk_hits(logits.detach().float(), labels, self.topk)[0].double()
        self.count += n

    def result(self, prefix: str) -> dict[str, float]:
        n = max(self.count, 1)
        metrics = {f"{prefix}/loss": self.loss.item() / n}
        for k, hits in zip(self.topk, self.hits.tolist()):
            metrics[f"{prefix}/acc{k}"] = hits / n
        return metrics

    def reduced(self) -> "Tally":
        """The sums over every process of a DDP run (all must call it); this tally itself in one process."""
        if not distributed.active():
            return self
        count = torch.tensor([float(self.count)], device=self.loss.device, dtype=torch.float64)
        packed = distributed.all_reduce_sum(torch.cat([self.loss.reshape(1), self.hits, count]))
        total = Tally(self.loss.device, self.topk)
        total.loss, total.hits, total.count = packed[0], packed[1:-1], int(packed[-1].item())
        return total

    def any_nonfinite(self) -> bool:
        """A non-finite loss so far, on any process (a host sync; under DDP a collective)."""
        if not distributed.active():
            return bool(self.nonfinite.item())
        return bool(distributed.all_reduce_sum(self.nonfinite.clone()).item())

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.cpu(), "hits": self.hits.cpu(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss = state["loss"].to(self.loss.device)
        self.hits = state["hits"].to(self.hits.device)
        self.count = int(state["count"])


class EMA(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of a network's parameters and buffers: AveragedModel with
    `get_ema_multi_avg_fn(decay)` and `use_buffers=True` (the same numbers, the same state_dict), whose
    update never waits for the device.

    AveragedModel keeps its counter `n_averaged` on the CPU unless built with `device=`, and copies it to
    the device for every dtype group each step (a blocking copy), or, on the device, reads it each step to
    decide whether to copy or average: either way the host waits for the device every step. Here the counter
    lives beside the weights and is only added to; the host remembers whether the average has begun (read
    back once after `load_state_dict`).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        device = next(model.parameters()).device
        super().__init__(model, device=device, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay),
                         use_buffers=True)
        self.decay = decay
        self._begun: bool | None = False  # n_averaged > 0, known on the host (None: read it at the next update)
        self.register_load_state_dict_post_hook(EMA._forget_begun)

    @staticmethod
    def _forget_begun(module: nn.Module, incompatible_keys: Any) -> None:
        module._begun = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Copy `model` at the first update, then average it in: lerp towards it by 1 - decay, per dtype
        group as AveragedModel does (integer buffers, BatchNorm's batch counter: decay-weighted and truncated)."""
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [tensor.detach() for tensor in (*model.parameters(), *model.buffers())]
        if len(averaged) != len(current):
            raise ValueError(f"EMA: the network has {len(current)} tensors, the average {len(averaged)}")
        if self._begun is None:
            self._begun = bool(self.n_averaged.item() > 0)  # once, after loading a state
        if not self._begun:
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)
            self._begun = True
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for mine, theirs in zip(averaged, current):
                group = groups.setdefault((mine.device, mine.dtype), ([], []))
                group[0].append(mine)
                group[1].append(theirs.to(mine.device))
            for mine_group, theirs_group in groups.values():
                self.multi_avg_fn(mine_group, theirs_group, self.n_averaged)
        self.n_averaged += 1


class Group(NamedTuple):
    """A batch's place in its optimizer step: part `part` of the `parts` batches whose mean gradient makes it."""

    part: int = 0
    parts: int = 1

    @property
    def opens(self) -> bool:
        """The step's first batch: it clears the gradients."""
        return self.part == 0

    @property
    def closes(self) -> bool:
        """The step's last batch: it all-reduces (DDP), clips, steps and updates the EMA."""
        return self.part == self.parts - 1

    def share(self, loss: torch.Tensor) -> torch.Tensor:
        """What this batch backpropagates: loss / parts, so the step sees the mean over its batches."""
        return loss / self.parts if self.parts > 1 else loss


@dataclass(frozen=True)
class Accumulation:
    """How an epoch's batches make optimizer steps (trainer.accumulate_steps): groups of `per_step` batches counted
    from the epoch's start, and a shorter last group where `batches` is no multiple (the mean of its own batches).
    Schedules and the EMA count optimizer steps; progress, limit_train_batches and checkpoint_every_steps count
    batches."""

    batches: int  # in the epoch: its loader's, or trainer.limit_train_batches
    per_step: int = 1

    @property
    def steps(self) -> int:
        """Optimizer steps in the epoch."""
        return -(-self.batches // self.per_step)

    def group(self, batch: int) -> Group:
        """Where batch `batch` (0-based, from the epoch's start) stands in its optimizer step."""
        first = batch - batch % self.per_step
        return Group(batch - first, min(self.per_step, self.batches - first))

    def reaches(self, done: int, every: int) -> bool:
        """Whether the optimizer step that ends after `done` batches passes a multiple of `every` batches: what
        counts in batches (checkpoint_every_steps, DDP's stop checks) acts at the step that covers it."""
        first = (done - 1) - (done - 1) % self.per_step
        return done // every > first // every


EVERY_BATCH = Accumulation(sys.maxsize)  # one optimizer step per batch, for as many batches as the loader yields
ALONE = Group()  # a batch that makes an optimizer step by itself


@dataclass
class StepRunner:
    """One batch: forward under autocast, backward (scaled); at the last batch of an optimizer step, clip,
    step, EMA. Its parts are live training state; each stage runs a copy (dataclasses.replace) whose `model`
    is what that stage runs forward."""

    model: nn.Module  # what runs forward (compiled or not)
    optimizer: Optimizer
    loss_fn: nn.Module
    precision: Precision
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float | None = None
    ema: EMA | None = None
    # what the EMA averages: the whole network, also where `model` is its compiled or DDP wrapper,
    # or its head alone on cached features (the frozen rest still enters the average, as uncached)
    averaged: nn.Module | None = None
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.ema is not None and self.averaged is None:
            raise ValueError("StepRunner: an EMA needs `averaged`, the whole network it averages")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, tally: Tally, group: Group = ALONE) -> None:
        """One batch of `group`'s optimizer step; under DDP only the step's last batch all-reduces (no_sync before)."""
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        with contextlib.nullcontext() if group.closes else _no_sync(self.model):
            with self.precision.autocast():
                logits = self.model(images)
                loss = self.loss_fn(logits, targets)
            if group.opens:
                self.optimizer.zero_grad(set_to_none=True)
            share = group.share(loss)
            if self.scaler is not None:
                self.scaler.scale(share).backward()
            else:
                share.backward()
        if group.closes:
            self._step()
        tally.add(loss, logits, labels)

    def eval_network(self) -> nn.Module:
        """What validation runs: the EMA, else the network this runner trains, without its DDP wrapper (shards are
        uneven) and never compiled (an inference-mode forward and a ragged last batch would add recompiles to
        the training graph's)."""
        if self.ema is not None:
            return self.ema.module
        return distributed.unwrap(getattr(self.model, "_orig_mod", self.model))

    def _step(self) -> None:
        """The optimizer step over the accumulated gradients (unscaled, clipped), then the EMA."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.averaged)


def _no_sync(model: nn.Module) -> Any:
    """DDP's no_sync (its gradients stay local until the last batch of a step), also through torch.compile;
    a no-op context for any other module."""
    wrapped = getattr(model, "_orig_mod", model)
    return wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) else contextlib.nullcontext()


def train_one_epoch(
    runner: StepRunner,
    loader: DataLoader,
    scheduler: LRScheduler,
    tally: Tally,
    *,
    start_step: int = 0,
    on_step: Callable[[int], None] = lambda step: None,
    check_every: int = 1,
    description: str = "train",
    progress: EpochProgress | None = None,
    accumulation: Accumulation = EVERY_BATCH,
) -> dict[str, float]:
    """Train over `loader` (already positioned at `start_step`) until the epoch's `accumulation.batches`,
    stepping the optimizer and `scheduler` at the end of each of its groups.

    A step here is one batch (`start_step`, `check_every`, `progress`). `on_step(step)` runs after every
    optimizer step, with the batches done (mid-epoch checkpoints, interrupts: only there do the weights,
    optimizer and schedule stand at a whole step); `progress` shows the epoch to a person (a bar, or log
    lines), else a plain tqdm bar titled `description`. The caller sets train mode and holds frozen
    BatchNorm in eval mode before calling.
    """
    start = time.perf_counter()
    counted = tally.count
    step = start_step
    batches = progress.wrap(loader) if progress else tqdm(loader, desc=description, leave=False, disable=None)
    for images, labels in batches:
        if step >= accumulation.batches:  # trainer.limit_train_batches
            break
        images, labels = runner.precision.to_device(images, labels)
        group = accumulation.group(step)
        runner(images, labels, tally, group)
        step += 1
        if group.closes:
            scheduler.step()
        if step % check_every == 0 and tally.any_nonfinite():
            raise NonFiniteLoss(f"non-finite loss at step {step}")
        if group.closes:
            on_step(step)
        if progress:
            progress.step(step, tally)
    if tally.any_nonfinite():
        raise NonFiniteLoss(f"non-finite loss at or before step {step}")
    total = tally.reduced()  # DDP: every process's images
    metrics = total.result("train")
    seconds = time.perf_counter() - start
    images = (tally.count - counted) * distributed.world_size()  # every process runs the same steps and batch
    metrics["train/seconds"] = seconds
    metrics["train/images_per_s"] = images / seconds if seconds > 0 else 0.0
    return metrics


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, precision: Precision,
             num_classes: int, prefix: str = "val", on_batch: Callable[[], None] = lambda: None,
             max_batches: int | None = None) -> dict[str, float]:
    """Loss and top-1 (and top-5 with 5+ classes) over `loader` (its first `max_batches`), in eval mode.

    `on_batch()` runs after every batch (an interrupt can stop a long pass). A NaN or infinite
    loss on any batch raises NonFiniteLoss: such a model's figures are not numbers to record.
    """
    was_training = model.training
    model.eval()
    tally = Tally(precision.device, topk_for(num_classes))
    start = time.perf_counter()
    try:
        for batch, (images, labels) in enumerate(tqdm(loader, desc=prefix, leave=False, disable=None)):
            if max_batches is not None and batch >= max_batches:  # trainer.limit_val_batches
                break
            images, labels = precision.to_device(images, labels)
            with precision.autocast():
                logits = model(images)
                loss = loss_fn(logits, labels)
            tally.add(loss, logits, labels)
            on_batch()
    finally:
        model.train(was_training)
    if tally.any_nonfinite():  # DDP: a collective, and every process gets the same answer
        raise NonFiniteLoss(f"non-finite {prefix} loss")
    metrics = tally.reduced().result(prefix)  # DDP: each process saw its shard
    metrics[f"{prefix}/seconds"] = time.perf_counter() - start
    return metrics
