"""Real photos and real ImageNet weights from the folder TRANSFER_TEST_ASSETS names (skipped where unset).

Runs the installed command in a subprocess: huggingface_hub reads HF_HOME and
HF_HUB_OFFLINE when first imported, so they must be set before the process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_feature_extraction_on_hymenoptera_reaches_90_percent(assets: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(assets / "hf-home"), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "transfer_cli", "train",
        "backbone=timm", "backbone.name=tf_efficientnet_lite0.in1k",
        "dataset=folder", f"dataset.root={assets / 'data' / 'hymenoptera'}",
        "strategy=feature_extract", "trainer.epochs=3", "trainer.num_workers=2", f"hydra.run.dir={tmp_path}",
        "augment=none",  # deterministic inputs: the feature cache applies, one backbone pass instead of three
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["weights"].startswith("hf-hub"), "pretrained weights must come from the offline cache"
    assert summary["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert summary["preprocessing"]["interpolation"] == "bicubic"
    assert summary["reported_val_acc"] >= 0.90


def train_on_assets(assets: Path, run_dir: Path, *overrides: str) -> list[dict]:
    """`transfer train` on the TRANSFER_TEST_ASSETS folder with the real lite0 weights; returns metrics.jsonl."""
    env = {**os.environ, "HF_HOME": str(assets / "hf-home"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "transfer_cli", "train", "backbone=timm",
               "backbone.name=tf_efficientnet_lite0.in1k", "dataset=folder", "augment=none",
               "trainer.num_workers=2", f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_gradual_on_far_satellite_patches_keeps_what_the_head_learned(assets: Path, tmp_path: Path) -> None:
    """eurosat5 (satellite patches, far from ImageNet): with the default BatchNorm policy gradual ends at
    or above its head-only stage; with BatchNorm in train mode it falls when the first group unfreezes
    (docs/batchnorm.md). 128 px and a 4-epoch schedule (head 1, last block 1, all 2) keep it short."""
    data = [f"dataset.root={assets / 'data' / 'eurosat5'}", "strategy=gradual", "trainer.epochs=4",
            "transforms.image_size=128"]
    held = train_on_assets(assets, tmp_path / "frozen_stats", *data)
    moved = train_on_assets(assets, tmp_path / "train", *data, "strategy.bn=train")
    head = max(r["val/acc1"] for r in held if r["stage"] == "head")
    assert [r["stage"] for r in held] == ["head", "last_block", "all", "all"]
    assert head >= 0.5, "the head on frozen ImageNet features should separate 5 land-cover classes (chance: 0.2)"
    assert held[-1]["val/acc1"] >= head - 1 / 90, "unfreezing must not undo the head (one val image of slack)"
    assert moved[0]["val/acc1"] == held[0]["val/acc1"], "the head stage is the same under both policies"
    assert moved[-1]["val/acc1"] < held[-1]["val/acc1"] - 0.1, "BatchNorm in train mode should collapse here"
