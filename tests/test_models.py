"""Backbone building, head replacement, layer groups and local checkpoints (all offline)."""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torchvision
from torch import nn

from transfer_cli.config.schema import HeadConfig
from transfer_cli.core.errors import TransferError

from helpers import RESNET_GROUPS, build, group_names, load_conf, timm_backbone, tv_backbone


ALL_BACKBONES = [
    ("timm", "test_resnet"),
    ("timm", "test_vit"),
    ("timm", "test_efficientnet"),
    ("timm", "test_convnext"),
    ("torchvision", "resnet18"),
    ("torchvision", "efficientnet_b0"),
    ("torchvision", "vit_b_16"),
    ("torchvision", "mobilenet_v3_small"),
]

# dotted path of the new classifier, per backbone
CLASSIFIER = {
    "test_resnet": "fc",
    "test_vit": "head",
    "test_efficientnet": "classifier",
    "test_convnext": "head.fc",
    "resnet18": "fc",
    "efficientnet_b0": "classifier",  # Dropout(0.2) + Linear: replaced whole
    "vit_b_16": "heads",
    "mobilenet_v3_small": "classifier.2",  # its pretrained Linear(576, 1024) + Hardswish stay
}


def backbone_cfg(source: str, name: str, **kwargs):
    return timm_backbone(name, **kwargs) if source == "timm" else tv_backbone(name, **kwargs)


@pytest.fixture(scope="module")
def built():
    """Every backbone of ALL_BACKBONES built once (3 classes, linear head, random init)."""
    return {name: build(backbone_cfg(source, name)) for source, name in ALL_BACKBONES}


# --------------------------------------------------------------------------- layer groups


@pytest.mark.parametrize("source,name", ALL_BACKBONES)
def test_layer_groups_cover_every_parameter_exactly_once(built, source, name):
    model = built[name]
    grouped = [param for group in model.groups for param in group.params]
    duplicates = [param for param, count in Counter(grouped).items() if count > 1]
    assert not duplicates, f"parameters in several groups: {duplicates}"
    assert set(grouped) == {param for param, _ in model.model.named_parameters()}
    assert len(grouped) == len(list(model.model.parameters()))
    # ordered from input to output: stem first, head last, names unique, no empty group
    names = group_names(model)
    assert names[0] == "stem" and names[-1] == "head"
    assert len(set(names)) == len(names)
    assert all(group.params for group in model.groups)


@pytest.mark.parametrize("source,name", ALL_BACKBONES)
def test_head_group_is_exactly_the_new_classifier(built, source, name):
    model = built[name]
    prefix = CLASSIFIER[name] + "."
    head = model.group("head")
    assert head.params == [p for p, _ in model.model.named_parameters() if p.startswith(prefix)]
    assert sorted(head.params) == sorted([prefix + "weight", prefix + "bias"])
    assert model.model.get_submodule(CLASSIFIER[name]).out_features == 3
    assert not any(p.startswith(prefix) for g in model.groups[:-1] for p in g.params)


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_resnet_groups_are_stem_layers_head_with_fc_alias(source, built):
    model = built["test_resnet" if source == "timm" else "resnet18"]
    assert group_names(model) == RESNET_GROUPS
    assert model.group("fc") is model.group("head")
    assert "fc" in model.group("head").aliases
    assert all(p.startswith("fc.") for p in model.group("fc").params)
    for index in range(1, 5):
        assert all(p.startswith(f"layer{index}.") for p in model.group(f"layer{index}").params)
    assert all(p.startswith(("conv1", "bn1")) for p in model.group("stem").params)


def test_unknown_group_raises_listing_groups(built):
    model = built["resnet18"]
    with pytest.raises(TransferError) as info:
        model.group("layer9")
    message = str(info.value)
    assert "layer9" in message
    for name in RESNET_GROUPS:
        assert name in message
    assert "head (fc)" in message


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize("source,name", [("timm", "test_resnet"), ("timm", "test_efficientnet"),
                                         ("torchvision", "resnet18"), ("torchvision", "mobilenet_v3_small")])
def test_linear_head_replaced_and_forward_gives_num_classes(source, name):
    model = build(backbone_cfg(source, name), num_classes=7)
    head = model.model.get_submodule(CLASSIFIER[name])
    assert type(head) is nn.Linear and head.out_features == 7
    model.model.eval()
    with torch.no_grad():
        out = model.model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_linear_head_with_dropout_is_dropout_then_linear():
    model = build(timm_backbone("test_resnet"), num_classes=5, head=HeadConfig(kind="linear", dropout=0.3))
    head = model.model.fc
    assert isinstance(head, nn.Sequential) and len(head) == 2
    assert isinstance(head[0], nn.Dropout) and head[0].p == pytest.approx(0.3)
    assert isinstance(head[1], nn.Linear) and head[1].out_features == 5
    assert model.group("head").params == ["fc.1.weight", "fc.1.bias"]


@pytest.mark.parametrize("source,name", [("timm", "test_resnet"), ("torchvision", "resnet18"),
                                         ("torchvision", "efficientnet_b0")])
