"""Each choice is spelled once, in config/schema.py: the registries that build the choices, the tables that map
them and the conf/<group>/ files named after them hold exactly the schema's names, and a typo is one line
naming them. A Toggle (auto | true | false) is read one way wherever it is used."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from transfer_cli.config import schema
from transfer_cli.config.checks import RULE, TOGGLE_CHOICES, is_auto, resolve_toggle
from transfer_cli.config.compose import compose_config
from transfer_cli.core.errors import TransferError
from transfer_cli.core.registry import Registry

from conftest import REPO


def builders() -> dict[str, tuple[tuple[str, ...], object]]:
    """Config key -> (the schema's choices, the names its builders are found under)."""
    from transfer_cli.data.datasets import DATASETS
    from transfer_cli.data.transforms import INTERPOLATIONS, POLICIES
    from transfer_cli.models.backbones import BACKBONE_SOURCES
    from transfer_cli.models.model import HEADS
    from transfer_cli.training.optim import OPTIMIZERS, SCHEDULERS

    return {
        "backbone.source": (schema.BACKBONE_SOURCE_NAMES, BACKBONE_SOURCES.names()),
        "head.kind": (schema.HEAD_KINDS, HEADS.names()),
        "dataset.name": (schema.DATASET_NAMES, DATASETS.names()),
        "optimizer.name": (schema.OPTIMIZER_NAMES, OPTIMIZERS.names()),
        "scheduler.name": (schema.SCHEDULER_NAMES, SCHEDULERS.names()),
        "transforms.interpolation": (schema.INTERPOLATION_NAMES, list(INTERPOLATIONS)),
        "augment.policy": (schema.AUGMENT_POLICIES, list(POLICIES)),
    }


@pytest.mark.parametrize("key", list(builders()))
def test_every_schema_choice_has_a_builder_and_every_builder_a_choice(key: str) -> None:
    choices, built = builders()[key]
    assert sorted(choices) == sorted(built)


def test_a_registry_takes_no_name_outside_the_schemas_choices() -> None:
    registry: Registry[int] = Registry("optimizer", "optimizer.name", schema.OPTIMIZER_NAMES)
    registry.register("adam")(1)
    with pytest.raises(ValueError, match="'adamax' is not a choice of optimizer.name"):
        registry.register("adamax")
    assert registry.get("adam") == 1 and registry.names() == ["adam"]


# conf/<group>/ whose file names are the schema's choices, and the key each file sets to its own name
CHOICE_GROUPS = {"head": ("kind", schema.HEAD_KINDS), "dataset": ("name", schema.DATASET_NAMES),
                 "optimizer": ("name", schema.OPTIMIZER_NAMES), "scheduler": ("name", schema.SCHEDULER_NAMES)}
# conf/<group>/ whose options are named freely, each file setting that key to its own name
NAMED_GROUPS = {"strategy": "name", "augment": "name"}


def options(group: str) -> list[Path]:
    return sorted((REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", list(CHOICE_GROUPS))
def test_a_groups_options_are_the_schemas_choices(group: str) -> None:
    _, choices = CHOICE_GROUPS[group]
    assert sorted(path.stem for path in options(group)) == sorted(choices)


@pytest.mark.parametrize("group", [*CHOICE_GROUPS, *NAMED_GROUPS])
def test_each_option_is_named_by_its_file(group: str) -> None:
    key = CHOICE_GROUPS[group][0] if group in CHOICE_GROUPS else NAMED_GROUPS[group]
    for path in options(group):
        assert getattr(getattr(compose_config([f"{group}={path.stem}"]), group), key) == path.stem, path


def test_the_logger_options_are_the_schemas_loggers() -> None:
    assert sorted(path.stem for path in options("logger")) == sorted(
        spec.name for spec in dataclasses.fields(schema.LoggerConfig))


def choice_fields() -> dict[str, tuple[str, ...]]:
    """Dotted key -> the names its rule takes, for every schema field whose rule is a list of names."""
    found = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            says = getattr(spec.metadata.get(RULE), "says", "")
            if says.startswith("must be one of "):
                found[f"{prefix}{spec.name}"] = tuple(says.removeprefix("must be one of ").split(", "))
            nested = _dataclass_in(hints[spec.name])
            if nested is not None:
                walk(nested, f"{prefix}{spec.name}.")

    walk(schema.TrainConfig, "")
    return found


def _dataclass_in(hint: object) -> type | None:
    """The dataclass a field holds: itself, Optional[...], list[...] or Optional[list[...]]."""
    kinds = [hint, *typing.get_args(hint), *(arg for sub in typing.get_args(hint) for arg in typing.get_args(sub))]
    return next((kind for kind in kinds if dataclasses.is_dataclass(kind)), None)


def test_every_choice_field_takes_the_names_of_a_schema_constant() -> None:
    """A choice spelled out inside a field's rule would be a second spelling: each comes from a tuple constant."""
    constants = {value for name, value in vars(schema).items() if name.isupper() and isinstance(value, tuple)}
    spelled = {key: names for key, names in choice_fields().items() if names not in constants | {TOGGLE_CHOICES}}
    assert spelled == {"trainer.device": ("auto", "cpu", "cuda", "cuda:N", "mps")}  # a pattern (cuda:N), not names


TYPOS = {"backbone.source": "hf", "head.kind": "conv", "dataset.name": "mnist", "optimizer.name": "adamax",
         "scheduler.name": "step", "transforms.interpolation": "lanczos", "augment.policy": "cutout",
         "transforms.crop_mode": "crop", "dataset.on_bad_image": "ignore", "dataset.domain": "mid",
         "trainer.early_stopping.monitor": "val/acc3", "trainer.amp": "maybe", "logger.wandb.mode": "later",
         "dataset.balance": "oversample"}


@pytest.mark.parametrize(("key", "typo"), list(TYPOS.items()))
def test_a_typo_in_a_choice_is_one_line_naming_the_schemas_choices(key: str, typo: str) -> None:
    extra = ["logger=wandb"] if key.startswith("logger.") else []
    with pytest.raises(TransferError) as error:
        compose_config(["experiment=smoke", *extra, f"{key}={typo}"])
    assert str(error.value) == f"{key}={typo}: must be one of {', '.join(choice_fields()[key])}"


# --------------------------------------------------------------------------- Toggle


@pytest.mark.parametrize(("given", "auto", "on"), [
    ("auto", True, True), ("auto", False, False), ("AUTO", True, True), ("true", False, True), ("false", True, False),
    ("True", False, True), ("False", True, False), ("TRUE", False, True), (True, False, True), (False, True, False),
])
def test_a_toggle_resolves_one_way_whatever_its_spelling(given: object, auto: bool, on: bool) -> None:
    assert resolve_toggle(given, auto=auto) is on
    assert is_auto(given) == (str(given).lower() == "auto")


@pytest.mark.parametrize("given", ["true", "True", "TRUE", "false", "False", "auto"])
def test_yaml_and_command_line_booleans_reach_a_toggle_as_they_did(given: str) -> None:
    """YAML and Hydra turn true/false into booleans; a Toggle field keeps them as True/False and reads them so."""
    cfg = compose_config(["experiment=smoke", f"trainer.amp={given}", f"trainer.cache_features={given}"])
    expected = {"true": "True", "false": "False"}.get(given.lower(), given)
    assert cfg.trainer.amp == cfg.trainer.cache_features == expected
    assert resolve_toggle(cfg.trainer.amp, auto=False) == (given.lower() == "true")
