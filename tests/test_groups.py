"""Layer groups mean what the lesson means, and heads are what the config says, per torchvision family.

`last:1` (gradual's "last block" stage) must train a real block of the network, never a lone
1x1 conv, norm or projection; the head must be exactly the configured one, with no pretrained
classifier dropout left in front of it. All models are random init (nothing downloads).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from transfer_cli.config.schema import HeadConfig
from transfer_cli.models.backbones import build_raw_backbone
from transfer_cli.models.model import TransferModel
from transfer_cli.training.run import train
from transfer_cli.training.stages import plan_stages

from conftest import compose_train
from helpers import build, load_strategy, timm_backbone, tv_backbone


# torchvision model -> (the classes of its blocks, "|"-separated; input size its forward accepts)
FAMILIES: dict[str, tuple[str, int]] = {
    "resnet18": ("BasicBlock", 64),
    "efficientnet_b0": ("MBConv", 64),
    "efficientnet_v2_s": ("FusedMBConv|MBConv", 64),
    "mobilenet_v2": ("InvertedResidual", 64),
    "mobilenet_v3_small": ("InvertedResidual", 64),
    "convnext_tiny": ("CNBlock", 64),
    "regnet_y_400mf": ("ResBottleneckBlock", 64),
    "vit_b_16": ("EncoderBlock", 224),
    "swin_t": ("SwinTransformerBlock", 64),
    "mnasnet0_5": ("_InvertedResidual", 64),
    "shufflenet_v2_x0_5": ("InvertedResidual", 64),
    "densenet121": ("_DenseLayer", 64),
    "vgg11": ("Conv2d", 64),
    "alexnet": ("Conv2d", 64),
    "maxvit_t": ("MaxVitLayer", 224),
}
SLOW = {"efficientnet_v2_s", "vit_b_16", "swin_t", "densenet121", "vgg11", "alexnet", "maxvit_t"}
NAMES = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in FAMILIES]
DROPOUT = 0.3
CLASSES = 5


class _Built(dict):
    def __missing__(self, name: str) -> TransferModel:
        self[name] = build(tv_backbone(name), CLASSES, HeadConfig(kind="linear", dropout=DROPOUT))
        return self[name]


@pytest.fixture(scope="module")
def models() -> dict[str, TransferModel]:
    """Each family built once, on first use (random init, linear head with dropout 0.3, 5 classes)."""
    return _Built()


def blocks(model: TransferModel, kind: str) -> dict[str, list[str]]:
    """Path -> parameter names of every module of a class named in `kind` (the family's blocks)."""
    return {path: [f"{path}.{name}" for name, _ in module.named_parameters()]
            for path, module in model.model.named_modules() if type(module).__name__ in kind.split("|")}


def last_block_stage(model: TransferModel) -> dict[str, float]:
    """The trained groups of gradual's second stage (`train: [last:1]`)."""
    stages = plan_stages(load_strategy("gradual"), model, None)
    assert stages[1].name == "last_block"
    return stages[1].lrs


def late_dropouts(model: TransferModel) -> list[tuple[str, float]]:
    """Dropouts that act after the pooled features: in the head's top-level module or in parameter-free
    top-level glue (pooling, flatten, a top-level dropout)."""
    top = model.head_path.split(".")[0]
    glue = [name for name, child in model.model.named_children() if not any(True for _ in child.parameters())]
    return [(path, module.p) for path, module in model.model.named_modules()
            if isinstance(module, nn.Dropout) and module.p > 0 and path.split(".")[0] in [top, *glue]]


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("name", NAMES)
def test_last_block_stage_trains_a_real_block_and_the_head(models: dict[str, TransferModel], name: str) -> None:
    model = models[name]
    kind = FAMILIES[name][0]
    trained = last_block_stage(model)
    assert list(trained) == [model.groups[-2].name, "head"]
    group = set(model.group(next(iter(trained))).params)
    whole = [path for path, params in blocks(model, kind).items() if params and set(params) <= group]
    assert whole, f"{name}: last:1 trains {sorted(group)[:4]}..., no whole {kind}"


@pytest.mark.parametrize("name", NAMES)
def test_every_block_group_holds_whole_blocks_and_no_lone_layers(models: dict[str, TransferModel], name: str) -> None:
    """Between stem and head, each group holds at least one whole block, and no block is cut in two."""
    model = models[name]
    kind = FAMILIES[name][0]
    owner = {param: group.name for group in model.groups for param in group.params}
    found = blocks(model, kind)
    for path, params in found.items():
        assert len({owner[param] for param in params}) <= 1, f"{name}: {kind} {path} is split across groups"
    for group in model.groups[1:-1]:
        inside = [path for path, params in found.items() if params and set(params) <= set(group.params)]
        assert inside, f"{name}: group {group.name} ({group.params[:3]}...) holds no {kind}"
    assert model.groups[0].name == "stem" and model.groups[-1].name == "head"


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_in_exactly_one_group_and_head_is_the_classifier(models: dict[str, TransferModel],
                                                                         name: str) -> None:
    model = models[name]
    grouped = [param for group in model.groups for param in group.params]
    assert not [param for param, count in Counter(grouped).items() if count > 1]
    assert sorted(grouped) == sorted(param for param, _ in model.model.named_parameters())
    head = model.model.get_submodule(model.head_path)
    prefix = model.head_path + "."
    assert model.group("head").params == [prefix + param for param, _ in head.named_parameters()]
    assert sorted(model.group("head").params) == [prefix + "1.bias", prefix + "1.weight"]


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name", NAMES)
def test_head_dropout_is_the_only_dropout_after_the_features(models: dict[str, TransferModel], name: str) -> None:
    model = models[name]
    head = model.model.get_submodule(model.head_path)
    assert [type(layer) for layer in head] == [nn.Dropout, nn.Linear]
    assert head[0].p == pytest.approx(DROPOUT) and head[1].out_features == CLASSES
    assert late_dropouts(model) == [(model.head_path + ".0", pytest.approx(DROPOUT))]
    size = FAMILIES[name][1]
    model.model.eval()
    with torch.no_grad():
        assert model.model(torch.randn(2, 3, size, size)).shape == (2, CLASSES)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small", "resnet18"])
def test_no_dropout_asked_means_no_dropout_after_the_features(name: str) -> None:
    model = build(tv_backbone(name), CLASSES, HeadConfig(kind="linear", dropout=0.0))
    assert type(model.model.get_submodule(model.head_path)) is nn.Linear
    assert late_dropouts(model) == []


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small"])
def test_mlp_head_brings_exactly_its_own_two_dropouts(name: str) -> None:
    model = build(tv_backbone(name), CLASSES, HeadConfig(kind="mlp", dropouts=[0.5, 0.25]))
    path = model.head_path
    assert late_dropouts(model) == [(f"{path}.0", pytest.approx(0.5)), (f"{path}.3", pytest.approx(0.25))]
    assert model.model.get_submodule(path)[-1].out_features == CLASSES


def test_pretrained_layers_before_the_head_stay_and_train_with_the_last_block(models: dict[str, TransferModel]) -> None:
    """ConvNeXt keeps its final LayerNorm2d + Flatten, MobileNetV3 its pretrained Linear(576, 1024) +
    Hardswish: both are part of the last block group, not groups of their own, not the head."""
    convnext = models["convnext_tiny"]
    assert convnext.head_path == "classifier.2"
    assert [type(m).__name__ for m in convnext.model.classifier] == ["LayerNorm2d", "Flatten", "Sequential"]
    assert {"classifier.0.weight", "classifier.0.bias"} <= set(convnext.groups[-2].params)
    mobile = models["mobilenet_v3_small"]
    assert mobile.head_path == "classifier.2"
    assert [type(m).__name__ for m in mobile.model.classifier] == ["Linear", "Hardswish", "Sequential"]
    assert mobile.model.classifier[0].out_features == 1024
    assert {"classifier.0.weight", "features.12.0.weight"} <= set(mobile.groups[-2].params)


@pytest.mark.slow
def test_vgg_keeps_its_pretrained_fc_layers_without_their_dropout(models: dict[str, TransferModel]) -> None:
    model = models["vgg11"]
    layers = [type(m).__name__ for m in model.model.classifier]
    assert layers == ["Linear", "ReLU", "Identity", "Linear", "ReLU", "Sequential"]
    assert model.head_path == "classifier.5"
    assert {"classifier.0.weight", "classifier.3.weight"} <= set(model.groups[-2].params)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small",
                                  pytest.param("alexnet", marks=pytest.mark.slow)])
