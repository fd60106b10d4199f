"""Loop features, each checked by what it does: NaN guard, early stopping, label smoothing, EMA,
MixUp/CutMix, gradient clipping, weight-decay groups, torch.compile with unfreezing."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.core.errors import TransferError
from transfer_cli.runs import checkpoint
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.assemble import prepare
from transfer_cli.training.run import train
from transfer_cli.training.stages import NORM_TYPES

from conftest import FAST, compose_train


STEPS_PER_EPOCH = 96 // 16  # FAST: 96 training images, batch 16


pytestmark = pytest.mark.usefixtures("fresh_feature_cache")


class Runners(list):
    """The StepRunners the runs built, in order, as train(..., adapt_runner=runners.adapt) hands them over;
    `hooks` run on each as it is built."""

    def __init__(self) -> None:
        super().__init__()
        self.hooks: list[Callable[[Any], Any]] = []  # each returns a runner to use instead, or None

    def adapt(self, runner: Any) -> Any:
        for hook in self.hooks:
            runner = hook(runner) or runner
        self.append(runner)
        return runner


@pytest.fixture
def runners() -> Runners:
    return Runners()


def on_runner(runners: Runners, hook: Callable[[Any], Any]) -> None:
    runners.hooks.append(hook)


def val_pass(cfg: Any, run_dir: Path, weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the run's val split for a model holding `weights` (eval mode, CPU)."""
    prepared = prepare(cfg, run_dir)
    model = prepared.setup.model.model
    model.load_state_dict(weights)
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for images, targets in prepared.setup.val_loader:
            logits.append(model(images))
            labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


# --------------------------------------------------------------------------- non-finite loss


