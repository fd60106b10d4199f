"""A run's config is composed once, at the door: the command and the API each compose `transfer train
<overrides>` one time, and the run trains on that composition (its stages as they run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl

import transfer_cli
from transfer_cli.cli import main
from transfer_cli.config.schema import TrainConfig
from transfer_cli.training import run as training


TINY = ["experiment=smoke", "strategy=gradual", "dataset.train_size=32", "dataset.val_size=16", "trainer.epochs=3",
        "trainer.device=cpu"]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Every composition Hydra's config loader makes, and every config the run trains on."""
    seen: dict[str, list[Any]] = {"compositions": [], "trained": []}
    compose, train = ConfigLoaderImpl.load_configuration, training.train

    def composing(self: ConfigLoaderImpl, *args: Any, **kwargs: Any) -> Any:
        seen["compositions"].append(kwargs.get("overrides", args[1] if len(args) > 1 else None))
        return compose(self, *args, **kwargs)

    def training_on(cfg: TrainConfig, *args: Any, **kwargs: Any) -> Any:
        seen["trained"].append(cfg)
        return train(cfg, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", composing)
    monkeypatch.setattr(training, "train", training_on)
    return seen


def test_the_command_composes_a_single_run_once(tmp_path: Path, hydra_in_process: None,
                                                counted: dict[str, list[Any]]) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, f"hydra.run.dir={run_dir}"]) == 0
    assert len(counted["compositions"]) == 1
    [cfg] = counted["trained"]
    assert [stage.epochs for stage in cfg.strategy.stages] == [1, 1, 1]  # gradual's 5/5/10 as the 3 epochs run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [stage["epochs"] for stage in saved["strategy"]["stages"]] == [1, 1, 1]
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 3
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "train.log").is_file()


def test_the_api_composes_a_single_run_once_and_records_what_the_command_records(
        tmp_path: Path, counted: dict[str, list[Any]]) -> None:
    run_dir = tmp_path / "run"
    summary = transfer_cli.train(TINY, run_dir=run_dir)
    assert len(counted["compositions"]) == 1 and len(counted["trained"]) == 1
    assert summary.run_dir == run_dir and summary["epochs_run"] == 3
    recorded = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file())
    for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config.yaml", "train.log",
                 "plan.json", "metrics.jsonl", "summary.json", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert name in recorded, (name, recorded)
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())[:len(TINY)] == TINY
