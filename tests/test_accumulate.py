"""Gradient accumulation (`trainer.accumulate_steps`): k batches of b images make the optimizer step one batch of
k x b makes; schedules and the EMA count optimizer steps; DDP syncs once per step; resume stays exact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from transfer_cli.config.schema import TrainerConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.models.model import HEAD
from transfer_cli.models.runtime import Precision
from transfer_cli.runs import checkpoint
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import fit as trainer
from transfer_cli.training import stages as stages_module
from transfer_cli.training.freezing import Stage
from transfer_cli.training.loop import ALONE, Accumulation, Group, StepRunner, Tally, train_one_epoch
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import comparable, group_names, load_scheduler, make_fit_setup, tiny_resnet


pytestmark = pytest.mark.usefixtures("fresh_feature_cache")


def trained_weights(tmp_path: Path, batch_size: int, accumulate: int, *, train_size: int = 96,
                    scheduler: str = "onecycle", epochs: int = 1) -> dict[str, torch.Tensor]:
    """Every group of a tiny ResNet trained `epochs` epochs; BatchNorm holds its running stats (frozen_stats), so
    a batch's gradient does not depend on how the images are split into batches."""
    model = tiny_resnet(seed=3)
    stage = Stage("all", epochs, {name: 1e-3 for name in group_names(model)}, bn="frozen_stats")
    run_dir = tmp_path / f"b{batch_size}k{accumulate}"
    run_dir.mkdir()
    setup = make_fit_setup(model, [stage], run_dir, batch_size=batch_size, train_size=train_size,
                           scheduler=load_scheduler(scheduler))
    trainer.fit(replace(setup, trainer=TrainerConfig(accumulate_steps=accumulate)))
    return {name: tensor.detach().clone() for name, tensor in model.model.state_dict().items()}


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_two_batches_of_8_step_as_one_batch_of_16(tmp_path: Path, scheduler: str) -> None:
    whole = trained_weights(tmp_path, 16, 1, scheduler=scheduler)
    accumulated = trained_weights(tmp_path, 8, 2, scheduler=scheduler)
    start = tiny_resnet(seed=3).model.state_dict()
    moved = [name for name, tensor in whole.items() if tensor.is_floating_point() and not torch.equal(tensor,
                                                                                                      start[name])]
    assert len(moved) > 10  # the whole network trained, not just the head
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_single_batch_step_is_not_the_accumulated_one(tmp_path: Path) -> None:
    """The comparison above can tell: batches of 8 stepped one by one end elsewhere."""
    whole, alone = trained_weights(tmp_path, 16, 1), trained_weights(tmp_path, 8, 1)
    assert max((whole[n] - alone[n]).abs().max().item() for n in whole if whole[n].is_floating_point()) > 1e-4


class Recorder:
    """A StepRunner stand-in noting which part of which group each batch was."""

    precision = Precision(torch.device("cpu"))

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, tally: Tally, group: Group = ALONE) -> None:
        self.calls.append(tuple(group))
        tally.add(torch.zeros(()), torch.zeros(len(labels), 2), labels)


class CountingScheduler:
    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)) for _ in range(count)]


@pytest.mark.parametrize("total,accumulate,start,limit,groups", [
    (12, 5, 0, None, [5, 5, 2]),  # the last, shorter group is the mean of its own 2 batches and steps too
    (12, 2, 0, None, [2] * 6),
    (12, 5, 10, None, [2]),  # resumed after the 2nd step: the group the uninterrupted run made
    (12, 2, 0, 7, [2, 2, 2, 1]),  # trainer.limit_train_batches=7
    (5, 1, 0, None, [1] * 5),
])
def test_groups_of_an_epoch_and_their_steps(total: int, accumulate: int, start: int, limit: int | None,
                                            groups: list[int]) -> None:
    runner, scheduler, stepped = Recorder(), CountingScheduler(), []
    accumulation = Accumulation(min(total, limit) if limit else total, accumulate)
    train_one_epoch(runner, batches(total - start), scheduler, Tally(torch.device("cpu"), (1,)), start_step=start,
                    on_step=stepped.append, accumulation=accumulation)
    assert runner.calls == [(part, size) for size in groups for part in range(size)]
    assert scheduler.steps == len(groups)
    ends = [start + sum(groups[:i + 1]) for i in range(len(groups))]
    assert stepped == ends  # on_step (checkpoints, interrupts) only where an optimizer step just ended


def test_an_epoch_counts_its_optimizer_steps_and_acts_at_the_step_covering_a_batch_count() -> None:
    """Schedules get the optimizer steps; what counts batches (checkpoint_every_steps=2 here) acts at the step
    whose group passes a multiple of it."""
    assert [Accumulation(batches, 2).steps for batches in (11, 12)] == [6, 6]
    assert Accumulation(5).steps == 5
    three = Accumulation(7, 3)  # groups: batches 1-3, 4-6, 7
    assert [three.reaches(done, 2) for done in (3, 6, 7)] == [True, True, False]
    assert [three.reaches(done, 4) for done in (3, 6, 7)] == [False, True, False]
    assert [Accumulation(4).reaches(done, 2) for done in (1, 2, 3, 4)] == [False, True, False, True]


def runner_pair(scaler: bool = False, ema: bool = False) -> tuple[nn.Module, StepRunner]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    averaged = None
    if ema:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaler else None
    return model, StepRunner(model, optimizer, nn.CrossEntropyLoss(), Precision(torch.device("cpu")), grad_scaler,
                             grad_clip=0.5, ema=averaged, averaged=model if ema else None)


