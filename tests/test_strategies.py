"""Strategies from conf/strategy/*.yaml resolved against a tiny ResNet's layer groups."""

from __future__ import annotations

import pytest
from torch import nn

from transfer_cli.config.schema import StageConfig, StrategyConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.training.freezing import apply_stage, frozen_batchnorms
from transfer_cli.training.stages import plan_stages, scale_epochs

from helpers import RESNET_GROUPS, batchnorms, load_strategy, params_of, stage, strategy_names, tiny_resnet


@pytest.fixture(scope="module")
def model():
    return tiny_resnet()


def one_stage(**kwargs) -> StrategyConfig:
    kwargs.setdefault("name", "s")
    kwargs.setdefault("epochs", 2)
    return StrategyConfig(name="custom", lr=1e-3, stages=[StageConfig(**kwargs)])


def lrs_of(strategy: StrategyConfig, model) -> dict[str, float]:
    (only,) = plan_stages(strategy, model, None)
    return only.lrs


# --------------------------------------------------------------------------- the shipped strategies


def test_strategy_configs_are_all_present():
    assert set(strategy_names()) >= {"feature_extract", "fine_tune", "gradual", "discriminative",
                                      "discriminative_decay", "scratch"}


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_yaml_plans_on_a_resnet(name, model):
    strategy = load_strategy(name)
    assert isinstance(strategy, StrategyConfig) and strategy.name == name
    rules = getattr(strategy, "by_train_size", None)
    if rules:  # a size table (auto): it has no stages itself; each strategy it picks must plan
        assert not strategy.stages
        for rule in rules:
            assert rule.strategy in strategy_names() and plan_stages(load_strategy(rule.strategy), model, None)
        return
    stages = plan_stages(strategy, model, None)
    assert len(stages) == len(strategy.stages)
    for planned in stages:
        assert planned.lrs, f"stage {planned.name} trains nothing"
        assert all(lr > 0 for lr in planned.lrs.values())
        # keys are real group names, ordered from stem to head
        order = [g for g in RESNET_GROUPS if g in planned.lrs]
        assert list(planned.lrs) == order
        assert "head" in planned.lrs


def test_feature_extract_trains_only_the_head(model):
    (only,) = plan_stages(load_strategy("feature_extract"), model, None)
    assert only.lrs == {"head": pytest.approx(1e-3)}
    assert only.epochs == 10


def test_gradual_is_head_then_last_block_then_all(model):
    stages = plan_stages(load_strategy("gradual"), model, None)
    assert [s.name for s in stages] == ["head", "last_block", "all"]
    assert [s.epochs for s in stages] == [5, 5, 10]
    assert stages[0].lrs == {"head": pytest.approx(1e-3)}
    # each group keeps the rate it started at: restarting the head at 1e-5 left it under-converged
    assert stages[1].lrs == {"layer4": pytest.approx(1e-4), "head": pytest.approx(1e-3)}
    assert stages[2].lrs == {**{name: pytest.approx(1e-5) for name in RESNET_GROUPS},
                             "layer4": pytest.approx(1e-4), "head": pytest.approx(1e-3)}
    assert list(stages[2].lrs) == RESNET_GROUPS


def test_discriminative_per_group_rates_and_frozen_stem(model):
    (only,) = plan_stages(load_strategy("discriminative"), model, None)
    expected = {"layer1": 1e-5, "layer2": 5e-5, "layer3": 1e-4, "layer4": 5e-4, "head": 1e-3}
    assert only.lrs == {k: pytest.approx(v) for k, v in expected.items()}
    assert list(only.lrs) == ["layer1", "layer2", "layer3", "layer4", "head"]
    assert "stem" not in only.lrs and "fc" not in only.lrs


def test_discriminative_decay_is_geometric(model):
    (only,) = plan_stages(load_strategy("discriminative_decay"), model, None)
    assert list(only.lrs) == RESNET_GROUPS
    assert only.lrs["head"] == pytest.approx(1e-3)
    values = list(only.lrs.values())
    for earlier, later in zip(values, values[1:]):
        assert earlier == pytest.approx(later / 2)
    assert only.lrs["stem"] == pytest.approx(1e-3 / 2**5)


def test_fine_tune_and_scratch(model):
    fine = plan_stages(load_strategy("fine_tune"), model, None)[0]
    assert fine.lrs == {name: pytest.approx(1e-4) for name in RESNET_GROUPS}
    lesson = plan_stages(load_strategy("fine_tune_low_lr"), model, None)[0]
    assert lesson.lrs == {name: pytest.approx(1e-5) for name in RESNET_GROUPS}
    scratch = load_strategy("scratch")
    assert scratch.pretrained is False
    assert plan_stages(scratch, model, None)[0].lrs == {name: pytest.approx(1e-3) for name in RESNET_GROUPS}


