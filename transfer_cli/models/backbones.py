"""Build a pretrained (or random) network from timm or torchvision, offline-aware.

Each source is a registry entry returning the network with its original classifier, the
dotted path of that classifier, the regex group matcher that cuts it into layer groups,
and the preprocessing its weights were trained with.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from transfer_cli.config.schema import BACKBONE_SOURCE_NAMES, BackboneConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.core.registry import Registry, unknown_name_error


log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedPreprocessing:
    """What the weights expect: input size, resize interpolation, crop and normalization.

    `image_size` is (height, width) where the weights' input is not square. `crop_mode` is
    timm's: `center` scales the short side to size/crop_pct and centre-crops, `squash` scales
    both sides to size/crop_pct (aspect not kept), `border` scales the long side and pads with
    the mean colour; crop_pct > 1 leaves a border around the image.
    """

    image_size: int | tuple[int, int]
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_mode: str = "center"


@dataclass
class RawBackbone:
    model: nn.Module
    classifier_path: str
    group_matcher: dict[str, Any]
    preprocessing: PretrainedPreprocessing
    weights_source: str  # human-readable origin of the weights, for the run record


BACKBONE_SOURCES: Registry[Callable[[BackboneConfig, bool], RawBackbone]] = Registry(
    "backbone source", "backbone.source", BACKBONE_SOURCE_NAMES
)


def build_raw_backbone(cfg: BackboneConfig, pretrained: bool, load_weights: bool = True) -> RawBackbone:
    """Build the network named by `cfg`; `pretrained=False` forces random init.

    `load_weights=False`: the caller replaces every tensor (a resumed run's checkpoint), so a timm network is
    built without downloading or reading its weights, yet says where they came from (`weights_source`), as
    pretrained_cfg and preprocessing do not depend on them. torchvision's weights also shape the architecture
    (ViT's image size, GoogLeNet's input transform), so its networks are always built with them.
    """
    if cfg.source == "timm":
        return _timm_backbone(cfg, pretrained, load_weights)
    return BACKBONE_SOURCES.get(cfg.source)(cfg, pretrained)


def _offline_error(name: str, cache: str, exc: Exception) -> TransferError:
    return TransferError(
        f"could not load pretrained weights for '{name}' ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200]}); weights are cached in {cache}: with no network, "
        "put them there (HF_HOME / TORCH_HOME choose the cache, HF_HUB_OFFLINE=1 reads it "
        "without asking the hub), pass backbone.checkpoint=<local file>, or use "
        "backbone.pretrained=false"
    )


def _named_checkpoint(path: str | None) -> Path | None:
    return None if path is None else Path(path).expanduser()


def _check_checkpoint(path: str | None) -> Path | None:
    file = _named_checkpoint(path)
    if file is not None and not file.is_file():
        raise TransferError(f"backbone.checkpoint '{path}' is not a file: give the path of a saved state dict")
    return file


@BACKBONE_SOURCES.register("timm")
def _timm_backbone(cfg: BackboneConfig, pretrained: bool, load_weights: bool = True) -> RawBackbone:
    import timm
    from timm.data import resolve_data_config

    arch = cfg.name.split(".")[0]
    if not timm.is_model(arch):
        raise unknown_name_error("timm model", cfg.name, timm.list_models(), "backbone.name")
    # unread weights need no file: the one a run started from may be gone when it resumes
    checkpoint = _check_checkpoint(cfg.checkpoint) if load_weights else _named_checkpoint(cfg.checkpoint)
    download = pretrained and cfg.pretrained and checkpoint is None
    try:
        model = timm.create_model(cfg.name, pretrained=download and load_weights,
                                  **model_arguments(cfg, "drop_path_rate"))
    except TypeError as exc:
        raise _bad_arguments(cfg, exc) from exc
    except (OSError, RuntimeError, ValueError) as exc:
        if not download:
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        raise _offline_error(cfg.name, HF_HUB_CACHE, exc) from exc
    source = f"hf-hub {model.pretrained_cfg.get('hf_hub_id') or cfg.name}" if download else "random init"
    if pretrained and checkpoint is not None:
        if load_weights:
            _load_state_dict_file(model, checkpoint)
        source = f"file {checkpoint}"
    return RawBackbone(
        model=model,
        classifier_path=model.pretrained_cfg["classifier"],
        group_matcher=model.group_matcher(coarse=True),
        preprocessing=timm_preprocessing(resolve_data_config({}, model=model)),
        weights_source=source,
    )


def model_arguments(cfg: BackboneConfig, drop_path_name: str) -> dict[str, Any]:
    """backbone.kwargs, with backbone.drop_path_rate under the name this library gives it."""
    extra = dict(cfg.kwargs)
    if cfg.drop_path_rate is not None:
        extra[drop_path_name] = cfg.drop_path_rate
    return extra


def _bad_arguments(cfg: BackboneConfig, error: TypeError) -> TransferError:
    given = ", ".join(f"{key}={value}" for key, value in model_arguments(cfg, "drop_path_rate").items())
    return TransferError(f"{cfg.source} model '{cfg.name}' does not take {given or 'these arguments'} ({error}): "
                         "check backbone.kwargs and backbone.drop_path_rate")


def timm_preprocessing(data: dict[str, Any]) -> PretrainedPreprocessing:
    """The preprocessing in a timm data config (`resolve_data_config`): what timm's own eval
    transform (`create_transform(**data)`) does, crop mode included."""
    height, width = (int(side) for side in data["input_size"][-2:])
    return PretrainedPreprocessing(
        image_size=height if height == width else (height, width),
        crop_pct=float(data["crop_pct"]),
        interpolation=str(data["interpolation"]),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        crop_mode=str(data["crop_mode"]),
    )


# Layer-group matchers for torchvision families, in timm's group_matcher format, built from the
# model (some families' last block index depends on the variant). A spec ending in MATCH_PREV
# joins the group before it, as in timm; whatever no spec matches joins the head's group, whose
# backbone part (final norm, pre-logits) `layer_groups` puts into the last block group.
MATCH_PREV = 99999


def _features_with_conv_head(model: nn.Module) -> dict[str, Any]:
    """EfficientNet (v1, v2), MobileNet (v2, v3): features.0 is the stem; the final 1x1 conv
    features.N joins the last block, as timm's `conv_head`, so `last:1` trains a real block."""
    last = len(model.features) - 1
    return {"stem": r"^features\.0\.",
            "blocks": [(rf"^features\.{last}\.", (last - 1, MATCH_PREV)), (r"^features\.(\d+)\.", None)]}


def _stages_after_downsampling(model: nn.Module) -> dict[str, Any]:
    """ConvNeXt, Swin: features.1 is the first stage; each downsampling layer (features.2/4/6)
    forms one group with the stage it feeds, as timm's `stages.N`, not a group of its own."""
    specs = [(rf"^features\.{i}\.", (i - 1, MATCH_PREV)) for i in range(3, len(model.features), 2)]
    return {"stem": r"^features\.0\.", "blocks": [*specs, (r"^features\.(\d+)\.", None)]}


def _pool_delimited_blocks(model: nn.Module) -> dict[str, Any]:
    """VGG, AlexNet: one group per conv block (the layers up to each max-pool), the first is the stem."""
    specs, block = [], 0
    for index, layer in enumerate(model.features):
        if any(True for _ in layer.parameters()):
            specs.append((rf"^features\.{index}\.", (block,)))
        block += isinstance(layer, nn.MaxPool2d)
    return {"stem": "|".join(spec for spec, (index,) in specs if index == 0),
            "blocks": [(spec, ordinal) for spec, ordinal in specs if ordinal != (0,)]}


TORCHVISION_MATCHERS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    r"^(resnet|resnext|wide_resnet)": lambda _: {"stem": r"^conv1\.|^bn1\.", "blocks": r"^layer(\d+)\."},
    r"^(efficientnet|mobilenet)": _features_with_conv_head,
    r"^(convnext|swin)": _stages_after_downsampling,
    r"^mnasnet": lambda _: {"stem": r"^layers\.[0-7]\.",  # stem conv + the first separable conv
                            "blocks": [(r"^layers\.1[45]\.", (13, MATCH_PREV)), (r"^layers\.(\d+)\.", None)]},
    r"^vit_": lambda _: {
        "stem": r"^class_token|^conv_proj\.|^encoder\.pos_embedding",
        "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)\.", None), (r"^encoder\.ln\.", (MATCH_PREV,))],
    },
    r"^regnet": lambda _: {"stem": r"^stem\.", "blocks": r"^trunk_output\.block(\d+)\."},
    r"^maxvit": lambda _: {"stem": r"^stem\.", "blocks": r"^blocks\.(\d+)\."},
    r"^densenet": lambda _: {"stem": r"^features\.(?:conv|norm)0\.",  # timm's densenet matcher
                             "blocks": r"^features\.(?:denseblock|transition)(\d+)\."},
    r"^shufflenet": lambda _: {"stem": r"^conv1\.", "blocks": r"^stage(\d+)\."},
    r"^(vgg|alexnet)": _pool_delimited_blocks,
}


