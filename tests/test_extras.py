"""A missing optional extra leaves every command working; only the feature that needs it names the extra."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from transfer_cli.core import extras


def no_hydra_plugins(name: str, *args: object) -> object:
    """find_spec as it behaves in a venv without any Hydra plugin: a dotted name's parent is missing."""
    if name.startswith("hydra_plugins"):
        raise ModuleNotFoundError("No module named 'hydra_plugins'")
    return REAL_FIND_SPEC(name, *args)


REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def without_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", no_hydra_plugins)


def test_installed_answers_false_when_the_parent_package_is_missing(without_plugins: None) -> None:
    assert extras.installed("hydra_plugins.hydra_optuna_sweeper") is False
    assert extras.installed("omegaconf") is True


@pytest.mark.parametrize(("override", "extra"), [
    ("hparams_search=optuna", "search"), ("hydra/launcher=joblib", "cluster"),
    ("hydra/launcher=submitit_slurm", "cluster"), ("+hydra/sweeper=optuna", "search"),
])
def test_a_plugin_override_without_its_plugin_names_the_extra(without_plugins: None, override: str, extra: str) -> None:
    hint = extras.missing_plugin(["experiment=smoke", override])
    assert hint is not None and hint.startswith(override) and f'pip install -e ".[{extra}]"' in hint


def test_overrides_that_need_nothing_pass(without_plugins: None) -> None:
    assert extras.missing_plugin(["experiment=smoke", "hparams_search=null", "strategy=gradual"]) is None


def test_the_schema_registers_without_any_plugin(without_plugins: None) -> None:
    """The crash a fresh `pip install -e ".[dev]"` met on its first command."""
    from hydra.core.config_store import ConfigStore

    from transfer_cli.config.compose import register_configs

    store = ConfigStore.instance()
    saved = copy.deepcopy(store.repo)  # the stand-in sweeper must not shadow the real plugin for later tests
    try:
        register_configs()
        assert store.repo["hydra"]["sweeper"]["optuna.yaml"].provider == "transfer"
    finally:
        store.repo = saved
