"""`transfer bench --scaling`: how one epoch's cost grows with the data (`make bench-scaling`).

The photos (train/ and val/) replicated 1x, 4x and 16x under new file names in a temp dir (hard links where the
file system allows, else copies: same bytes, distinct files to every cache), then one epoch each of feature
extraction with the feature cache cold (an empty cache) and warm (the same cache again), and of fine-tuning, at
the default settings otherwise. Each run is one `transfer train` process: its wall time from start to exit,
its epoch's own seconds (metrics.jsonl), its peak RSS, and what the decoded-image cache did with the train split
(kept in memory, or streamed because it exceeds dataset.cache_budget_mb: the run's log says which).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transfer_cli.benchmarks.inputs import IMAGE_SUFFIXES, BenchInputs
from transfer_cli.benchmarks.process import timed_command
from transfer_cli.core.errors import TransferError
from transfer_cli.core.tables import aligned
from transfer_cli.runs.runlog import read_metrics


@dataclass(frozen=True)
class ScalingJob:
    model: str
    pretrained: bool
    image_size: int | None  # null: the weights' own
    scales: tuple[int, ...]
    extra: tuple[str, ...] = ()  # more overrides (QUICK: a budget its 1x fits and its 2x does not)


LITE0_SCALING = ScalingJob("tf_efficientnet_lite0.in1k", pretrained=True, image_size=None, scales=(1, 4, 16))
QUICK_SCALING = ScalingJob("test_resnet", pretrained=False, image_size=32, scales=(1, 2),
                           extra=("trainer.num_workers=0", "trainer.batch_size=8", "dataset.cache_budget_mb=0.1"))

# (name, overrides): one epoch each, in this order per scale (warm reuses cold's feature cache)
RUNS = (("feature_extract_cold", ("strategy=feature_extract", "augment=none")),
        ("feature_extract_warm", ("strategy=feature_extract", "augment=none")),
        ("fine_tune", ("strategy=fine_tune",)))

_KEPT = re.compile(r"train split: (\d+) images decoded once and kept in memory \((\d+) MB\)")
_STREAMED = re.compile(r"train split: ~(\d+) MB decoded exceeds dataset.cache_budget_mb=(\S+), decoding every epoch")


def replicate(photos: Path, times: int, dest: Path) -> int:
    """train/ and val/ of `photos` with every image `times` times under new names in `dest`; the image count."""
    count = 0
    for split in ("train", "val"):
        for source in sorted((photos / split).rglob("*")):
            if source.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            folder = dest / split / source.parent.relative_to(photos / split)
            folder.mkdir(parents=True, exist_ok=True)
            for copy in range(times):
                target = folder / f"x{copy}-{source.name}"
                try:
                    os.link(source, target)
                except OSError:  # another file system, or no hard links there
                    shutil.copyfile(source, target)
                count += 1
    return count


def image_cache_state(log: str) -> str:
    """What the decoded-image cache did with the train split, from the run's log."""
    if match := _KEPT.search(log):
        return f"kept ({match.group(2)} MB)"
    if match := _STREAMED.search(log):
        return f"streamed (~{match.group(1)} MB > budget {match.group(2)} MB)"
    return "off"


def overrides(job: ScalingJob, root: Path, cache_dir: Path, run: tuple[str, ...]) -> list[str]:
    size = [f"transforms.image_size={job.image_size}"] if job.image_size else []
    return ["backbone=timm", f"backbone.name={job.model}", f"backbone.pretrained={str(job.pretrained).lower()}",
            "dataset=folder", f"dataset.root={root}", *run, "trainer.epochs=1", "trainer.device=cpu",
            f"trainer.cache_dir={cache_dir}", *size, *job.extra]


def run_scaling(job: ScalingJob, inputs: BenchInputs, env: dict[str, str]) -> dict[str, Any]:
    """Every (scale, run) of `job`; a TransferError where the photos or the weights are missing."""
    reason = inputs.missing_photos() or (inputs.missing_weights(job.model) if job.pretrained else None)
    if reason:
        raise TransferError(f"transfer bench --scaling: {reason}")
    env = inputs.env(env)
    rows = []
    with tempfile.TemporaryDirectory(prefix="transfer-scaling-") as tmp:
        for scale in job.scales:
            root = Path(tmp) / f"x{scale}"
            images = replicate(Path(inputs.photos), scale, root)
            for name, run in RUNS:
                run_dir, log = Path(tmp) / f"run-x{scale}-{name}", Path(tmp) / f"x{scale}-{name}.log"
                command = [sys.executable, "-m", "transfer_cli", "train",
                           *overrides(job, root, Path(tmp) / f"cache-x{scale}", run), f"hydra.run.dir={run_dir}"]
                timed = timed_command(command, log, env=env)
                if timed.returncode != 0:
                    raise RuntimeError(f"scaling x{scale} {name} failed (exit {timed.returncode}):\n{timed.tail(log)}")
                record = read_metrics(run_dir)[-1]
                text = log.read_text(errors="replace")
                rows.append({"scale": scale, "images": images, "run": name, "seconds": timed.seconds,
                             "epoch_seconds": record["seconds"], "peak_rss_mb": timed.peak_rss_mb,
                             "image_cache": image_cache_state(text), "feature_cache_hit": "feature cache hit" in text})
    return {"job": asdict(job), "rows": rows}


def format_scaling(report: dict[str, Any]) -> str:
    """The rows as a text table, each cost beside its 1x figure."""
    header = ("scale", "images", "run", "wall s", "epoch s", "epoch vs 1x", "peak RSS MB", "image cache")
    base = {row["run"]: row["epoch_seconds"] for row in report["rows"] if row["scale"] == min(
        r["scale"] for r in report["rows"])}
    lines = [header] + [(f"{row['scale']}x", str(row["images"]), row["run"], f"{row['seconds']:.1f}",
                         f"{row['epoch_seconds']:.1f}", f"{row['epoch_seconds'] / base[row['run']]:.1f}x",
                         f"{row['peak_rss_mb']:.0f}", row["image_cache"]) for row in report["rows"]]
    return aligned(lines, right=(1, 3, 4, 5, 6))
