"""The BatchNorm policy (`strategy.bn`, `stages[*].bn`) and "frozen means eval".

Each test states what a user relies on and tries to break it: running statistics that must
not move, ones that must, dropout that must be off in a frozen block and on in a trained one,
and the feature cache that must give the uncached path's numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from timm.layers import DropPath
from torch import nn
from torchvision.ops import StochasticDepth

from transfer_cli.config.schema import HeadConfig, StageConfig, StrategyConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.models.model import HEAD
from transfer_cli.runs import checkpoint
from transfer_cli.training import assemble
from transfer_cli.training import fit as trainer
from transfer_cli.training.feature_cache import backbone_is_deterministic
from transfer_cli.training.freezing import Stage, frozen_modules, hold_frozen_batchnorm
from transfer_cli.training.run import train
from transfer_cli.training.stages import enter_stage, plan_stages
from transfer_cli.training.state import Progress

from conftest import FAST, compose_train
from helpers import (
    RESNET_GROUPS,
    batchnorms,
    build,
    make_fit_setup,
    run_metrics,
    snapshot_params,
    tiny_resnet,
    tv_backbone,
)


EVERYTHING = {name: 1e-2 for name in RESNET_GROUPS}


def stats(model) -> dict[str, torch.Tensor]:
    return {f"{path}.{key}": getattr(bn, key).clone() for path, bn in batchnorms(model.model).items()
            for key in ("running_mean", "running_var", "num_batches_tracked")}


def fit_once(tmp_path: Path, stages: list[Stage]) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = tiny_resnet(seed=0)
    before_params, before_stats = snapshot_params(model.model), stats(model)
    trainer.fit(make_fit_setup(model, stages, tmp_path))
    return model, before_params, before_stats




# --------------------------------------------------------------------------- policies in a real fit


def test_frozen_stats_keeps_running_stats_bit_identical_while_affine_params_train(tmp_path: Path) -> None:
    model, before_params, before_stats = fit_once(tmp_path, [Stage("all", 2, EVERYTHING, "frozen_stats")])
    assert stats(model).keys() == before_stats.keys() and before_stats
    drifted = [key for key, value in stats(model).items() if not torch.equal(value, before_stats[key])]
    assert not drifted, f"running stats moved under frozen_stats: {drifted[:3]}"
    affine = [f"{path}.{name}" for path, bn in batchnorms(model.model).items() for name, _ in bn.named_parameters()]
    params = dict(model.model.named_parameters())
    moved = [name for name in affine if not torch.equal(params[name], before_params[name])]
    assert len(moved) == len(affine), "every BatchNorm weight and bias trains with its group"


def test_train_policy_updates_running_stats_of_trained_groups_only(tmp_path: Path) -> None:
    lrs = {"layer4": 1e-2, HEAD: 1e-2}
    model, _, before_stats = fit_once(tmp_path, [Stage("last", 1, lrs, "train")])
    now = stats(model)
    trained = [k for k in now if k.startswith("layer4.") and k.endswith("running_mean")]
    frozen = [k for k in now if not k.startswith("layer4.")]
    assert trained and frozen
    assert all(not torch.equal(now[k], before_stats[k]) for k in trained)
    assert all(torch.equal(now[k], before_stats[k]) for k in frozen)


def test_a_stage_overrides_the_strategys_policy(tmp_path: Path) -> None:
    model = tiny_resnet()
    strategy = StrategyConfig(name="mixed", bn="frozen_stats", stages=[
        StageConfig(name="adapt", epochs=1, train=["all"], lr=1e-2, bn="train"),
        StageConfig(name="settle", epochs=1, train=["all"], lr=1e-2)])
    stages = plan_stages(strategy, model, None)
    assert [s.bn for s in stages] == ["train", "frozen_stats"]
    setup = make_fit_setup(model, stages, tmp_path)
    seen: list[dict[str, torch.Tensor]] = [stats(model)]

    class SnapshotEachEpoch(trainer.Callback):
        def on_epoch_end(self, record: dict[str, Any]) -> None:
            seen.append(stats(model))

    trainer.fit(setup, callbacks=[SnapshotEachEpoch()])
    start, after_train, after_frozen = seen
    key = "layer1.0.bn1.running_mean"
    assert not torch.equal(after_train[key], start[key]), "the stage with bn=train updated the stats"
    assert all(torch.equal(after_frozen[k], after_train[k]) for k in start), "the next stage kept them"


@pytest.mark.parametrize("override", ["strategy.bn=frozen", "strategy.bn=true"])
def test_an_unknown_policy_is_refused_at_composition(override: str) -> None:
    with pytest.raises(TransferError, match="strategy.bn=.*must be one of frozen_stats, reestimate, train"):
        compose_train(FAST + [override])


def test_an_unknown_stage_policy_is_refused_at_composition() -> None:
    with pytest.raises(TransferError, match=r"strategy.stages\[0\].bn=eval: must be one of"):
        compose_train(FAST + ["strategy=feature_extract", "strategy.stages.0.bn=eval"])


def test_the_default_policy_follows_the_weights(tmp_path: Path) -> None:
    """Pretrained running statistics are kept (frozen_stats); a random init's train (smoke, scratch)."""
    model = tiny_resnet(num_classes=4)
    for name in ("gradual", "fine_tune", "lp_ft", "discriminative_decay", "feature_extract"):
        strategy = compose_train(FAST + [f"strategy={name}"]).strategy
        assert strategy.bn is None and all(stage.bn is None for stage in strategy.stages), name
        assert {stage.bn for stage in plan_stages(strategy, model, None)} == {"frozen_stats"}, name
        assert {stage.bn for stage in plan_stages(strategy, model, None, pretrained=False)} == {"train"}, name
    summary = train(compose_train(FAST + ["strategy=fine_tune", "dry_run=true"]), tmp_path)
    assert [stage["bn"] for stage in summary["plan"]["stages"]] == ["train"]  # smoke: random init
    pretrained = compose_train(FAST + ["strategy=fine_tune", "dry_run=true", "backbone.pretrained=true"])
    summary = train(pretrained, tmp_path)
    assert [stage["bn"] for stage in summary["plan"]["stages"]] == ["frozen_stats"]


