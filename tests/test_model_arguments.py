"""backbone.drop_path_rate and backbone.kwargs reach the library's own constructor (timm create_model,
torchvision get_model); an argument the model does not take is one line."""

from __future__ import annotations

import pytest
from torch import nn

from transfer_cli.core.errors import TransferError
from transfer_cli.models.model import build_model

from conftest import compose_train


def drop_probs(model: nn.Module) -> list[float]:
    found = []
    for module in model.modules():
        name = type(module).__name__
        if name == "DropPath":
            found.append(float(module.drop_prob))
        elif name == "StochasticDepth":
            found.append(float(module.p))
    return found


def built(*overrides: str) -> nn.Module:
    cfg = compose_train(["experiment=smoke", *overrides])
    return build_model(cfg.backbone, cfg.head, 3, pretrained=False).model


@pytest.mark.slow
def test_timm_drop_path_rate_and_kwargs() -> None:
    assert not [p for p in drop_probs(built()) if p > 0]
    rates = drop_probs(built("backbone.drop_path_rate=0.2"))
    assert rates and max(rates) == pytest.approx(0.2)
    assert built("+backbone.kwargs.drop_rate=0.3").drop_rate == 0.3


def test_torchvision_drop_path_rate_is_its_stochastic_depth() -> None:
    rates = drop_probs(built("backbone=torchvision", "backbone.name=efficientnet_b0", "backbone.weights=null",
                             "backbone.drop_path_rate=0.4"))
    assert rates and max(rates) == pytest.approx(0.4 * 15 / 16)  # the last of its 16 blocks


@pytest.mark.parametrize("override", ["+backbone.kwargs.no_such_argument=1",
                                      "backbone.drop_path_rate=0.1 backbone=torchvision backbone.name=resnet18"])
def test_an_argument_the_model_does_not_take_is_one_line(override: str) -> None:
    with pytest.raises(TransferError, match="does not take .*check backbone.kwargs and backbone.drop_path_rate"):
        built(*override.split())


def test_drop_path_rate_is_a_probability() -> None:
    with pytest.raises(TransferError, match="backbone.drop_path_rate"):
        compose_train(["experiment=smoke", "backbone.drop_path_rate=1.5"])