class NanAt(nn.Module):
    """The training loss, NaN at the `at`-th call (1-based)."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.inner(logits, targets)
        return loss * float("nan") if self.calls == self.at else loss


@pytest.mark.parametrize("every", [None, 2], ids=["epoch_checkpoints", "step_checkpoints"])
def test_a_nan_loss_stops_the_run_naming_epoch_and_step(tmp_path: Path, runners: Runners, every: int | None) -> None:
    bad_step = 3 if every is None else 4  # with step checkpoints: the step that would have been saved
    on_runner(runners, lambda runner: replace(runner, loss_fn=NanAt(runner.loss_fn, STEPS_PER_EPOCH + bad_step)))
    overrides = FAST + ([f"trainer.checkpoint_every_steps={every}"] if every else [])
    with pytest.raises(TransferError, match=rf"non-finite loss at step {bad_step} of epoch 2"):
        train(compose_train(overrides), tmp_path, adapt_runner=runners.adapt)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "non-finite" in summary["stop_reason"] and "epoch 2" in summary["stop_reason"]
    assert summary["epochs_run"] == 1 and len(read_metrics(tmp_path)) == 1
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert last["progress"]["epoch"] < 2
    assert (last["progress"]["epoch"], last["progress"]["step"]) == ((1, 0) if every is None else (1, 2))
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())


def test_a_diverging_lr_fails_the_run_instead_of_training_on_nan(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match=r"non-finite loss at step \d+ of epoch \d+"):
        train(compose_train(FAST + ["strategy=fine_tune", "optimizer.lr_scale=1e30"]), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["stop_reason"]


# --------------------------------------------------------------------------- early stopping


@pytest.mark.slow
def test_early_stopping_stops_when_the_monitor_does_not_improve(tmp_path: Path) -> None:
    overrides = FAST + ["strategy=fine_tune", "trainer.epochs=4", "trainer.early_stopping.patience=1",
                        "trainer.early_stopping.monitor=val/loss", "trainer.early_stopping.min_delta=1000"]
    summary = train(compose_train(overrides), tmp_path)
    assert summary["epochs_run"] == 2 < 4  # epoch 1 sets the best; epoch 2 cannot beat it by 1000
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "finished"
    assert "early stopping" in on_disk["stop_reason"] and "val/loss" in on_disk["stop_reason"]
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["progress"]["stop_reason"] == on_disk["stop_reason"]


def test_early_stopping_without_a_stall_runs_every_epoch(tmp_path: Path) -> None:
    overrides = FAST + ["strategy=fine_tune", "trainer.epochs=3", "trainer.early_stopping.patience=5"]
    summary = train(compose_train(overrides), tmp_path)
    assert summary["epochs_run"] == 3 and summary["stop_reason"] == "completed all stages"


def test_early_stopping_on_an_unknown_metric_is_a_user_error(tmp_path: Path) -> None:
    overrides = FAST + ["strategy=fine_tune", "trainer.epochs=2", "trainer.early_stopping.patience=1",
                        "trainer.early_stopping.monitor=val/nope"]
    with pytest.raises(TransferError, match="val/nope") as raised:
        train(compose_train(overrides), tmp_path)
    assert "val/acc1" in str(raised.value) and "val/loss" in str(raised.value)


# --------------------------------------------------------------------------- label smoothing


@pytest.mark.slow
def test_label_smoothing_applies_to_the_training_loss_only(tmp_path: Path, runners: Runners) -> None:
    base = FAST + ["strategy=fine_tune", "trainer.epochs=1"]
    cfg = compose_train(base + ["trainer.label_smoothing=0.2"])
    train(cfg, tmp_path / "smooth", adapt_runner=runners.adapt)
    assert runners[-1].loss_fn.label_smoothing == 0.2
    train(compose_train(base), tmp_path / "plain", adapt_runner=runners.adapt)
    assert runners[-1].loss_fn.label_smoothing == 0.0
    smooth, plain = read_metrics(tmp_path / "smooth")[0], read_metrics(tmp_path / "plain")[0]
    assert smooth["train/loss"] != pytest.approx(plain["train/loss"], rel=1e-3)

    # val/loss is plain cross entropy of the final weights, whatever the training loss was
    weights = checkpoint.load(tmp_path / "smooth" / "checkpoints" / "last.pt")["model"]
    logits, labels = val_pass(cfg, tmp_path / "check", weights)
    assert smooth["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert smooth["val/loss"] != pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.2).item(), rel=1e-3)
    assert smooth["val/acc1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


# --------------------------------------------------------------------------- EMA


def test_ema_is_checkpointed_and_is_what_gets_validated(tmp_path: Path) -> None:
    cfg = compose_train(FAST + ["strategy=fine_tune", "trainer.epochs=2", "trainer.ema_decay=0.9"])
    summary = train(cfg, tmp_path)
    assert summary["ema"] is True
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert isinstance(last["ema"], dict)
    assert int(last["ema"]["n_averaged"]) == 2 * STEPS_PER_EPOCH
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == last["model"].keys()
    assert any(not torch.equal(averaged[k], last["model"][k]) for k in averaged)

    record = read_metrics(tmp_path)[-1]
    logits, labels = val_pass(cfg, tmp_path / "check", averaged)
    assert record["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert record["val/acc1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    raw_logits, _ = val_pass(cfg, tmp_path / "check_raw", last["model"])
    assert record["val/loss"] != pytest.approx(F.cross_entropy(raw_logits, labels).item(), rel=1e-4)


# --------------------------------------------------------------------------- MixUp / CutMix


class Recording(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.targets = inner, []

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.targets.append(targets.detach().clone())
        return self.inner(logits, targets)


@pytest.mark.parametrize("mixing", [["augment.mixup_alpha=0.2"], ["augment.cutmix_alpha=1.0"],
                                    ["augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0"], []],
                         ids=["mixup", "cutmix", "both", "neither"])
def test_mixup_and_cutmix_train_on_soft_targets(tmp_path: Path, runners: Runners, mixing: list[str]) -> None:
    on_runner(runners, lambda runner: replace(runner, loss_fn=Recording(runner.loss_fn)))
    summary = train(compose_train(FAST + ["strategy=fine_tune", "trainer.epochs=1", *mixing]), tmp_path,
                    adapt_runner=runners.adapt)
    targets = runners[-1].loss_fn.targets
    assert len(targets) == STEPS_PER_EPOCH
    if not mixing:
        assert all(t.dtype == torch.int64 and t.shape == (16,) for t in targets)
        return
    assert all(t.is_floating_point() and t.shape == (16, summary["num_classes"]) for t in targets)
    stacked = torch.cat(targets)
    assert torch.allclose(stacked.sum(1), torch.ones(len(stacked)), atol=1e-5)
    assert (stacked >= 0).all()
    assert (stacked.max(1).values < 1 - 1e-3).any(), "mixing blends two classes into some targets"
    assert 0.0 <= read_metrics(tmp_path)[0]["train/acc1"] <= 1.0  # top-1 still counts against hard labels


# --------------------------------------------------------------------------- gradient clipping


def grad_norms(runners: Runners) -> list[float]:
    """The global grad norm the optimizer sees at every step."""
    norms: list[float] = []

    def attach(runner: Any) -> None:
        def pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

        runner.optimizer.register_step_pre_hook(pre_step)

    on_runner(runners, attach)
    return norms


@pytest.mark.parametrize("clip", [1e-3, None], ids=["clipped", "unclipped"])
def test_grad_clip_bounds_every_steps_global_grad_norm(tmp_path: Path, runners: Runners, clip: float | None) -> None:
    norms = grad_norms(runners)
    overrides = FAST + ["strategy=fine_tune", "trainer.epochs=1"] + ([f"trainer.grad_clip={clip}"] if clip else [])
    train(compose_train(overrides), tmp_path, adapt_runner=runners.adapt)
    assert len(norms) == STEPS_PER_EPOCH
    if clip:
        assert max(norms) <= clip * (1 + 1e-4)
        assert min(norms) > clip * 0.9  # clipped to the bound, not zeroed
    else:
        assert min(norms) > 1e-2  # so the clipped case really clips


# --------------------------------------------------------------------------- weight decay groups


def test_biases_and_norm_parameters_get_no_weight_decay(tmp_path: Path) -> None:
    cfg = compose_train(FAST + ["strategy=fine_tune", "optimizer=adamw", "optimizer.weight_decay=0.05"])
    prepared = prepare(cfg, tmp_path)
    model = prepared.setup.model.model
    names = {id(p): n for n, p in model.named_parameters()}
    norm_params = {f"{path}.{n}" if path else n for path, m in model.named_modules() if isinstance(m, NORM_TYPES)
                   for n, _ in m.named_parameters(recurse=False)}
    assert norm_params, "test_resnet has BatchNorm layers"
    decay_of: dict[str, float] = {}
    for group in prepared.setup.optimizer.optimizer.param_groups:
        for p in group["params"]:
            decay_of[names[id(p)]] = group["weight_decay"]
            assert (group["kind"] == "decay") == (names[id(p)] not in norm_params and p.ndim > 1), names[id(p)]
    assert decay_of.keys() == set(names.values()), "fine_tune trains every parameter"
    for name, decay in decay_of.items():
        expect = 0.0 if name.endswith(".bias") or name in norm_params else 0.05
        assert decay == expect, name
    assert any(d == 0.05 for d in decay_of.values()) and any(d == 0.0 for d in decay_of.values())


@pytest.mark.slow
def test_decay_free_groups_keep_their_weight_decay_in_training(tmp_path: Path) -> None:
    """The groups reach the optimizer that steps: the saved optimizer state holds them."""
    train(compose_train(FAST + ["strategy=gradual", "optimizer=adamw", "optimizer.weight_decay=0.05"]), tmp_path)
    groups = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert "decay" in {g["kind"] for g in groups} and len({g["kind"] for g in groups}) >= 2
    for group in groups:
        assert group["weight_decay"] == (0.05 if group["kind"] == "decay" else 0.0), group["layer_group"]


# --------------------------------------------------------------------------- torch.compile with unfreezing


def per_epoch_weights(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, torch.Tensor]]:
    """The model weights in every end-of-epoch last.pt, by epoch."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    real = checkpoint.save_atomic

    def save(payload: dict[str, Any], path: Path) -> None:
        real(payload, path)
        progress = payload.get("progress") or {}
        if path.name == "last.pt" and progress.get("step") == 0:
            seen[progress["epoch"]] = dict(checkpoint.load(path)["model"])  # made whole from the frozen file

    monkeypatch.setattr(checkpoint, "save_atomic", save)
    return seen


