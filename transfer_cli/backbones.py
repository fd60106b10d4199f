"""Build a pretrained (or random) network from timm or torchvision, offline-aware.

Each source is a registry entry returning the network with its original classifier, the
dotted path of that classifier, the regex group matcher that cuts it into layer groups,
and the preprocessing its weights were trained with.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from transfer_cli.config import BackboneConfig
from transfer_cli.errors import TransferError
from transfer_cli.registry import Registry, unknown_name_error

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedPreprocessing:
    """What the weights expect: input size, resize interpolation, crop and normalization."""

    image_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class RawBackbone:
    model: nn.Module
    classifier_path: str
    group_matcher: dict[str, Any]
    preprocessing: PretrainedPreprocessing
    weights_source: str  # human-readable origin of the weights, for the run record


BACKBONE_SOURCES: Registry[Callable[[BackboneConfig, bool], RawBackbone]] = Registry(
    "backbone source", "backbone.source"
)


def build_raw_backbone(cfg: BackboneConfig, pretrained: bool) -> RawBackbone:
    """Build the network named by `cfg`; `pretrained=False` forces random init."""
    return BACKBONE_SOURCES.get(cfg.source)(cfg, pretrained)


def _offline_error(name: str, cache: str, exc: Exception) -> TransferError:
    return TransferError(
        f"could not load pretrained weights for '{name}' ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200]}); weights are cached in {cache}: with no network, "
        "put them there (HF_HOME / TORCH_HOME choose the cache, HF_HUB_OFFLINE=1 reads it "
        "without asking the hub), pass backbone.checkpoint=<local file>, or use "
        "backbone.pretrained=false"
    )


def _check_checkpoint(path: str | None) -> Path | None:
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise TransferError(f"backbone.checkpoint '{path}' is not a file: give the path of a saved state dict")
    return file


@BACKBONE_SOURCES.register("timm")
def _timm_backbone(cfg: BackboneConfig, pretrained: bool) -> RawBackbone:
    import timm
    from timm.data import resolve_data_config

    arch = cfg.name.split(".")[0]
    if not timm.is_model(arch):
        raise unknown_name_error("timm model", cfg.name, timm.list_models(), "backbone.name")
    checkpoint = _check_checkpoint(cfg.checkpoint)
    download = pretrained and cfg.pretrained and checkpoint is None
    try:
        model = timm.create_model(cfg.name, pretrained=download)
    except (OSError, RuntimeError, ValueError) as exc:
        if not download:
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        raise _offline_error(cfg.name, HF_HUB_CACHE, exc) from exc
    source = f"hf-hub {model.pretrained_cfg.get('hf_hub_id') or cfg.name}" if download else "random init"
    if pretrained and checkpoint is not None:
        _load_state_dict_file(model, checkpoint)
        source = f"file {checkpoint}"
    data = resolve_data_config({}, model=model)
    return RawBackbone(
        model=model,
        classifier_path=model.pretrained_cfg["classifier"],
        group_matcher=model.group_matcher(coarse=True),
        preprocessing=PretrainedPreprocessing(
            image_size=int(data["input_size"][-1]),
            crop_pct=float(data["crop_pct"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        ),
        weights_source=source,
    )


# Layer-group matchers for torchvision families, in timm's group_matcher format.
TORCHVISION_MATCHERS: dict[str, dict[str, Any]] = {
    r"^(resnet|resnext|wide_resnet)": {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"},
    r"^(efficientnet|mobilenet|convnext|swin|mnasnet)": {
        "stem": r"^features\.0\.|^layers\.[0-2]\.",
        "blocks": [(r"^features\.(\d+)", None), (r"^layers\.(\d+)", None)],
    },
    r"^vit_": {
        "stem": r"^class_token|^conv_proj|^encoder\.pos_embedding",
        "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)", None), (r"^encoder\.ln", (99999,))],
    },
    r"^regnet": {"stem": r"^stem", "blocks": r"^trunk_output\.block(\d+)"},
}


def _torchvision_matcher(name: str, model: nn.Module) -> dict[str, Any]:
    for pattern, matcher in TORCHVISION_MATCHERS.items():
        if re.match(pattern, name):
            return matcher
    # Fallback: one group per top-level child, in registration order.
    children = [child for child, module in model.named_children() if any(True for _ in module.parameters())]
    return {"blocks": [(rf"^{re.escape(child)}\.", (index,)) for index, child in enumerate(children)]}


def _last_linear_path(model: nn.Module, name: str) -> str:
    linears = [path for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise TransferError(f"torchvision model '{name}' has no linear classifier to replace: choose another backbone.name")
    return linears[-1]


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
        model = torchvision.models.get_model(cfg.name, weights=download)
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
        classifier_path=_last_linear_path(model, cfg.name),
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
    from transfer_cli.rundir import torch_file_problem

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
        raise TransferError(f"backbone.checkpoint '{file}' shares no weights with this backbone: was it saved from another model?")
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
