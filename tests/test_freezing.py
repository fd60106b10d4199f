"""Behaviour of frozen layers in a real (short) `fit` on synthetic images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transfer_cli.config.schema import HeadConfig
from transfer_cli.training.fit import fit
from transfer_cli.training.freezing import Stage
from transfer_cli.training.loop import evaluate

from helpers import (
    RESNET_GROUPS,
    batchnorms,
    make_fit_setup,
    params_of,
    params_trainable,
    setup_loss_and_precision,
    snapshot_params,
    stage,
    tiny_resnet,
)


HEAD_ONLY = {"head": 5e-2}


def bn_stats(model) -> dict[str, dict[str, torch.Tensor]]:
    return {path: {key: getattr(bn, key).clone() for key in ("running_mean", "running_var", "num_batches_tracked")}
            for path, bn in batchnorms(model.model).items()}


def run_fit(tmp_path, lrs, *, train_bn=False, epochs=2, head=None, bn="frozen_stats"):
    model = tiny_resnet(head=head, seed=0)
    stages = [Stage("head", epochs, dict(lrs), bn)]
    setup = make_fit_setup(model, stages, tmp_path, train_bn=train_bn)
    params_before = snapshot_params(model.model)
    stats_before = bn_stats(model)
    result = fit(setup)
    return model, setup, result, params_before, stats_before


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """feature_extract-like: 2 epochs training only the head."""
    return run_fit(tmp_path_factory.mktemp("frozen"), HEAD_ONLY)


@pytest.fixture(scope="module")
def train_bn_run(tmp_path_factory):
    return run_fit(tmp_path_factory.mktemp("train_bn"), HEAD_ONLY, train_bn=True)


def test_fit_ran_two_epochs_and_wrote_the_run(frozen_run, tmp_path_factory):
    model, setup, result, _, _ = frozen_run
    assert [r["epoch"] for r in result.records] == [1, 2]
    assert all(r["stage"] == "head" for r in result.records)
    assert (setup.run_dir / "metrics.jsonl").read_text().count("\n") == 2
    assert (setup.run_dir / "checkpoints" / "last.pt").is_file()
    assert (setup.run_dir / "checkpoints" / "best.pt").is_file()
    head_count = sum(p.numel() for n, p in model.model.named_parameters() if n.startswith("fc."))
    assert params_trainable(result) == {"head": head_count}
    assert all(r["lr"]["head"] > 0 and all(r["lr"][g] == 0.0 for g in RESNET_GROUPS[:-1]) for r in result.records)


def test_frozen_parameters_are_bit_identical_after_fit(frozen_run):
    model, _, _, before, _ = frozen_run
    frozen = params_of(model, *RESNET_GROUPS[:-1])
    after = dict(model.model.named_parameters())
    assert frozen
    changed = [name for name in frozen if not torch.equal(after[name], before[name])]
    assert not changed, f"frozen parameters moved: {changed}"
    assert all(not after[name].requires_grad for name in frozen)


def test_head_parameters_changed(frozen_run):
    model, _, _, before, _ = frozen_run
    for name in params_of(model, "head"):
        assert not torch.equal(dict(model.model.named_parameters())[name], before[name]), name


def test_frozen_batchnorm_running_stats_unchanged(frozen_run):
    model, _, _, _, stats_before = frozen_run
    after = bn_stats(model)
    assert after, "test_resnet should contain BatchNorm layers"
    for path, stats in stats_before.items():
        for key, value in stats.items():
            assert torch.equal(after[path][key], value), f"{path}.{key} drifted"


def test_train_bn_trains_frozen_bn_affine_but_not_running_stats(train_bn_run):
    model, _, result, before, stats_before = train_bn_run
    after = dict(model.model.named_parameters())
    bn_affine = {f"{path}.{name}" for path, bn in batchnorms(model.model).items()
                 for name, _ in bn.named_parameters(recurse=False)}
    moved = {name for name in bn_affine if not torch.equal(after[name], before[name])}
    # the BN weights/biases of frozen groups trained (all of them had a gradient)
    assert len(moved) >= len(bn_affine) * 0.9, f"only {len(moved)}/{len(bn_affine)} BN params moved"
    assert all(after[name].requires_grad for name in bn_affine)
    # every other frozen parameter (convolutions) stayed put
    others = [n for n in params_of(model, *RESNET_GROUPS[:-1]) if n not in bn_affine]
    assert others
    assert all(torch.equal(after[name], before[name]) for name in others)
    # running statistics are still frozen
    now = bn_stats(model)
    for path, stats in stats_before.items():
        for key, value in stats.items():
            assert torch.equal(now[path][key], value), f"{path}.{key} drifted with train_bn"
    bn_count = sum(after[name].numel() for name in bn_affine)
    head_count = sum(after[name].numel() for name in params_of(model, "head"))
    assert params_trainable(result) == {"head": head_count + bn_count}


def test_trained_batchnorm_does_update_running_stats(tmp_path):
    """Control: when the body trains under strategy.bn=train, BN statistics move, so the checks above can fail."""
    model, _, _, before, stats_before = run_fit(tmp_path, {name: 1e-2 for name in RESNET_GROUPS}, epochs=1, bn="train")
    after = bn_stats(model)
    assert all(not torch.equal(after[p]["running_mean"], s["running_mean"]) for p, s in stats_before.items())
    assert all(int(after[p]["num_batches_tracked"]) > int(s["num_batches_tracked"]) for p, s in stats_before.items())
    params = dict(model.model.named_parameters())
    stem_weight = params_of(model, "stem")[0]
    assert not torch.equal(params[stem_weight], before[stem_weight])


def test_evaluate_runs_in_eval_mode_and_restores_train_mode(tmp_path):
    model = tiny_resnet(head=HeadConfig(kind="mlp"))
    setup = make_fit_setup(model, [stage("head", HEAD_ONLY)], tmp_path)
    seen: dict[str, list[bool]] = {"bn": [], "dropout": []}
    bn = model.model.get_submodule("layer1.0.bn1")
    dropout = model.model.fc[0]
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(dropout, nn.Dropout)
    hooks = [bn.register_forward_hook(lambda m, i, o: seen["bn"].append(m.training)),
             dropout.register_forward_hook(lambda m, i, o: seen["dropout"].append(m.training))]
    stats_before = bn_stats(model)
    model.model.train()
    metrics = evaluate(model.model, setup.val_loader, *setup_loss_and_precision(setup), setup.num_classes)
    for hook in hooks:
        hook.remove()
    assert seen["bn"] and seen["dropout"]
    assert not any(seen["bn"]) and not any(seen["dropout"])
    assert model.model.training and bn.training  # restored afterwards
    assert {"val/loss", "val/acc1"} <= set(metrics)
    assert 0.0 <= metrics["val/acc1"] <= 1.0
    # evaluation with a model left in train mode must not touch BN statistics
    assert all(torch.equal(bn_stats(model)[p][k], v) for p, s in stats_before.items() for k, v in s.items())


def test_evaluate_is_deterministic_despite_dropout(tmp_path):
    model = tiny_resnet(head=HeadConfig(kind="mlp"))
    setup = make_fit_setup(model, [stage("head", HEAD_ONLY)], tmp_path)
    model.model.train()
    first = evaluate(model.model, setup.val_loader, *setup_loss_and_precision(setup), setup.num_classes)
    second = evaluate(model.model, setup.val_loader, *setup_loss_and_precision(setup), setup.num_classes)
    assert first["val/loss"] == second["val/loss"]


def test_frozen_batchnorm_is_in_eval_mode_during_training_steps(tmp_path):
    """Frozen BN layers are held in eval mode while the model trains; the head's layers train."""
    model = tiny_resnet(head=HeadConfig(kind="mlp"))
    setup = make_fit_setup(model, [stage("head", HEAD_ONLY, epochs=1)], tmp_path, train_size=32, val_size=8)
    modes: dict[str, list[bool]] = {"bn": [], "dropout": []}
    bn = model.model.get_submodule("layer4.0.bn2")
    hooks = [bn.register_forward_hook(lambda m, i, o: modes["bn"].append(m.training)),
             model.model.fc[0].register_forward_hook(lambda m, i, o: modes["dropout"].append(m.training))]
    fit(setup)
    for hook in hooks:
        hook.remove()
    # 2 train batches then 1 val batch: BN never trains, dropout trains only in the train batches
    assert modes["bn"] == [False, False, False]
    assert modes["dropout"] == [True, True, False]