def _torchvision_matcher(name: str, model: nn.Module) -> dict[str, Any]:
    for pattern, matcher in TORCHVISION_MATCHERS.items():
        if re.match(pattern, name):
            return matcher(model)
    # Fallback: one group per top-level child, in registration order.
    children = [child for child, module in model.named_children() if any(True for _ in module.parameters())]
    return {"blocks": [(rf"^{re.escape(child)}\.", (index,)) for index, child in enumerate(children)]}


def _last_linear_path(model: nn.Module, name: str) -> str:
    linears = [path for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise TransferError(f"torchvision model '{name}' has no linear classifier to replace: choose another "
                            "backbone.name")
    return linears[-1]


def _own_classifier(model: nn.Module, name: str) -> str:
    """Cut the torchvision classifier down to its final Linear and return that Linear's path.

    The Dropouts just before the Linear go with it (the new head brings the dropout the
    config asks for). Pretrained layers before them stay: ConvNeXt's norm and flatten,
    MaxViT's norm and pre-logits, the hidden Linear layers of MobileNetV3, VGG and AlexNet
    (as timm keeps `conv_head`/`pre_logits`); the Dropouts among those become Identity, as
    timm builds these models with drop_rate=0, so `head.dropout` is the only dropout after
    the pooled features.
    """
    path = _last_linear_path(model, name)
    top, _, rest = path.partition(".")
    container = model.get_submodule(top)
    children = list(container.named_children())
    if not isinstance(container, nn.Sequential) or children[-1][0] != rest:
        return path  # a bare Linear (`fc`, `head`), or not the last layer of a Sequential
    start = len(children) - 1
    while start > 0 and isinstance(children[start - 1][1], nn.Dropout):
        start -= 1
    linear = model.get_submodule(path)
    if start == 0:
        model.set_submodule(top, linear)
        return top
    kept = [(child, nn.Identity() if isinstance(layer, nn.Dropout) else layer) for child, layer in children[:start]]
    model.set_submodule(top, nn.Sequential(OrderedDict([*kept, (children[start][0], linear)])))
    return f"{top}.{children[start][0]}"


@BACKBONE_SOURCES.register("torchvision")
def _torchvision_backbone(cfg: BackboneConfig, pretrained: bool) -> RawBackbone:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if cfg.name not in known:
        raise unknown_name_error("torchvision classification model", cfg.name, known, "backbone.name")
    weights_enum = torchvision.models.get_model_weights(cfg.name)
    weights = None
    if cfg.weights is not None:
        try:
            weights = weights_enum.DEFAULT if cfg.weights == "DEFAULT" else weights_enum[cfg.weights]
        except KeyError:
            options = [member.name for member in weights_enum] + ["DEFAULT", "null"]
            raise unknown_name_error(f"weights for {cfg.name}", cfg.weights, options, "backbone.weights") from None
    checkpoint = _check_checkpoint(cfg.checkpoint)
    download = weights if (pretrained and cfg.pretrained and checkpoint is None) else None
    try:
        model = torchvision.models.get_model(cfg.name, weights=download,
                                             **model_arguments(cfg, "stochastic_depth_prob"))
    except TypeError as exc:
        raise _bad_arguments(cfg, exc) from exc
    except (OSError, RuntimeError) as exc:
        raise _offline_error(f"{cfg.name} {weights}", os.path.join(torch.hub.get_dir(), "checkpoints"), exc) from exc
    source = f"torchvision {weights}" if download is not None else "random init"
    if pretrained and checkpoint is not None:
        _load_state_dict_file(model, checkpoint)
        source = f"file {checkpoint}"
    preset = (weights or weights_enum.DEFAULT).transforms()
    crop, resize = int(preset.crop_size[0]), int(preset.resize_size[0])
    return RawBackbone(
        model=model,
        classifier_path=_own_classifier(model, cfg.name),
        group_matcher=_torchvision_matcher(cfg.name, model),
        preprocessing=PretrainedPreprocessing(
            image_size=crop,
            crop_pct=crop / resize,
            interpolation=preset.interpolation.value,
            mean=tuple(preset.mean),
            std=tuple(preset.std),
        ),
        weights_source=source,
    )


def _load_state_dict_file(model: nn.Module, file: Path) -> None:
    """Load local weights, skipping tensors whose shape differs (a classifier for other classes)."""
    from transfer_cli.core.errors import torch_file_problem

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a zip, pickled code: the same user mistake
        raise TransferError(f"backbone.checkpoint '{file}' is not a readable PyTorch state dict: "
                            f"{torch_file_problem(file, exc)}") from exc
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = "a dict of values that are not all tensors" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise TransferError(f"backbone.checkpoint '{file}' holds {held}, not a state dict (names mapped to tensors): "
                            "save one with torch.save(model.state_dict(), path)")
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(matching))
    if not matching:
        raise TransferError(f"backbone.checkpoint '{file}' shares no weights with this backbone: was it saved from "
                            "another model?")
    result = model.load_state_dict(matching, strict=False)
    if skipped or result.missing_keys:
        log.warning("checkpoint %s: %d tensors skipped (shape or name differs), %d left at init",
                    file, len(skipped), len(result.missing_keys))