def test_lr_scale_multiplies_every_rate(model):
    stages = plan_stages(load_strategy("gradual"), model, None, lr_scale=10.0)
    assert stages[0].lrs["head"] == pytest.approx(1e-2)
    assert stages[1].lrs["layer4"] == pytest.approx(1e-3)
    assert stages[2].lrs["stem"] == pytest.approx(1e-4)


def test_total_epochs_rescales_the_plan(model):
    stages = plan_stages(load_strategy("gradual"), model, 4)
    assert [s.epochs for s in stages] == [1, 1, 2]
    with pytest.raises(TransferError, match="fewer than the strategy's 3 stages"):
        plan_stages(load_strategy("gradual"), model, 2)


# --------------------------------------------------------------------------- scale_epochs


def test_scale_epochs_to_four():
    scaled = scale_epochs([5, 5, 10], 4)
    assert sum(scaled) == 4 and all(count >= 1 for count in scaled)
    assert scaled == [1, 1, 2]


@pytest.mark.parametrize("total", range(3, 41))
def test_scale_epochs_sums_to_total_and_keeps_each_stage(total):
    scaled = scale_epochs([5, 5, 10], total)
    assert sum(scaled) == total
    assert all(count >= 1 for count in scaled)
    assert scaled[2] >= max(scaled[0], scaled[1])  # the longest stage stays the longest
    assert all(abs(count - share * total / 20) < 1 + 1e-9 for count, share in zip(scaled, [5, 5, 10]))


def test_scale_epochs_identity_and_proportional():
    assert scale_epochs([5, 5, 10], None) == [5, 5, 10]
    assert scale_epochs([5, 5, 10], 20) == [5, 5, 10]
    assert scale_epochs([5, 5, 10], 40) == [10, 10, 20]
    assert scale_epochs([3], 7) == [7]


def test_scale_epochs_rejects_too_few_or_nonpositive():
    with pytest.raises(TransferError, match="fewer than the strategy's 3 stages"):
        scale_epochs([5, 5, 10], 2)
    with pytest.raises(TransferError, match="must be positive"):
        scale_epochs([5, 0, 10], None)
    with pytest.raises(TransferError, match="must be positive"):
        scale_epochs([5, -1], 4)


def test_scale_epochs_never_gives_a_shorter_stage_more_epochs():
    scaled = scale_epochs([1, 2, 2], 4)  # currently [2, 1, 1]
    assert sum(scaled) == 4
    assert scaled[0] <= scaled[1] and scaled[0] <= scaled[2]


# --------------------------------------------------------------------------- lr validation


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr": -1e-3}, {"lrs": {"layer4": 1e-4, "head": 0.0}},
                                    {"lrs": {"head": -1.0}}, {"lr_decay": 0.0, "train": ["all"]}])
def test_non_positive_lr_raises(model, kwargs):
    with pytest.raises(TransferError, match="lr <= 0"):
        plan_stages(one_stage(**kwargs), model, None)


def test_non_positive_strategy_default_lr_raises(model):
    strategy = StrategyConfig(name="zero", lr=0.0, stages=[StageConfig(name="s", epochs=1, train=["head"])])
    with pytest.raises(TransferError, match="lr <= 0"):
        plan_stages(strategy, model, None)


def test_stage_lr_overrides_strategy_lr(model):
    assert lrs_of(one_stage(train=["head"]), model) == {"head": pytest.approx(1e-3)}
    assert lrs_of(one_stage(train=["head"], lr=3e-4), model) == {"head": pytest.approx(3e-4)}


def test_empty_strategy_or_stage_raises(model):
    with pytest.raises(TransferError, match="has no stages"):
        plan_stages(StrategyConfig(name="empty", stages=[]), model, None)
    with pytest.raises(TransferError, match="trains no layer group"):
        plan_stages(one_stage(train=[]), model, None)
    with pytest.raises(TransferError, match="trains no layer group"):
        plan_stages(one_stage(lrs={}), model, None)


# --------------------------------------------------------------------------- selectors


@pytest.mark.parametrize("selector,expected", [
    ("last:0", ["head"]),
    ("last:1", ["layer4", "head"]),
    ("last:2", ["layer3", "layer4", "head"]),
    ("last:5", RESNET_GROUPS),
    ("last:99", RESNET_GROUPS),
    ("all", RESNET_GROUPS),
    ("head", ["head"]),
    ("fc", ["head"]),
])
def test_selectors(model, selector, expected):
    assert list(lrs_of(one_stage(train=[selector]), model)) == expected


