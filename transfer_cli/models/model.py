"""The model a run trains: a backbone with a new head, cut into named layer groups.

Layer groups are the one abstraction strategies need: an ordered list from input to
output (`stem`, block groups, `head`). They come from the backbone's group matcher (timm's
own, or the equivalent for torchvision families), so a strategy can say `last:1` or
`layer4` without knowing the architecture.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from transfer_cli.config.schema import HEAD_KINDS, BackboneConfig, HeadConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.core.registry import Registry
from transfer_cli.models.backbones import PretrainedPreprocessing, build_raw_backbone


HEAD = "head"


@dataclass
class LayerGroup:
    name: str
    params: list[str]  # parameter names, in model order
    aliases: tuple[str, ...] = ()


@dataclass
class TransferModel:
    model: nn.Module
    groups: list[LayerGroup]
    preprocessing: PretrainedPreprocessing
    weights_source: str
    pretrained: bool
    head_path: str  # dotted path of the new classifier module

    def group(self, name: str) -> LayerGroup:
        for group in self.groups:
            if name == group.name or name in group.aliases:
                return group
        known = ", ".join(f"{g.name} ({'/'.join(g.aliases)})" if g.aliases else g.name for g in self.groups)
        raise TransferError(f"layer group '{name}' does not exist for this backbone: its groups are {known}")


HEADS: Registry = Registry("head", "head.kind", HEAD_KINDS)


@HEADS.register("linear")
def _linear_head(cfg: HeadConfig, in_features: int, num_classes: int) -> nn.Module:
    if cfg.dropout > 0:
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_features, num_classes))
    return nn.Linear(in_features, num_classes)


@HEADS.register("mlp")
def _mlp_head(cfg: HeadConfig, in_features: int, num_classes: int) -> nn.Module:
    """The lesson's head: Dropout(0.5)-Linear(256)-ReLU-Dropout(0.3)-Linear."""
    first, second = cfg.dropouts
    return nn.Sequential(
        nn.Dropout(first), nn.Linear(in_features, cfg.hidden), nn.ReLU(),
        nn.Dropout(second), nn.Linear(cfg.hidden, num_classes),
    )


def build_model(backbone: BackboneConfig, head: HeadConfig, num_classes: int, pretrained: bool = True,
                load_weights: bool = True) -> TransferModel:
    """Build the backbone, replace its classifier with a `num_classes` head, name its groups.

    Args:
        backbone: which network and weights.
        head: the new classifier.
        num_classes: classes in the data.
        pretrained: False forces random init (the `scratch` strategy).
        load_weights: False where the caller loads every tensor itself (a resumed run): a timm backbone is then
            built without its weights, still described (`pretrained`, `weights_source`) as the run started.
    """
    raw = build_raw_backbone(backbone, pretrained, load_weights)
    old = raw.model.get_submodule(raw.classifier_path)
    in_features = getattr(old, "in_features", None)
    if in_features is None:
        raise TransferError(f"cannot find the input width of classifier '{raw.classifier_path}': choose another "
                            "backbone")
    raw.model.set_submodule(raw.classifier_path, HEADS.get(head.kind)(head, in_features, num_classes))
    groups = layer_groups(raw.model, raw.group_matcher, raw.classifier_path)
    return TransferModel(raw.model, groups, raw.preprocessing, raw.weights_source,
                         starts_pretrained(backbone, pretrained), raw.classifier_path)


BATCH_STATISTICS = ("train", "reestimate")  # BatchNorm policies that normalize by each batch's own statistics


def check_batch_statistics(model: TransferModel, stages: Sequence[Any], smallest_batch: int, batch_size: int) -> None:
    """Before training: BatchNorm on batch statistics cannot normalize a batch of one image (one value per channel
    where a stage pools to 1x1, and at best an image normalized by itself), so refuse a training batch of one
    where a stage runs BatchNorm that way (`train`: in its trained groups; `reestimate`: every layer)."""
    if smallest_batch != 1:
        return
    for stage in stages:
        if stage.bn in BATCH_STATISTICS and _batchnorm_in(model, None if stage.bn == "reestimate" else stage.lrs):
            what, fix = (("trainer.batch_size=1", "use trainer.batch_size=2 or more") if batch_size == 1 else
                         ("the training split has 1 image", "give it 2 images or more"))
            raise TransferError(f"{what}: stage '{stage.name}' runs BatchNorm on batch statistics (bn={stage.bn}), "
                                f"which needs at least 2 images per batch: {fix}, or set strategy.bn=frozen_stats")


def _batchnorm_in(model: TransferModel, groups: Any) -> bool:
    """Whether a BatchNorm layer has parameters in `groups` (None: anywhere; a layer without any counts as in)."""
    names = None if groups is None else {name for g in model.groups if g.name in groups for name in g.params}
    for path, module in model.model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = [f"{path}.{name}" for name, _ in module.named_parameters(recurse=False)]
            if names is None or not params or any(name in names for name in params):
                return True
    return False


def starts_pretrained(backbone: BackboneConfig, pretrained: bool = True) -> bool:
    """Whether the network starts from trained weights (a download or a local checkpoint), not a random init."""
    return pretrained and (backbone.pretrained or backbone.checkpoint is not None)


def layer_groups(model: nn.Module, matcher: dict[str, Any], classifier_path: str) -> list[LayerGroup]:
    """Cut `model` into ordered groups with timm's matcher; the new classifier alone is the `head` group.

    What the matcher puts with the classifier but is not the new head (a final norm, timm's
    `conv_head`, kept pre-logits layers) is the top of the backbone: it joins the last block
    group, so `last:1` trains a block with it, never a lone norm or projection.
    """
    from timm.models import group_parameters

    head_prefix = classifier_path + "."
    by_index = group_parameters(model, matcher)
    groups: list[LayerGroup] = []
    for index in sorted(by_index):
        params = [p for p in by_index[index] if not p.startswith(head_prefix)]
        if params and groups and len(params) < len(by_index[index]):
            groups[-1].params.extend(params)
        elif params:
            groups.append(LayerGroup(_group_name(params[0], matcher, len(groups)), params))
    head_params = [name for name, _ in model.named_parameters() if name.startswith(head_prefix)]
    taken = [group.name for group in groups]
    aliases = tuple(sorted(
        alias for alias in {classifier_path, classifier_path.split(".")[0]} - {HEAD}
        if not any(name == alias or name.startswith(alias + ".") for name in taken)
    ))
    groups.append(LayerGroup(HEAD, head_params, aliases))
    _dedupe_names(groups)
    return groups


def _group_name(first_param: str, matcher: dict[str, Any], position: int) -> str:
    """Name a group after the matcher text its first parameter matched (`layer1`, `blocks.3`)."""
    for key, patterns in matcher.items():
        for pattern in [patterns] if isinstance(patterns, str) else [p for p, _ in patterns]:
            found = re.match(pattern, first_param)
            if found:
                return "stem" if key == "stem" else found.group(0).rstrip(".") or f"group{position}"
    return first_param.rpartition(".")[0] or f"group{position}"


def _dedupe_names(groups: list[LayerGroup]) -> None:
    seen: dict[str, int] = {}
    for group in groups:
        count = seen.get(group.name, 0)
        seen[group.name] = count + 1
        if count:
            group.name = f"{group.name}_{count}"
