"""The pre-flight plan: dry runs, plan.json, layer-group coverage and where the weights come from."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import transfer_cli.training.run as train_module
from transfer_cli.core.errors import TransferError
from transfer_cli.training import assemble
from transfer_cli.training.assemble import prepare
from transfer_cli.training.plan import build_plan
from transfer_cli.training.run import train

from conftest import FAST, REPO, compose_train


RESNET_GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


pytestmark = pytest.mark.usefixtures("fresh_feature_cache")


def stage_lrs(plan: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    return [(s["name"], {g["name"]: g["lr"] for g in s["groups"]}) for s in plan["stages"]]


def run_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.exists() else []


# --------------------------------------------------------------------------- dry run in-process


def test_dry_run_returns_the_plan_and_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fit(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a dry run must not train")

    monkeypatch.setattr(train_module, "fit", no_fit)
    result = train(compose_train(FAST + ["strategy=gradual", "dry_run=true"]), tmp_path / "run")
    assert result["dry_run"] is True and set(result) == {"dry_run", "plan"}
    plan = result["plan"]
    assert run_files(tmp_path / "run") == []

    # smoke: lr_scale=10 lifts gradual's 1e-3 | 1e-4 | 1e-5, each group kept at the rate it started at
    assert stage_lrs(plan) == [
        ("head", {"head": pytest.approx(1e-2)}),
        ("last_block", {"layer4": pytest.approx(1e-3), "head": pytest.approx(1e-2)}),
        ("all", {**{name: pytest.approx(1e-4) for name in RESNET_GROUPS},
                 "layer4": pytest.approx(1e-3), "head": pytest.approx(1e-2)}),
    ]
    assert [s["epochs"] for s in plan["stages"]] == [1, 1, 1]
    assert list(plan["layer_groups"]) == RESNET_GROUPS
    total = sum(plan["layer_groups"].values())
    for stage in plan["stages"]:
        assert stage["trainable_params"] == sum(g["params"] for g in stage["groups"])
        assert stage["trainable_params"] + stage["frozen_params"] == total
        assert all(g["params"] == plan["layer_groups"][g["name"]] for g in stage["groups"])
    assert plan["stages"][0]["trainable_params"] == plan["layer_groups"]["head"] == 4 * 96 + 4  # 96 features
    assert plan["stages"][-1]["frozen_params"] == 0
    assert plan["backbone"] == {"source": "timm", "name": "test_resnet", "weights": {"from": "random init"}}
    per_class = {f"class_{label}": 24 for label in range(4)}
    assert plan["data"] == {"dataset": "synthetic", "classes": 4, "head_outputs": 4, "train_images": 96,
                            "val_images": 48, "select_images": 0, "train_per_class": per_class,
                            "val_per_class": {name: 12 for name in per_class}, "imbalance": None, "balance": "none"}
    assert plan["normalization"]["matches_weights"] is True
    assert plan["input"]["image_size"] == 32

    printed = capsys.readouterr().out
    assert "test_resnet" in printed and "random init" in printed and "4 classes, head outputs 4" in printed
    assert "head@0.01" in printed and "layer4@0.001" in printed and "stem@0.0001" in printed


def test_dry_run_plans_per_group_lrs_of_a_discriminative_strategy(tmp_path: Path) -> None:
    plan = train(compose_train(FAST + ["strategy=discriminative", "trainer.epochs=2", "dry_run=true"]),
                 tmp_path)["plan"]
    # the lesson's lrs (fc is the head's alias) times smoke's lr_scale=10; the stem stays frozen
    assert stage_lrs(plan) == [("all", {"layer1": pytest.approx(1e-4), "layer2": pytest.approx(5e-4),
                                        "layer3": pytest.approx(1e-3), "layer4": pytest.approx(5e-3),
                                        "head": pytest.approx(1e-2)})]
    assert plan["stages"][0]["frozen_params"] == plan["layer_groups"]["stem"] > 0


def test_normalization_that_contradicts_the_weights_is_flagged(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_train(FAST + ["dry_run=true", "transforms.mean=[0.1,0.2,0.3]", "transforms.std=[0.3,0.3,0.3]"])
    plan = train(cfg, tmp_path)["plan"]
    assert plan["normalization"]["mean"] == pytest.approx([0.1, 0.2, 0.3])
    assert plan["normalization"]["matches_weights"] is False
    assert plan["normalization"]["weights_mean"] != plan["normalization"]["mean"]
    assert "DIFFERS from the weights" in capsys.readouterr().out


def test_a_real_run_writes_the_same_plan_as_plan_json(tmp_path: Path) -> None:
    overrides = FAST + ["strategy=gradual"]
    planned = train(compose_train(overrides + ["dry_run=true"]), tmp_path / "dry")["plan"]
    summary = train(compose_train(overrides), tmp_path / "real")
    written = json.loads((tmp_path / "real" / "plan.json").read_text())
    assert written == json.loads(json.dumps(planned))
    assert sum(written["layer_groups"].values()) == summary["params_total"]
    assert [s["trainable_params"] for s in written["stages"]] == list(summary["params_trainable"].values())


# --------------------------------------------------------------------------- dry run as a command


@pytest.mark.slow
def test_dry_run_command_prints_the_plan_offline_and_leaves_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    hf_home = tmp_path / "hf-home"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0",
           "TRANSFER_CACHE": str(tmp_path / "feature-cache")}
    result = subprocess.run([sys.executable, "-m", "transfer_cli", "train", "experiment=smoke", "dry_run=true",
                             "backbone.pretrained=true", f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "backbone  timm test_resnet; weights: hf-hub timm/test_resnet" in out
    assert f"cache {hf_home / 'hub'}: missing, offline" in out
    assert "4 classes, head outputs 4" in out and "344 train / 128 val images" in out
    assert "best.pt chosen on 40 images held out of train (dataset.select_fraction)" in out
    assert "matches the weights" in out
    stages = [line for line in out.splitlines() if line.startswith("stage ")]
    assert len(stages) == 3
    assert "head@0.01" in stages[0] and "layer4@0.001, head@0.01" in stages[1] and "stem@0.0001" in stages[2]
    assert all("trainable" in line and "frozen" in line for line in stages)
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()
    assert not (hf_home / "hub").exists() or not any((hf_home / "hub").rglob("*.safetensors")), "nothing downloaded"


# --------------------------------------------------------------------------- layer-group coverage


@pytest.fixture
def dry(tmp_path: Path) -> tuple[Any, Any]:
    """A dry run's config and its prepared run (test_resnet at random init: nothing downloaded, nothing trained)."""
    cfg = compose_train(FAST + ["strategy=gradual", "dry_run=true"])
    return cfg, prepare(cfg, tmp_path)