# --------------------------------------------------------------------------- reestimate


def test_reestimate_sets_the_stats_to_the_training_images_then_holds_them(tmp_path: Path) -> None:
    model = tiny_resnet(seed=0)
    every_group = {group.name: 1e-3 for group in model.groups}
    setup = make_fit_setup(model, [Stage("all", 2, every_group, "reestimate")], tmp_path)
    first = next(iter(batchnorms(model.model).values()))  # its input does not depend on any BatchNorm
    momentum = first.momentum
    inputs: list[torch.Tensor] = []
    model.model.eval()
    hook = first.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():  # the mean of the first BatchNorm's input over every (full) training batch
        for images, _ in torch.utils.data.DataLoader(setup.train_loader.dataset, batch_size=16, drop_last=True):
            model.model(images)
    hook.remove()
    expected = torch.cat(inputs).mean(dim=(0, 2, 3))
    rng = torch.get_rng_state()
    enter_stage(setup, Progress(), 0)
    assert torch.equal(torch.get_rng_state(), rng), "re-estimation leaves the global RNG where it was"
    assert first.momentum == momentum
    torch.testing.assert_close(first.running_mean, expected, rtol=1e-5, atol=1e-6)
    settled = stats(model)
    trainer.fit(setup)
    assert all(torch.equal(value, settled[key]) for key, value in stats(model).items()), "held after re-estimation"


@pytest.mark.parametrize("trained", [1, 2])  # the head alone (it holds no BatchNorm); the last block too
def test_reestimate_leaves_the_statistics_of_frozen_groups_as_they_were(tmp_path: Path, trained: int) -> None:
    model = tiny_resnet(seed=0)
    groups = model.groups[-trained:]
    before = stats(model)
    setup = make_fit_setup(model, [Stage("last", 1, {group.name: 1e-3 for group in groups}, "reestimate")], tmp_path)
    enter_stage(setup, Progress(), 0)
    after = stats(model)
    trained_params = {name for group in groups for name in group.params}
    in_trained = {key for key in before if f"{key.rsplit('.', 1)[0]}.weight" in trained_params}
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == in_trained
    assert bool(changed) == (trained == 2)


@pytest.mark.slow
def test_reestimate_is_not_repeated_when_a_run_resumes_mid_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    overrides = FAST + ["strategy=gradual", "strategy.bn=reestimate", "trainer.checkpoint_every_steps=2"]
    monkeypatch.setenv("TRANSFER_CACHE", str(tmp_path / "cache"))
    train(compose_train(overrides), tmp_path / "whole")

    class Crash(Exception):
        pass

    class CrashAfterACheckpoint(trainer.Callback):
        def on_step(self, epoch: int, step: int) -> None:
            if (epoch, step) == (2, 4):
                raise Crash()

    with pytest.raises(Crash):
        train(compose_train(overrides), tmp_path / "crashed", callbacks=[CrashAfterACheckpoint()])
    state = checkpoint.load(tmp_path / "crashed" / "checkpoints" / "last.pt")
    assert (state["progress"]["stage"], state["progress"]["step"]) == (1, 4)
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.stages"):
        train(compose_train(overrides), tmp_path / "crashed", resume=state)
    assert caplog.text.count("re-estimated the running stats") == 1, "only on entering the last stage afresh"
    assert run_metrics(tmp_path / "crashed") == run_metrics(tmp_path / "whole")