def test_cut_classifier_keeps_the_networks_own_eval_logits(name: str) -> None:
    """Dropping the classifier's dropouts changes training only: at inference the backbone with its
    1000-way Linear (what exercise 5 scores) gives torchvision's logits exactly."""
    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None).eval()
    torch.manual_seed(0)
    raw = build_raw_backbone(tv_backbone(name), pretrained=False)
    cut = raw.model.eval()
    assert not [m for m in cut.get_submodule(raw.classifier_path.split(".")[0]).modules() if isinstance(m, nn.Dropout)]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(cut(images), original(images))


# --------------------------------------------------------------------------- timm: the same meaning


# timm model -> its last block group and the top-of-backbone layers that must join it
TIMM_TOPS = {
    "test_efficientnet": ("blocks.4", ["conv_head.weight", "bn2.weight"]),  # timm: conv_head -> previous group
    "test_convnext": ("stages.3", ["head.norm.weight", "head.norm.bias"]),  # timm: left with the classifier
    "test_vit": ("blocks.5", ["norm.weight", "norm.bias"]),  # timm: norm -> previous group
    "mobilenetv3_small_050": ("blocks.5", ["conv_head.weight", "conv_head.bias"]),  # left with the classifier
}


@pytest.mark.parametrize("name", list(TIMM_TOPS))
def test_timm_final_norm_and_conv_head_join_the_last_block(name: str) -> None:
    """Whatever timm's matcher puts with (or just before) the classifier joins the last block group;
    the head is the new classifier alone; timm's functional drop_rate is 0, so head.dropout is the only one."""
    model = build(timm_backbone(name), CLASSES, HeadConfig(dropout=DROPOUT))
    assert getattr(model.model, "drop_rate", 0.0) == 0.0
    group, tops = TIMM_TOPS[name]
    last = model.groups[-2]
    assert last.name == group
    assert set(tops) <= set(last.params)
    assert any(param.startswith(group + ".") for param in last.params)
    assert model.group("head").params == [model.head_path + ".1.weight", model.head_path + ".1.bias"]
    assert len(model.groups) == len({g.name for g in model.groups})


# --------------------------------------------------------------------------- the acceptance command


def test_gradual_dry_run_on_efficientnet_b0_trains_an_mbconv_block_in_its_last_block_stage(tmp_path: Path) -> None:
    cfg = compose_train(["backbone=efficientnet_b0", "backbone.pretrained=false", "strategy=gradual",
                         "dataset=synthetic", "dataset.train_size=64", "dataset.val_size=32",
                         "trainer.device=cpu", "trainer.num_workers=0", "dry_run=true"])
    plan: dict[str, Any] = train(cfg, tmp_path / "run")["plan"]
    stage = plan["stages"][1]
    assert stage["name"] == "last_block"
    assert [g["name"] for g in stage["groups"]] == ["features.7", "head"]
    # features.7 (one MBConv, 717,232 params) with the final 1x1 conv + BN (412,160): timm's blocks.6 + conv_head
    assert plan["layer_groups"]["features.7"] == 717_232 + 412_160
    assert "features.8" not in plan["layer_groups"]
