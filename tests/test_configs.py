"""Every YAML file composes onto the schema and states only what its option changes; typos and wrong types fail
at composition."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
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
def test_every_config_file_composes(group: str, option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFER_ASSETS", str(tmp_path))  # the quick configs' assets folder (make sets it)
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


# --------------------------------------------------------------------------- defaults in one place


def _default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds: itself, Optional[...], list[...] or Optional[list[...]]."""
    kinds = [hint, *typing.get_args(hint), *(arg for sub in typing.get_args(hint) for arg in typing.get_args(sub))]
    return next((kind for kind in kinds if dataclasses.is_dataclass(kind)), None)


def _restated(values: dict[str, Any], cls: type, where: str) -> list[str]:
    """Keys of `values` (a conf file's node, merged onto `cls`) whose value is the dataclass's own default."""
    hints, specs = typing.get_type_hints(cls), {spec.name: spec for spec in dataclasses.fields(cls)}
    found = []
    for key, value in values.items():
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, dict):
            found += _restated(value, nested, f"{where}.{key}")
        elif nested is not None and isinstance(value, list):
            for index, item in enumerate(value):
                found += _restated(item, nested, f"{where}.{key}[{index}]")
        elif value == _default(specs[key]):
            found.append(f"{where}.{key}: {value!r}")
    return found


def _group_class(group: str, option: str) -> type:
    """The dataclass a conf/<group>/<option>.yaml merges onto (a logger file: its own logger's)."""
    hint = typing.get_type_hints(TrainConfig)[group]
    cls = _dataclass_in(hint)
    return _dataclass_in(typing.get_type_hints(cls)[option]) if group == "logger" else cls


SCHEMA_GROUPS = [(group, option) for group, option in GROUP_OPTIONS if group in TrainConfig.__dataclass_fields__]


@pytest.mark.parametrize(("group", "option"), SCHEMA_GROUPS, ids=[f"{g}={o}" for g, o in SCHEMA_GROUPS])
def test_a_group_option_states_only_what_it_changes(group: str, option: str) -> None:
    """The dataclasses in config/schema.py hold every default: a conf/<group>/ file that restated one would be
    a second place to change it. The key that names the option (`kind: linear`, `name: adam`) may say so."""
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / group / f"{option}.yaml")) or {}
    named = {key: value for key, value in values.items() if value != option}
    assert _restated(named, _group_class(group, option), group) == []