# --------------------------------------------------------------------------- frozen means eval


def efficientnet_b0() -> Any:
    return build(tv_backbone("efficientnet_b0"), num_classes=3, seed=0)


def in_training_step(model: Any, stage: Stage) -> None:
    model.model.train()
    hold_frozen_batchnorm(model, stage)


def test_stochastic_depth_is_off_in_frozen_blocks_and_on_in_trained_ones() -> None:
    model = efficientnet_b0()
    block = model.model.features[6][1]  # an MBConv block with a residual, so StochasticDepth (p > 0.1) acts
    assert isinstance(block.stochastic_depth, StochasticDepth) and block.stochastic_depth.p > 0.1
    x = torch.randn(32, block.block[0][0].in_channels, 7, 7)
    head_only = Stage("head", 1, {HEAD: 1e-3})
    in_training_step(model, head_only)
    with torch.no_grad():
        assert torch.equal(block(x), block(x)), "a frozen block gave two outputs for one input"
    everything = Stage("all", 1, {group.name: 1e-3 for group in model.groups}, "train")
    in_training_step(model, everything)
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(block(x), block(x)), "stochastic depth is active where its block trains"


def test_dropout_feeding_a_frozen_block_is_off_and_the_heads_own_dropout_is_on() -> None:
    model = tiny_resnet(head=HeadConfig(dropout=0.5))
    model.model.maxpool = nn.Dropout(0.5)  # parameter-free, between the frozen stem and frozen layer1
    stage = Stage("head", 1, {HEAD: 1e-3})
    in_training_step(model, stage)
    assert not model.model.maxpool.training
    assert model.model.fc[0].training, "dropout inside the trained head still regularises it"
    assert not any(m.training for m in frozen_modules(model, stage))
    assert model.model.training, "the model itself stays in train mode"


def test_frozen_stats_holds_batchnorm_in_eval_mode_in_trained_groups_too() -> None:
    model = tiny_resnet()
    everything = {name: 1e-3 for name in RESNET_GROUPS}
    in_training_step(model, Stage("all", 1, everything, "frozen_stats"))
    assert not any(bn.training for bn in batchnorms(model.model).values())
    in_training_step(model, Stage("all", 1, everything, "train"))
    assert all(bn.training for bn in batchnorms(model.model).values())


def test_a_backbone_with_stochastic_modules_in_frozen_groups_is_deterministic_for_the_cache() -> None:
    model = efficientnet_b0()
    assert any(isinstance(m, StochasticDepth) and m.p > 0 for m in model.model.modules())
    assert backbone_is_deterministic(model)  # the whole classifier is the head: no dropout is left before it
    model.model.avgpool = nn.Sequential(model.model.avgpool, nn.Dropout(0.3))  # feeds the head: not frozen
    assert not backbone_is_deterministic(model)


def with_drop_path(real: Any) -> Any:
    """build_model, then drop path 0.5 in every residual block of the test ResNet."""
    def build_model(*args: Any, **kwargs: Any) -> Any:
        model = real(*args, **kwargs)
        for module in model.model.modules():
            if hasattr(module, "drop_path"):
                module.drop_path = DropPath(0.5)
        return model
    return build_model


def test_the_feature_cache_applies_to_a_backbone_with_drop_path_and_matches_the_uncached_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRANSFER_CACHE", str(cache))
    monkeypatch.setattr(assemble, "build_model", with_drop_path(assemble.build_model))
    overrides = FAST + ["strategy=feature_extract"]
    train(compose_train(overrides), tmp_path / "cached")
    assert len(list(cache.glob("*.pt"))) == 2, "trainer.cache_features=auto cached both splits"
    train(compose_train(overrides + ["trainer.cache_features=false"]), tmp_path / "plain")
    cached, plain = run_metrics(tmp_path / "cached"), run_metrics(tmp_path / "plain")
    assert len(cached) == len(plain) == 3
    for a, b in zip(cached, plain):
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
            else:
                assert a[key] == b[key], key


def test_the_plan_shows_each_stages_policy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = train(compose_train(FAST + ["strategy=gradual", "strategy.bn=train", "strategy.stages.2.bn=reestimate",
                                         "dry_run=true"]), tmp_path)
    assert [stage["bn"] for stage in result["plan"]["stages"]] == ["train", "train", "reestimate"]
    assert "bn reestimate" in capsys.readouterr().out
