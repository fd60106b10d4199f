"""Every YAML file composes onto the schema; typos and wrong types fail at composition."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from transfer_cli.config.schema import TrainConfig

from conftest import REPO, compose_train


GROUP_OPTIONS = sorted(
    (path.parent.name, path.stem)
    for path in (REPO / "conf").glob("*/*.yaml")
)
NEEDS_NAME = {("backbone", "timm"): ["backbone.name=test_resnet"],
              ("backbone", "torchvision"): ["backbone.name=resnet18"]}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_file_composes(group: str, option: str) -> None:
    cfg = compose_train([f"{group}={option}", *NEEDS_NAME.get((group, option), [])])
    assert isinstance(cfg, TrainConfig)
    if group == "strategy":
        assert cfg.strategy.name == option and (cfg.strategy.stages or cfg.strategy.by_train_size)
    if (group, option) == ("experiment", "smoke"):
        assert cfg.dataset.name == "synthetic"


def test_defaults_are_the_lessons_flower_project() -> None:
    cfg = compose_train([])
    assert (cfg.backbone.source, cfg.backbone.name, cfg.backbone.weights) == (
        "torchvision", "efficientnet_b0", "IMAGENET1K_V1")
    assert cfg.dataset.name == "flowers102" and cfg.strategy.name == "gradual"
    assert [s.epochs for s in cfg.strategy.stages] == [5, 5, 10]


def test_typo_in_key_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_train(["trainer.epoch=3"])


def test_wrong_type_fails_at_composition() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_train(["trainer.batch_size=big"])


def test_unknown_group_option_fails() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_train(["strategy=fine_tuning"])