def regroup(prepared: Any, name: str, source: str | None, target: str | None) -> None:
    """Take parameter `name` out of group `source` and put it into group `target` (None: no group)."""
    model = prepared.setup.model
    model.groups = [replace(group, params=[p for p in group.params if group.name != source or p != name]
                            + ([name] if group.name == target else [])) for group in model.groups]


def test_the_plan_counts_each_groups_parameters(dry: tuple[Any, Any]) -> None:
    cfg, prepared = dry
    before = build_plan(cfg, prepared)["layer_groups"]
    assert sum(before.values()) == sum(p.numel() for p in prepared.setup.model.model.parameters())
    regroup(prepared, "fc.bias", "head", "layer4")  # the head's 4 biases
    after = build_plan(cfg, prepared)["layer_groups"]
    assert after == {**before, "head": before["head"] - 4, "layer4": before["layer4"] + 4}


@pytest.mark.parametrize("fault", ["orphan", "double"])
def test_the_plan_rejects_groups_that_do_not_partition_the_parameters(dry: tuple[Any, Any], fault: str) -> None:
    cfg, prepared = dry
    groups = {group.name: group.params for group in prepared.setup.model.groups}
    if fault == "orphan":
        name, problem = groups["layer1"][0], "in no group"
        regroup(prepared, name, "layer1", None)
    else:
        name, problem = groups["layer2"][0], "in two"
        regroup(prepared, name, None, "layer1")
    with pytest.raises(TransferError, match=re.escape(f"{problem}: ['{name}']")):
        build_plan(cfg, prepared)