def weights_location(cfg: BackboneConfig, pretrained: bool, model: nn.Module) -> dict[str, Any]:
    """Where the weights would come from, and whether they are already there (no download)."""
    if not (pretrained and (cfg.pretrained or cfg.checkpoint)):
        return {"from": "random init"}
    if cfg.checkpoint is not None:
        return {"from": "file", "path": cfg.checkpoint, "present": Path(cfg.checkpoint).expanduser().is_file()}
    if cfg.source == "timm":
        from huggingface_hub import constants, try_to_load_from_cache

        repo = getattr(model, "pretrained_cfg", {}).get("hf_hub_id")
        if not repo:
            return {"from": "timm url", "cache": os.path.join(torch.hub.get_dir(), "checkpoints"), "present": None}
        found = [try_to_load_from_cache(repo, name) for name in ("model.safetensors", "pytorch_model.bin")]
        return {"from": f"hf-hub {repo}", "cache": constants.HF_HUB_CACHE,
                "present": any(isinstance(path, str) for path in found), "offline": bool(constants.HF_HUB_OFFLINE)}
    import torchvision

    enum = torchvision.models.get_model_weights(cfg.name)
    weights = enum.DEFAULT if cfg.weights in (None, "DEFAULT") else enum[cfg.weights]
    file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    return {"from": f"torchvision {weights}", "cache": file, "present": os.path.isfile(file)}