def test_selectors_combine_in_model_order(model):
    lrs = lrs_of(one_stage(train=["head", "layer1", "stem", "last:1"]), model)
    assert list(lrs) == ["stem", "layer1", "layer4", "head"]


@pytest.mark.parametrize("selector", ["last:-1", "last:x", "last:"])
def test_bad_last_selector_raises(model, selector):
    with pytest.raises(TransferError, match="bad group selector"):
        plan_stages(one_stage(train=[selector]), model, None)


def test_unknown_group_in_train_or_lrs_raises(model):
    with pytest.raises(TransferError, match="layer group 'layer7' does not exist"):
        plan_stages(one_stage(train=["layer7"]), model, None)
    with pytest.raises(TransferError, match="layer group 'blocks.0' does not exist"):
        plan_stages(one_stage(lrs={"blocks.0": 1e-3}), model, None)


def test_lrs_keys_are_selectors_and_the_first_that_selects_a_group_gives_its_rate(model):
    lrs = lrs_of(one_stage(lrs={"head": 1e-3, "last:1": 1e-4, "all": 1e-5}), model)
    assert lrs == {"stem": 1e-5, "layer1": 1e-5, "layer2": 1e-5, "layer3": 1e-5, "layer4": 1e-4, "head": 1e-3}
    lrs = lrs_of(one_stage(lrs={"all": 1e-5, "head": 1e-3}), model)  # order decides: `all` takes the head too
    assert set(lrs.values()) == {1e-5}
    assert lrs_of(one_stage(lrs={"fc": 2e-3, "last:2": 1e-4}), model) == {"layer3": 1e-4, "layer4": 1e-4,
                                                                           "head": 2e-3}
    with pytest.raises(TransferError, match="bad group selector 'last:x'"):
        plan_stages(one_stage(lrs={"last:x": 1e-3}), model, None)


def test_lr_decay_over_a_selection(model):
    lrs = lrs_of(one_stage(train=["last:2"], lr=1e-2, lr_decay=0.1), model)
    assert lrs == {"layer3": pytest.approx(1e-4), "layer4": pytest.approx(1e-3), "head": pytest.approx(1e-2)}


# --------------------------------------------------------------------------- apply_stage


def trainable_names(model) -> set[str]:
    return {name for name, p in model.model.named_parameters() if p.requires_grad}


def test_apply_stage_sets_requires_grad_for_exactly_the_stage_groups():
    model = tiny_resnet()
    for planned in plan_stages(load_strategy("gradual"), model, None):
        apply_stage(model, planned, train_bn=False)
        assert trainable_names(model) == set(params_of(model, *planned.lrs))
    # and back to head-only: earlier unfrozen groups freeze again
    apply_stage(model, stage("head", {"head": 1e-3}), train_bn=False)
    assert trainable_names(model) == set(params_of(model, "head"))


def test_apply_stage_discriminative_freezes_only_stem():
    model = tiny_resnet()
    (only,) = plan_stages(load_strategy("discriminative"), model, None)
    apply_stage(model, only, train_bn=False)
    frozen = {name for name, p in model.model.named_parameters() if not p.requires_grad}
    assert frozen == set(params_of(model, "stem"))


def test_apply_stage_train_bn_adds_only_frozen_batchnorm_affine_params():
    model = tiny_resnet()
    head_only = stage("head", {"head": 1e-3})
    apply_stage(model, head_only, train_bn=True)
    bn_affine = {f"{path}.{name}" for path, bn in batchnorms(model.model).items()
                 for name, _ in bn.named_parameters(recurse=False)}
    assert bn_affine, "test_resnet should contain BatchNorm layers"
    assert trainable_names(model) == set(params_of(model, "head")) | bn_affine
    # no convolution weight of a frozen group becomes trainable
    for path, module in model.model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert not module.weight.requires_grad, path


def test_frozen_batchnorms_are_those_of_frozen_groups():
    model = tiny_resnet()
    all_bns = batchnorms(model.model)
    last_block = stage("last_block", {"layer4": 1e-4, "head": 1e-4})
    frozen = frozen_batchnorms(model, last_block)
    frozen_paths = {path for path, m in all_bns.items() if any(m is f for f in frozen)}
    assert frozen_paths == {path for path in all_bns if not path.startswith("layer4.")}
    assert len(frozen) == len(frozen_paths)
    everything = stage("all", {name: 1e-5 for name in RESNET_GROUPS})
    assert frozen_batchnorms(model, everything) == []
