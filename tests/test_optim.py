"""StagedOptimizer across the stages of a strategy, weight-decay grouping and schedulers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transfer_cli.config.schema import OptimizerConfig, SchedulerConfig
from transfer_cli.training.freezing import apply_stage
from transfer_cli.training.optim import build_scheduler
from transfer_cli.training.stages import NORM_TYPES, StagedOptimizer, plan_stages

from helpers import RESNET_GROUPS, load_optimizer, load_scheduler, load_strategy, params_of, stage, tiny_resnet


def ids(params) -> set[int]:
    return {id(p) for p in params}


def optimizer_params(opt: StagedOptimizer, positive_lr: bool = False) -> list[torch.Tensor]:
    return [p for g in opt.optimizer.param_groups if not positive_lr or g["lr"] > 0 for p in g["params"]]


def requires_grad_params(model) -> list[torch.Tensor]:
    return [p for p in model.model.parameters() if p.requires_grad]


def train_step(model, opt: StagedOptimizer, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model.model.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = nn.functional.cross_entropy(model.model(images), labels)
    opt.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    opt.optimizer.step()


def staged(optimizer: str = "adamw", strategy: str = "gradual", train_bn: bool = False, **overrides):
    model = tiny_resnet()
    stages = plan_stages(load_strategy(strategy), model, None)
    apply_stage(model, stages[0], train_bn)
    opt = StagedOptimizer(model, load_optimizer(optimizer, **overrides), stages[0], train_bn)
    return model, stages, opt


# --------------------------------------------------------------------------- only trainable params


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("train_bn", [False, True])
def test_optimizer_holds_exactly_the_trainable_params_at_every_stage(optimizer, train_bn):
    model, stages, opt = staged(optimizer, train_bn=train_bn)
    for index, planned in enumerate(stages):
        if index:
            apply_stage(model, planned, train_bn)
            opt.enter(planned)
        live = optimizer_params(opt, positive_lr=True)
        assert len(live) == len(ids(live)), "a parameter sits in two param groups"
        assert ids(live) == ids(requires_grad_params(model)), planned.name
        assert ids(opt.trainable_parameters()) == ids(requires_grad_params(model))
        # every parameter in the optimizer at all belongs to a group some stage so far trained
        trained_so_far = {g for s in stages[: index + 1] for g in s.lrs}
        allowed = set(params_of(model, *trained_so_far))
        if train_bn:
            allowed |= {n for n, p in model.model.named_parameters() if p.requires_grad}
        named = {id(p): n for n, p in model.model.named_parameters()}
        assert {named[id(p)] for p in optimizer_params(opt)} <= allowed


def test_first_stage_optimizer_holds_only_the_head():
    model, _, opt = staged()
    assert ids(optimizer_params(opt)) == ids(p for n, p in model.model.named_parameters() if n.startswith("fc."))
    assert {g["layer_group"] for g in opt.optimizer.param_groups} == {"head"}


# --------------------------------------------------------------------------- lrs after enter


@pytest.mark.parametrize("strategy", ["gradual", "discriminative", "discriminative_decay"])
def test_group_lr_equals_stage_lr_after_enter(strategy):
    model, stages, opt = staged(strategy=strategy)
    for index, planned in enumerate(stages):
        if index:
            apply_stage(model, planned, False)
            opt.enter(planned)
        for group in opt.optimizer.param_groups:
            expected = planned.lrs.get(group["layer_group"], 0.0)
            assert group["lr"] == pytest.approx(expected), (planned.name, group["layer_group"], group["kind"])
        assert opt.lrs_by_group() == {g: pytest.approx(lr) for g, lr in planned.lrs.items()}


def test_enter_resets_lrs_after_a_scheduler_ran():
    """A finished OneCycle leaves tiny lrs and its own keys; the next stage starts from its own lrs."""
    model, stages, opt = staged()
    scheduler = build_scheduler(opt.optimizer, SchedulerConfig(name="onecycle", warmup_pct=0.1), 8)
    lr_trace(opt, scheduler, 7)
    assert opt.optimizer.param_groups[0]["lr"] < 1e-5
    apply_stage(model, stages[1], False)
    opt.enter(stages[1])
    for group in opt.optimizer.param_groups:
        assert group["lr"] == pytest.approx(stages[1].lrs[group["layer_group"]])
        assert "initial_lr" not in group and "max_lr" not in group
    scheduler = build_scheduler(opt.optimizer, SchedulerConfig(name="onecycle", warmup_pct=0.1), 20)
    trace = lr_trace(opt, scheduler, 19)
    peaks = {}
    for row in trace:
        for lr, group in zip(row, opt.optimizer.param_groups):
            peaks[group["layer_group"]] = max(peaks.get(group["layer_group"], 0.0), lr)
    assert peaks == {"layer4": pytest.approx(1e-4), "head": pytest.approx(1e-3)}  # gradual keeps the head's rate


# --------------------------------------------------------------------------- state across stages


def test_entering_stage_two_keeps_the_optimizer_and_the_head_adam_state():
    model, stages, opt = staged("adamw")
    train_step(model, opt, seed=1)
    train_step(model, opt, seed=2)
    head_params = [p for n, p in model.model.named_parameters() if n.startswith("fc.")]
    before = {id(p): opt.optimizer.state[p] for p in head_params}
    copies = {id(p): {k: v.clone() for k, v in opt.optimizer.state[p].items()} for p in head_params}
    assert all(int(state["step"]) == 2 for state in copies.values())
    optimizer_object = opt.optimizer

    apply_stage(model, stages[1], False)
    opt.enter(stages[1])

    assert opt.optimizer is optimizer_object
    for p in head_params:
        state = opt.optimizer.state[p]
        assert state is before[id(p)]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert state[key] is before[id(p)][key]
            assert torch.equal(state[key], copies[id(p)][key])
    layer4 = [p for n, p in model.model.named_parameters() if n.startswith("layer4.")]
    assert all(p not in opt.optimizer.state for p in layer4)  # new groups start fresh
    train_step(model, opt, seed=3)
    assert all(int(opt.optimizer.state[p]["step"]) == 3 for p in head_params)
    assert all(int(opt.optimizer.state[p]["step"]) == 1 for p in layer4)


def test_entering_the_same_stage_twice_adds_no_duplicate_groups():
    model, stages, opt = staged()
    apply_stage(model, stages[2], False)
    opt.enter(stages[2])
    count = len(opt.optimizer.param_groups)
    opt.enter(stages[2])
    assert len(opt.optimizer.param_groups) == count
    keys = [(g["layer_group"], g["kind"]) for g in opt.optimizer.param_groups]
    assert len(keys) == len(set(keys))
    assert len(optimizer_params(opt)) == len(list(model.model.parameters()))


def test_frozen_groups_do_not_move_when_a_later_stage_trains_less():
    """A group trained in stage 1 and frozen in stage 2 keeps its weights (lr 0, no grad)."""
    model = tiny_resnet()
    first = stage("all", {name: 1e-2 for name in RESNET_GROUPS})
    second = stage("head", {"head": 1e-2})
    apply_stage(model, first, False)
    opt = StagedOptimizer(model, OptimizerConfig(name="adamw", weight_decay=0.1), first, False)
    train_step(model, opt)
    apply_stage(model, second, False)
    opt.enter(second)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    train_step(model, opt, seed=5)
    for name, p in model.model.named_parameters():
        if name.startswith("fc."):
            assert not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name]), name


# --------------------------------------------------------------------------- weight decay


def kinds_by_module(model) -> dict[int, str]:
    kinds = {}
    for module in model.model.modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                kinds[id(p)] = "bn"
            elif isinstance(module, NORM_TYPES):
                kinds[id(p)] = "norm"
            else:
                kinds[id(p)] = "decay" if p.ndim > 1 else "no_decay"
    return kinds


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_no_weight_decay_on_bias_and_norm_params(optimizer):
    model, stages, opt = staged(optimizer)
    configured = load_optimizer(optimizer).weight_decay
    assert configured > 0
    apply_stage(model, stages[-1], False)
    opt.enter(stages[-1])
    kinds = kinds_by_module(model)
    seen = set()
    for group in opt.optimizer.param_groups:
        seen.add(group["kind"])
        assert {kinds[id(p)] for p in group["params"]} == {group["kind"]}
        if group["kind"] == "decay":
            assert group["weight_decay"] == pytest.approx(configured)
            assert all(p.ndim > 1 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.0
    assert seen == {"decay", "no_decay", "bn"}  # test_resnet has BatchNorm only
    # every BatchNorm parameter and every bias is outside the decay groups
    decayed = ids(p for g in opt.optimizer.param_groups if g["kind"] == "decay" for p in g["params"])
    for name, p in model.model.named_parameters():
        if name.endswith("bias") or ".bn" in name or name.startswith("bn1"):
            assert id(p) not in decayed, name


def test_decay_groups_actually_shrink_weights_and_spare_biases():
    """With zero gradients, AdamW moves only decayed weights."""
    model = tiny_resnet()
    everything = stage("all", {name: 0.1 for name in RESNET_GROUPS})
    apply_stage(model, everything, False)
    opt = StagedOptimizer(model, OptimizerConfig(name="adamw", weight_decay=0.5), everything, False)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    for p in model.model.parameters():
        p.grad = torch.zeros_like(p)
    opt.optimizer.step()
    kinds = kinds_by_module(model)
    for name, p in model.model.named_parameters():
        if kinds[id(p)] == "decay" and before[name].abs().sum() > 0:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name
        elif kinds[id(p)] != "decay":
            assert torch.equal(p, before[name]), name


# --------------------------------------------------------------------------- schedulers


def lr_trace(opt: StagedOptimizer, scheduler, steps: int) -> list[list[float]]:
    trace = [[g["lr"] for g in opt.optimizer.param_groups]]
    for _ in range(steps):
        opt.optimizer.step()
        scheduler.step()
        trace.append([g["lr"] for g in opt.optimizer.param_groups])
    return trace


def discriminative_opt():
    model = tiny_resnet()
    (only,) = plan_stages(load_strategy("discriminative"), model, None)
    apply_stage(model, only, False)
    opt = StagedOptimizer(model, OptimizerConfig(name="adamw", weight_decay=0.01), only, False)
    return model, only, opt


def test_onecycle_peaks_at_the_stage_lr_of_each_group():
    _, only, opt = discriminative_opt()
    total = 20
    scheduler = build_scheduler(opt.optimizer, load_scheduler("onecycle"), total)
    trace = lr_trace(opt, scheduler, total - 1)
    groups = opt.optimizer.param_groups
    for column, group in enumerate(groups):
        series = [row[column] for row in trace]
        stage_lr = only.lrs[group["layer_group"]]
        assert max(series) == pytest.approx(stage_lr, rel=1e-6)
        assert series[0] == pytest.approx(stage_lr / 25)  # OneCycle's default div_factor
        assert series[-1] < stage_lr / 100  # anneals to almost nothing
        peak = series.index(max(series))
        assert 0 < peak <= int(0.1 * total) + 1  # after a 10% warmup
    # the ratios between groups are those of the stage at every step
    head = next(i for i, g in enumerate(groups) if g["layer_group"] == "head")
    layer1 = next(i for i, g in enumerate(groups) if g["layer_group"] == "layer1")
    for row in trace:
        assert row[layer1] == pytest.approx(row[head] * 1e-5 / 1e-3, rel=1e-6)


@pytest.mark.parametrize("total_steps", [2, 9, 11, 30])
def test_onecycle_builds_for_any_stage_length(total_steps):
    _, only, opt = discriminative_opt()
    scheduler = build_scheduler(opt.optimizer, load_scheduler("onecycle"), total_steps)
    trace = lr_trace(opt, scheduler, max(total_steps, 2) - 1)
    head = next(i for i, g in enumerate(opt.optimizer.param_groups) if g["layer_group"] == "head")
    assert max(row[head] for row in trace) <= only.lrs["head"] * (1 + 1e-9)


def test_onecycle_builds_for_a_ten_step_stage():
    """10% of ten steps is one warmup step, which OneCycleLR cannot divide by: the stage still warms up from
    lr / 25 to about its lr, then anneals to almost nothing, every lr finite."""
    _, only, opt = discriminative_opt()
    scheduler = build_scheduler(opt.optimizer, load_scheduler("onecycle"), 10)
    trace = lr_trace(opt, scheduler, 9)
    head = next(i for i, g in enumerate(opt.optimizer.param_groups) if g["layer_group"] == "head")
    series = [row[head] for row in trace]
    stage_lr = only.lrs["head"]
    assert torch.isfinite(torch.tensor(trace)).all()
    assert series[0] == pytest.approx(stage_lr / 25)
    assert max(series) == series[1] == pytest.approx(stage_lr, rel=0.01)
    assert all(a >= b for a, b in zip(series[1:], series[2:]))
    assert series[-1] < stage_lr / 100


def test_cosine_warms_up_then_decays_to_zero():
    _, only, opt = discriminative_opt()
    total = 20
    scheduler = build_scheduler(opt.optimizer, load_scheduler("cosine"), total)
    trace = lr_trace(opt, scheduler, total)
    head = next(i for i, g in enumerate(opt.optimizer.param_groups) if g["layer_group"] == "head")
    series = [row[head] for row in trace]
    warmup = int(total * 0.1)
    assert series[0] == pytest.approx(1e-3 / warmup)
    assert max(series) == pytest.approx(1e-3)
    assert all(a <= b + 1e-15 for a, b in zip(series[:warmup], series[1 : warmup + 1]))
    assert all(a >= b - 1e-15 for a, b in zip(series[warmup:], series[warmup + 1 :]))
    assert series[-1] == pytest.approx(0.0, abs=1e-12)


def test_constant_keeps_the_stage_lrs():
    _, only, opt = discriminative_opt()
    scheduler = build_scheduler(opt.optimizer, load_scheduler("constant"), 10)
    for row in lr_trace(opt, scheduler, 10):
        for lr, group in zip(row, opt.optimizer.param_groups):
            assert lr == pytest.approx(only.lrs[group["layer_group"]])