def data(count: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


@pytest.mark.parametrize("scaler", [False, True], ids=["fp32", "grad_scaler"])
def test_runner_halves_equal_the_whole_batch_with_clipping_and_a_grad_scaler(scaler: bool) -> None:
    whole_model, whole = runner_pair(scaler)
    halves_model, halves = runner_pair(scaler)
    tally = Tally(torch.device("cpu"), (1,))
    for images, labels in data():
        whole(images, labels, tally)
        for part in range(2):
            halves(images[part * 8:(part + 1) * 8], labels[part * 8:(part + 1) * 8], tally, Group(part, 2))
    for mine, theirs in zip(halves_model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    if scaler:  # one unscale_ per step: a second one in a step would have raised
        assert halves.scaler.get_scale() == whole.scaler.get_scale()


def test_the_ema_averages_once_per_optimizer_step() -> None:
    _, runner = runner_pair(ema=True)
    tally = Tally(torch.device("cpu"), (1,))
    for index, (images, labels) in enumerate(data(6)):
        runner(images, labels, tally, Group(index % 3, 3))
    assert runner.ema.n_averaged.item() == 2
    assert tally.count == 6 * 16  # the running train metrics still count every batch


def test_ddp_all_reduces_only_on_the_last_batch_of_a_step(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, runner = runner_pair()
        wrapped = DistributedDataParallel(model)
        reductions: list[int] = []

        def counting(state, bucket):  # unannotated: DDP checks a hook's annotations against its own types
            reductions.append(1)
            return default_hooks.allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, counting)
        runner = replace(runner, model=wrapped)
        tally = Tally(torch.device("cpu"), (1,))
        for index, (images, labels) in enumerate(data(6)):
            runner(images, labels, tally, Group(index % 3, 3))
        assert len(reductions) == 2
    finally:
        dist.destroy_process_group()


def test_schedules_count_optimizer_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """88 images in batches of 8: 11 batches an epoch, 6 optimizer steps with 2 per step (the 11th steps alone).
    OneCycle gets exactly the steps taken and ends at its final lr."""
    schedulers: list[tuple[Any, int]] = []
    real = stages_module.build_scheduler

    def keep(optimizer: Any, cfg: Any, total_steps: int) -> Any:
        schedulers.append((real(optimizer, cfg, total_steps), total_steps))
        return schedulers[-1][0]

    monkeypatch.setattr(stages_module, "build_scheduler", keep)
    model = tiny_resnet(seed=3)
    stages = [Stage("head", 2, {HEAD: 1e-2}), Stage("all", 1, {g: 1e-3 for g in group_names(model)})]
    setup = make_fit_setup(model, stages, tmp_path, batch_size=8, train_size=88, scheduler=load_scheduler("onecycle"))
    steps: list[int] = []
    setup.optimizer.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: steps.append(1))
    result = trainer.fit(replace(setup, trainer=TrainerConfig(accumulate_steps=2)))
    assert [total for _, total in schedulers] == [2 * 6, 1 * 6]
    assert len(steps) == 18 == sum(scheduler.last_epoch for scheduler, _ in schedulers)
    # each stage's last step ran at the end of its cycle: max_lr / 25 / 1e4
    assert [record["lr"]["stem"] for record in result.records] == [0.0, 0.0, pytest.approx(1e-3 / 25 / 1e4)]
    assert [record["lr"]["head"] for record in result.records][1] == pytest.approx(1e-2 / 25 / 1e4)


def test_accumulate_steps_is_a_positive_whole_number() -> None:
    assert compose_train(FAST).trainer.accumulate_steps == 1
    with pytest.raises(TransferError, match=r"trainer.accumulate_steps=0: must be a whole number >= 1"):
        compose_train(FAST + ["trainer.accumulate_steps=0"])


# --------------------------------------------------------------------------- resume


class Crash(Exception):
    """Stands for the process dying in the middle of an accumulation group."""


def crash_at_batch(monkeypatch: pytest.MonkeyPatch, epoch: int, batch: int) -> None:
    """Make batch `batch` (1-based) of epoch `epoch` die before it runs: mid-group with accumulate_steps=3."""
    real = trainer.train_one_epoch

    def crashing(runner: Any, *args: Any, description: str, **kwargs: Any) -> Any:
        if description != f"epoch {epoch}":
            return real(runner, *args, description=description, **kwargs)
        seen = [kwargs.get("start_step", 0)]

        class Dying:
            precision = runner.precision

            def __call__(self, *call: Any) -> None:
                seen[0] += 1
                if seen[0] == batch:
                    raise Crash(f"epoch {epoch} batch {batch}")
                runner(*call)

        return real(Dying(), *args, description=description, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", crashing)


@pytest.mark.slow
def test_a_run_killed_mid_accumulation_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """6 batches an epoch, 3 per step, a checkpoint every 2 batches: last.pt lands on step boundaries (batch 3, 6);
    killed in batch 5 of epoch 2, the run resumes from batch 3 and ends as one never interrupted."""
    overrides = FAST + ["trainer.accumulate_steps=3", "trainer.checkpoint_every_steps=2"]
    train(compose_train(overrides), tmp_path / "a")

    crashed = tmp_path / "b"
    with monkeypatch.context() as patch:
        crash_at_batch(patch, epoch=2, batch=5)
        with pytest.raises(Crash):
            train(compose_train(overrides), crashed)
    state = checkpoint.load(crashed / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 3)
    assert state["tally"]["count"] == 3 * 16

    train(compose_train(overrides), crashed, resume=state)
    assert comparable(read_metrics(crashed)) == comparable(read_metrics(tmp_path / "a"))