def test_mlp_head_from_conf_is_the_lesson_head(source, name):
    head_cfg = load_conf("head", "mlp", HeadConfig)
    raw_in = {"test_resnet": timm.create_model("test_resnet").fc.in_features, "resnet18": 512,
              "efficientnet_b0": 1280}[name]
    model = build(backbone_cfg(source, name), num_classes=4, head=head_cfg)
    head = model.model.get_submodule(CLASSIFIER[name])
    kinds = [type(layer) for layer in head]
    assert kinds == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[0].p == pytest.approx(0.5) and head[3].p == pytest.approx(0.3)
    assert (head[1].in_features, head[1].out_features) == (raw_in, 256)
    assert (head[4].in_features, head[4].out_features) == (256, 4)
    head_params = model.group("head").params
    prefix = CLASSIFIER[name]
    assert head_params == [f"{prefix}.1.weight", f"{prefix}.1.bias", f"{prefix}.4.weight", f"{prefix}.4.bias"]
    model.model.eval()
    with torch.no_grad():
        assert model.model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


# --------------------------------------------------------------------------- names and weights


def test_unknown_timm_name_suggests_close_match():
    with pytest.raises(TransferError) as info:
        build(timm_backbone("test_resnett"))
    message = str(info.value)
    assert "unknown timm model 'test_resnett'" in message
    assert "did you mean" in message and "test_resnet" in message.split("did you mean", 1)[1].split("?")[0]


def test_unknown_torchvision_name_suggests_close_match():
    with pytest.raises(TransferError) as info:
        build(tv_backbone("resnet181"))
    message = str(info.value)
    assert "unknown torchvision classification model 'resnet181'" in message
    assert "resnet18" in message.split("did you mean", 1)[1].split("?")[0]


def test_bad_torchvision_weights_name_raises_listing_members():
    with pytest.raises(TransferError) as info:
        build(tv_backbone("resnet18", weights="IMAGENET1K_V3"))
    message = str(info.value)
    assert "IMAGENET1K_V3" in message and "backbone.weights" in message
    assert "did you mean IMAGENET1K_V1" in message


def test_random_init_records_no_pretraining(built):
    assert built["resnet18"].weights_source == "random init"
    assert built["resnet18"].pretrained is False
    assert built["test_resnet"].pretrained is False


# --------------------------------------------------------------------------- local checkpoints


def _assert_loaded(model, saved: dict[str, torch.Tensor], head_prefix: str):
    own = model.model.state_dict()
    body = [key for key in saved if not key.startswith(head_prefix)]
    assert body, "the saved state dict has no backbone tensors"
    for key in body:
        assert torch.equal(own[key], saved[key]), f"{key} not loaded from the checkpoint"
    # the head is new: right shape for 3 classes, not the saved 1000-class one
    assert own[head_prefix + "weight"].shape[0] == 3
    assert saved[head_prefix + "weight"].shape[0] == 1000


def test_torchvision_checkpoint_loads_backbone_weights(tmp_path):
    torch.manual_seed(123)
    saved = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(saved, path)
    model = build(tv_backbone("resnet18", pretrained=True, checkpoint=str(path)), seed=7)
    _assert_loaded(model, saved, "fc.")
    assert model.pretrained is True
    assert str(path) in model.weights_source


def test_torchvision_checkpoint_inside_run_checkpoint_dict(tmp_path):
    """A run checkpoint (weights under 'model') loads too; the mismatched head is skipped."""
    torch.manual_seed(5)
    saved = torchvision.models.resnet18(num_classes=10).state_dict()
    path = tmp_path / "best.pt"
    torch.save({"model": saved, "epoch": 3}, path)
    model = build(tv_backbone("resnet18", pretrained=True, checkpoint=str(path)), seed=9)
    own = model.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items() if not k.startswith("fc."))


def test_timm_checkpoint_loads_backbone_weights(tmp_path):
    torch.manual_seed(321)
    saved = timm.create_model("test_resnet").state_dict()
    path = tmp_path / "test_resnet.pt"
    torch.save(saved, path)
    model = build(timm_backbone("test_resnet", pretrained=True, checkpoint=str(path)), seed=11)
    _assert_loaded(model, saved, "fc.")
    assert model.pretrained is True
    assert str(path) in model.weights_source


def test_checkpoint_ignored_when_strategy_forces_random_init(tmp_path):
    saved = torchvision.models.resnet18().state_dict()
    path = tmp_path / "r.pt"
    torch.save(saved, path)
    model = build(tv_backbone("resnet18", pretrained=True, checkpoint=str(path)), pretrained=False, seed=3)
    assert model.weights_source == "random init" and model.pretrained is False
    assert not torch.equal(model.model.state_dict()["conv1.weight"], saved["conv1.weight"])


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_missing_checkpoint_file_raises(source, tmp_path):
    name = "test_resnet" if source == "timm" else "resnet18"
    with pytest.raises(TransferError, match="is not a file"):
        build(backbone_cfg(source, name, pretrained=True, checkpoint=str(tmp_path / "nope.pt")))


def test_torchvision_unreadable_or_foreign_checkpoint_raises(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a state dict")
    with pytest.raises(TransferError, match="not a readable PyTorch state dict"):
        build(tv_backbone("resnet18", pretrained=True, checkpoint=str(junk)))
    foreign = tmp_path / "vit.pt"
    torch.save(timm.create_model("test_vit").state_dict(), foreign)
    with pytest.raises(TransferError, match="shares no weights"):
        build(tv_backbone("resnet18", pretrained=True, checkpoint=str(foreign)))


def test_timm_checkpoint_with_other_class_count_loads_backbone(tmp_path):
    torch.manual_seed(1)
    saved = timm.create_model("test_resnet", num_classes=3).state_dict()
    path = tmp_path / "finetuned.pt"
    torch.save(saved, path)
    model = build(timm_backbone("test_resnet", pretrained=True, checkpoint=str(path)), num_classes=5)
    own = model.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items() if not k.startswith("fc."))