STEM = ("conv1.", "bn1.")  # timm test_resnet's stem group


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], *prefixes: str) -> bool:
    """Whether any parameter (not BatchNorm statistics) under `prefixes` differs."""
    keys = [k for k in before if k.startswith(prefixes)
            and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert keys, prefixes
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_layers_unfrozen_at_a_stage_boundary_train_in_the_later_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runners: Runners, compile_: bool) -> None:
    """gradual, 1 epoch a stage: head | layer4 + head | all.

    Compiled with the aot_eager backend: Dynamo's guards and AOT autograd, where a parameter
    frozen at trace time could stay frozen, are the same as under inductor, without its C++
    code generation (a minute on 2 cores).
    """
    if compile_:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    weights = per_epoch_weights(monkeypatch)
    graded: list[set[str]] = []  # per optimizer step: top-level modules whose parameters got a nonzero grad

    def attach(runner: Any) -> None:
        names = {id(p): n for n, p in getattr(runner.model, "_orig_mod", runner.model).named_parameters()}

        def pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            graded.append({names[id(p)].split(".")[0] for g in optimizer.param_groups for p in g["params"]
                           if p.grad is not None and bool(p.grad.abs().sum() > 0)})

        runner.optimizer.register_step_pre_hook(pre_step)

    on_runner(runners, attach)
    train(compose_train(FAST + ["strategy=gradual", f"trainer.compile={str(compile_).lower()}"]), tmp_path,
          adapt_runner=runners.adapt)
    # each stage compiles its own module (tests/test_compile.py checks that); here: the unfrozen layers train

    assert len(graded) == 3 * STEPS_PER_EPOCH
    by_epoch = [set().union(*graded[i * STEPS_PER_EPOCH:(i + 1) * STEPS_PER_EPOCH]) for i in range(3)]
    assert by_epoch == [{"fc"}, {"layer4", "fc"}, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}]
    assert all(graded[i] == by_epoch[i // STEPS_PER_EPOCH] for i in range(len(graded))), "every step, not some"

    assert not changed(weights[1], weights[2], *STEM, "layer1.", "layer2.", "layer3.")
    assert changed(weights[1], weights[2], "layer4."), "layer4, unfrozen for stage 2, trains in it"
    for prefix in (STEM, ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",), ("fc.",)):
        assert changed(weights[2], weights[3], *prefix), f"{prefix} trains in stage 3"
