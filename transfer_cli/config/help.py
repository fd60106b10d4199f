"""The config `transfer train --help` shows: Hydra's help template names it `${transfer_help_config:}` (in place of
Hydra's `$CONFIG`), so the dataset group lists only the keys its kind reads (schema fields marked `only_for`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from transfer_cli.config.checks import unread_fields
from transfer_cli.config.schema import DatasetConfig


RESOLVER = "transfer_help_config"


def help_config(*, _root_: DictConfig) -> str:
    """The composed config as YAML without Hydra's settings, its dataset without the keys its kind never reads."""
    tree: dict[str, Any] = OmegaConf.to_container(_root_, resolve=False)  # type: ignore[assignment]
    tree.pop("hydra", None)
    dataset = tree.get("dataset") or {}
    for key in unread_fields(DatasetConfig, str(dataset.get("name"))):
        dataset.pop(key, None)
    return OmegaConf.to_yaml(tree)


def register_help_resolver() -> None:
    """Make `${transfer_help_config:}` resolvable (registering it again changes nothing)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, help_config)