@pytest.mark.parametrize("fault", ["orphan", "double"])
def test_a_run_with_broken_layer_groups_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              fault: str) -> None:
    real = assemble.build_model

    def broken(*args: Any, **kwargs: Any) -> Any:
        model = real(*args, **kwargs)
        groups = {g.name: g for g in model.groups}
        layer1, layer2 = groups["layer1"], groups["layer2"]
        if fault == "orphan":
            groups["layer1"] = replace(layer1, params=layer1.params[1:])
        else:
            groups["layer1"] = replace(layer1, params=layer1.params + layer2.params[:1])
        model.groups = list(groups.values())
        return model

    monkeypatch.setattr(assemble, "build_model", broken)
    with pytest.raises(TransferError, match="do not partition") as raised:
        train(compose_train(FAST + ["strategy=gradual"]), tmp_path)
    assert ("in no group: ['layer1." if fault == "orphan" else "in two: ['layer2.") in str(raised.value)
    assert not {"plan.json", "metrics.jsonl", "checkpoints", "summary.json"} & set(run_files(tmp_path))


# --------------------------------------------------------------------------- where the weights come from


def hf_cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """An offline, private Hugging Face hub cache for this test."""
    from huggingface_hub import constants

    hub = root / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def refuse_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._builder as builder

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dry run must not load pretrained weights")

    monkeypatch.setattr(builder, "load_pretrained", boom)


def test_dry_run_of_pretrained_timm_weights_names_the_missing_cache(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    hub = hf_cache(monkeypatch, tmp_path / "hf")
    refuse_downloads(monkeypatch)
    plan = train(compose_train(FAST + ["backbone.pretrained=true", "dry_run=true"]), tmp_path / "run")["plan"]
    weights = plan["backbone"]["weights"]
    assert weights["from"].startswith("hf-hub timm/test_resnet")
    assert weights["cache"] == str(hub) and weights["present"] is False and weights["offline"] is True
    assert list(hub.iterdir()) == [], "nothing was fetched into the cache"


def test_dry_run_sees_timm_weights_already_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = hf_cache(monkeypatch, tmp_path / "hf")
    refuse_downloads(monkeypatch)
    repo = train(compose_train(FAST + ["backbone.pretrained=true", "dry_run=true"]),
                 tmp_path / "probe")["plan"]["backbone"]["weights"]["from"].removeprefix("hf-hub ")
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"not read by a dry run")

    plan = train(compose_train(FAST + ["backbone.pretrained=true", "dry_run=true"]), tmp_path / "run")["plan"]
    assert plan["backbone"]["weights"]["present"] is True


@pytest.mark.parametrize("override", ["backbone.pretrained=false", "strategy=scratch"])
def test_random_init_plans_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str) -> None:
    refuse_downloads(monkeypatch)
    overrides = FAST + ["backbone.pretrained=true", override, "dry_run=true"]
    plan = train(compose_train(overrides), tmp_path)["plan"]
    assert plan["backbone"]["weights"] == {"from": "random init"}


def test_a_local_checkpoint_file_is_the_weights_origin(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pth"
    torch.save({}, weights)
    overrides = FAST + ["backbone.pretrained=true", f"backbone.checkpoint={weights}", "dry_run=true"]
    plan = train(compose_train(overrides), tmp_path / "run")["plan"]
    assert plan["backbone"]["weights"] == {"from": "file", "path": str(weights), "present": True}
