"""Resuming a run of pretrained weights reads every tensor from its checkpoint: no hub, no weights file, and the
same metrics, summary and plan as a run never interrupted; the hub's log lines print once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm.models._builder
import torch
from omegaconf import OmegaConf

from transfer_cli.runs import checkpoint
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import ROOT, Crash, comparable, crash_after, transfer_env


HUB = FAST + ["backbone.pretrained=true"]  # test_resnet's weights are on the hub as timm/test_resnet.r160_in1k
TIMINGS = ("seconds", "per_s", "wall_time")


def stand_in_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training starts from timm's random init in place of the hub's weights (this test downloads nothing)."""
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *args, **kwargs: None)


def crashed_and_uninterrupted(root: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A run crashed in its second epoch (config.yaml saved, as `transfer train` does) and the same run never
    interrupted."""
    cfg = compose_train(overrides)
    uninterrupted, crashed = root / "uninterrupted", root / "crashed"
    train(cfg, uninterrupted)
    crashed.mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), crashed / "config.yaml")
    with monkeypatch.context() as patch:
        crash_after(patch, epoch=2, step=2)
        with pytest.raises(Crash):
            train(cfg, crashed)
    assert not (crashed / "summary.json").exists()
    return crashed, uninterrupted


def summary_of(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {key: value for key, value in summary.items() if not any(word in key for word in TIMINGS)}


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    assert [r["epoch"] for r in read_metrics(resumed)] == [1, 2, 3]
    assert comparable(read_metrics(resumed)) == comparable(read_metrics(uninterrupted))
    assert summary_of(resumed) == summary_of(uninterrupted)
    assert (resumed / "plan.json").read_text() == (uninterrupted / "plan.json").read_text()


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    with pytest.MonkeyPatch.context() as patch:
        stand_in_weights(patch)
        return crashed_and_uninterrupted(tmp_path_factory.mktemp("hub"), HUB, patch)


def offline_env(tmp_path: Path) -> dict[str, str]:
    """An empty Hugging Face cache that the hub may not be asked about: any weights download fails at once."""
    (tmp_path / "hf").mkdir()
    return {**transfer_env(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_offline_resume_of_a_hub_pretrained_run_matches_the_uninterrupted_run(
        hub_runs: tuple[Path, Path], tmp_path: Path) -> None:
    crashed, uninterrupted = hub_runs
    run_dir = shutil.copytree(crashed, tmp_path / "run")
    resumed = subprocess.run([sys.executable, "-m", "transfer_cli", "resume", str(run_dir)], cwd=ROOT,
                             env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "from epoch 0" not in resumed.stdout
    assert summary_of(run_dir)["weights"] == "hf-hub timm/test_resnet.r160_in1k"  # as it started, not random init
    assert_same_run(run_dir, uninterrupted)


NOISY_RESUME = """
import logging, sys
from transfer_cli.cli import main
from transfer_cli.training import fit

real = fit.train_one_epoch
said = []

def noisy(*args, **kwargs):
    if not said:
        said.append(1)
        logging.getLogger("huggingface_hub.utils._http").warning("hub line %s", "marker")
    return real(*args, **kwargs)

fit.train_one_epoch = noisy
sys.exit(main(["resume", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_hub_log_line_during_resume_prints_once_and_reaches_train_log(
        hub_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """huggingface_hub's own console handler printed each of its lines a second time beside the command's."""
    run_dir = shutil.copytree(hub_runs[0], tmp_path / "run")
    resumed = subprocess.run([sys.executable, "-c", NOISY_RESUME, str(run_dir)], cwd=ROOT,
                             env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (resumed.stdout + resumed.stderr).count("hub line marker") == 1
    assert (run_dir / "train.log").read_text().count("hub line marker") == 1


@pytest.mark.slow
def test_resume_needs_neither_the_weights_file_it_started_from_nor_the_hub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "weights.pt"
    torch.manual_seed(7)
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    overrides = HUB + [f"backbone.checkpoint={weights}"]
    crashed, uninterrupted = crashed_and_uninterrupted(tmp_path, overrides, monkeypatch)
    weights.unlink()  # the resumed run cannot read it: its tensors must come from the checkpoint

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("resume asked for pretrained weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_download)
    train(compose_train(overrides), crashed, resume=checkpoint.load(crashed / "checkpoints" / "last.pt"))
    assert summary_of(crashed)["weights"] == f"file {weights}"
    assert_same_run(crashed, uninterrupted)
