"""config.yaml records the stages as they run: after `trainer.epochs` rescaled them, never rescaled again on reading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import transfer_cli
from transfer_cli.commands.sweep_rerun import previous_attempt
from transfer_cli.config.compose import compose, save_config
from transfer_cli.config.loading import load_run_config
from transfer_cli.inference.evaluate import evaluate_run
from transfer_cli.runs import checkpoint
from transfer_cli.runs.rundir import resume_point
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import fit as trainer
from transfer_cli.training.run import train

from helpers import comparable


# gradual is 5 + 5 + 10 epochs: trainer.epochs=3 runs 1 + 1 + 1
RESCALED = ["experiment=smoke", "strategy=gradual", "dataset.train_size=64", "dataset.val_size=32",
            "trainer.epochs=3", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("recorded") / "run"
    transfer_cli.train(RESCALED, run_dir=run_dir)
    return run_dir


def stage_epochs(tree: dict[str, Any]) -> list[int]:
    return [stage["epochs"] for stage in tree["stages"]]


def test_config_yaml_lists_the_stage_epochs_the_run_ran(finished: Path) -> None:
    saved = yaml.safe_load((finished / "config.yaml").read_text())
    assert saved["trainer"]["epochs"] == 3
    assert stage_epochs(saved["strategy"]) == [1, 1, 1]
    assert [stage["name"] for stage in saved["strategy"]["stages"]] == ["head", "last_block", "all"]
    plan = json.loads((finished / "plan.json").read_text())
    summary = json.loads((finished / "summary.json").read_text())
    assert stage_epochs(plan) == stage_epochs(summary) == [1, 1, 1] and summary["epochs_run"] == 3
    # Hydra's own record keeps what was composed: the strategy file's 5 + 5 + 10
    assert stage_epochs(yaml.safe_load((finished / ".hydra" / "config.yaml").read_text())["strategy"]) == [5, 5, 10]


def test_reading_the_record_back_rescales_nothing(tmp_path: Path) -> None:
    composed = compose(RESCALED[:-2] + ["trainer.epochs=6"])
    assert [stage.epochs for stage in composed.tree.strategy.stages] == [5, 5, 10]  # as composed
    assert [stage.epochs for stage in composed.config.strategy.stages] == [2, 1, 3]  # largest remainder, each >= 1
    save_config(composed.ran, tmp_path)
    assert load_run_config(tmp_path) == composed.config
    unscaled = compose(RESCALED[:-2] + ["trainer.epochs=null"])
    assert [stage.epochs for stage in unscaled.config.strategy.stages] == [5, 5, 10]
    auto = compose(RESCALED[:-2] + ["strategy=auto"])
    assert auto.config.strategy.stages == []  # the data picks its stages at run time: plan.json and summary.json


class Crash(Exception):
    """Stands for the process dying in epoch 2."""


@pytest.mark.slow
def test_a_rescaled_run_resumes_with_the_same_plan_and_metrics(finished: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer.train_one_epoch

    def crashing(*args: Any, description: str, **kwargs: Any) -> Any:
        if description == "epoch 2":
            raise Crash(description)
        return real(*args, description=description, **kwargs)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "train_one_epoch", crashing)
        with pytest.raises(Crash):
            transfer_cli.train(RESCALED, run_dir=run_dir)
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["progress"]["epoch"] == 1
    planned = json.loads((run_dir / "plan.json").read_text())

    cfg, state = resume_point(run_dir)  # what `transfer resume` reads: config.yaml
    assert [stage.epochs for stage in cfg.strategy.stages] == [1, 1, 1] and cfg.trainer.epochs == 3
    summary = train(cfg, run_dir, resume=state)
    assert json.loads((run_dir / "plan.json").read_text())["stages"] == planned["stages"]
    assert summary["epochs_run"] == 3 and [s["epochs"] for s in summary["stages"]] == [1, 1, 1]
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(finished))


def test_eval_reads_the_record(finished: Path) -> None:
    metrics, _ = evaluate_run(finished, [])
    assert metrics["images"] == 32
    assert [stage.epochs for stage in load_run_config(finished).strategy.stages] == [1, 1, 1]


def test_a_sweep_rerun_finds_its_own_run_in_the_record(finished: Path) -> None:
    """A re-run sweep job compares its config, stages as they run, with config.yaml."""
    assert previous_attempt(finished, compose(RESCALED).config)["kind"] == "done"
    assert previous_attempt(finished, compose(RESCALED[:-2] + ["trainer.epochs=4"]).config)["kind"] == "other"
