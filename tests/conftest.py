"""Shared fixtures: in-process config composition and the optional real-data assets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from transfer_cli.config.compose import register_configs
from transfer_cli.config.loading import config_dir
from transfer_cli.config.schema import TrainConfig


REPO = Path(__file__).resolve().parent.parent

# Small, quick runs: the smoke experiment shrunk further.
# steps per epoch follow from these counts (96 / 16 = 6), so no selection split is carved from train; the default
# one is tested where it is the subject (test_selection, test_train's run directory, the golden runs, the CLI)
FAST = [
    "experiment=smoke",
    "dataset.train_size=96",
    "dataset.val_size=48",
    "trainer.epochs=3",
    "dataset.select_fraction=0",
]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores among the workers instead of oversubscribing them.

    Every worker (and every process a test starts) would otherwise run torch with one OpenMP
    thread per core, and spinning threads that lose their core stall each other's steps.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = threads  # for the processes tests start
        import torch

        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session", autouse=True)
def _hydra_schema() -> None:
    register_configs()


@pytest.fixture
def fresh_feature_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty feature cache of the test's own: every feature it uses is computed in the test (modules whose
    runs must not read what another test cached use it: `pytestmark = pytest.mark.usefixtures(...)`)."""
    monkeypatch.setenv("TRANSFER_CACHE", str(tmp_path / "feature-cache"))


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Feature caches go to a per-session temp dir, never the user's ~/.cache: for every test, every
    module-scoped fixture (set up before any test's own fixtures) and every process they start.
    A test that needs an empty cache sets TRANSFER_CACHE itself (monkeypatch.setenv)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFER_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))
        yield


@pytest.fixture
def hydra_in_process() -> Iterator[None]:
    """For tests that run `transfer` commands in this process: what Hydra changes (sys.argv, the
    root logger's handlers and level) is undone afterwards."""
    from helpers import hydra_state_restored  # here: helpers imports torch, which conftest itself need not

    with hydra_state_restored():
        yield


def compose_train(overrides: list[str]) -> TrainConfig:
    """The TrainConfig `transfer train <overrides>` would run, composed in-process."""
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        composed = compose("train", overrides=overrides)
    return OmegaConf.to_object(composed)


@pytest.fixture
def assets() -> Path:
    """The real assets (photos, weights) where TRANSFER_TEST_ASSETS points at them; skip otherwise."""
    root = os.environ.get("TRANSFER_TEST_ASSETS")
    if not root:
        pytest.skip("TRANSFER_TEST_ASSETS is unset: set it to a folder holding data/hymenoptera, data/eurosat5 and "
                    "hf-home to run real-data tests")
    path = Path(root).resolve()
    if not (path / "data" / "hymenoptera").is_dir():
        pytest.skip(f"TRANSFER_TEST_ASSETS={root} has no data/hymenoptera folder")
    return path
