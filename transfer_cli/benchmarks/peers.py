"""peer_timm_fine_tune: one fine-tuning job run by timm's own train.py and by `transfer train`, one after the other.

Both processes are timed from start to exit with their own peak RSS (process.py), and where the time went:
each epoch's training and validation seconds (the rest of the wall time: start-up, data, checkpoints, exit).
Train images/s: ours from metrics.jsonl (`train/images_per_s` x `train/seconds` of each epoch), timm's from
the last progress line of each epoch, whose running mean step time x steps is that epoch's training time.
Final val top-1: the last row of timm's summary.csv (percent), our summary.json's final_val_acc. The settings
are pinned on both sides, each to the other's: docs/performance.md lists what cannot match and why.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transfer_cli.benchmarks.inputs import BenchInputs, count_images, warm_file_cache
from transfer_cli.benchmarks.process import Timed, timed_command
from transfer_cli.runs.runlog import read_metrics


@dataclass(frozen=True)
class FineTuneJob:
    """The job both tools run: every layer trained, AdamW, cosine to 0 by optimizer step, no warmup."""

    model: str  # timm name.tag
    pretrained: bool
    image_size: int
    epochs: int
    batch: int
    workers: int
    interpolation: str = "bicubic"  # the weights' own (lite0), pinned for training on both sides
    lr: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 42


LITE0_RACE = FineTuneJob("tf_efficientnet_lite0.in1k", pretrained=True, image_size=224, epochs=3, batch=32,
                         workers=2)
QUICK_RACE = FineTuneJob("test_resnet", pretrained=False, image_size=32, epochs=1, batch=8, workers=0)


def timm_command(job: FineTuneJob, script: str, photos: str, out: Path) -> list[str]:
    """timm's train.py for `job` (its documented command, plus --sched-on-updates and --train-interpolation:
    timm steps a cosine per epoch and picks bilinear or bicubic at random by default; ours does neither)."""
    classes = len(count_images(Path(photos) / "train"))
    return [sys.executable, script, photos, "--model", job.model, *(["--pretrained"] if job.pretrained else []),
            "--num-classes", str(classes), "--img-size", str(job.image_size), "--epochs", str(job.epochs),
            "--batch-size", str(job.batch), "--lr", f"{job.lr:g}", "--opt", "adamw", "--weight-decay",
            f"{job.weight_decay:g}", "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", "0",
            "--smoothing", "0", "--color-jitter", "0", "--hflip", "0.5", "--scale", "0.08", "1",
            "--train-interpolation", job.interpolation, "--workers", str(job.workers), "--device", "cpu",
            "--no-prefetcher", "--train-split", "train", "--val-split", "val", "--output", str(out),
            "--experiment", "peer", "--checkpoint-hist", "1", "--seed", str(job.seed)]


def transfer_overrides(job: FineTuneJob, photos: str) -> list[str]:
    """`transfer train` overrides for `job`; everything else is the default a user gets."""
    return ["backbone=timm", f"backbone.name={job.model}", f"backbone.pretrained={str(job.pretrained).lower()}",
            "dataset=folder", f"dataset.root={photos}", "strategy=fine_tune", f"strategy.lr={job.lr:g}",
            "strategy.bn=train",  # BatchNorm as timm trains it: batch statistics, running averages updated
            "optimizer=adamw", f"optimizer.weight_decay={job.weight_decay:g}", "scheduler=cosine",
            "scheduler.warmup_pct=0", "augment=basic", "augment.random_resized_crop=[0.08,1.0]", "augment.hflip=0.5",
            "head=linear", "head.dropout=0", "trainer.label_smoothing=0", f"transforms.image_size={job.image_size}",
            f"transforms.interpolation={job.interpolation}", f"trainer.epochs={job.epochs}",
            f"trainer.batch_size={job.batch}", f"trainer.num_workers={job.workers}", f"trainer.seed={job.seed}",
            "trainer.device=cpu"]


# timm's progress line at an epoch's last step: "Train: 2 [   6/7 (100%)] ... (0.812s,   39.41/s) ..."
_LAST_STEP = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+) \(100%\)\].*?\((\d+(?:\.\d+)?)s,")
# ... and at an evaluation's last batch: "Test: [   4/4]  Time: 17.951 (19.364)  Loss: ..."
_LAST_EVAL = re.compile(r"Test: \[\s*(\d+)/(\d+)\]\s+Time: \d+(?:\.\d+)? \((\d+(?:\.\d+)?)\)")


def timm_train_seconds(log: str) -> list[float]:
    """Each epoch's training time from timm's log: steps x the epoch's mean step time (data loading included)."""
    return [int(steps) * float(mean) for _, _, steps, mean in _LAST_STEP.findall(log)]


def timm_eval_seconds(log: str) -> list[float]:
    """Each evaluation's time from timm's log: batches (its last index + 1) x their mean time."""
    return [(int(last) + 1) * float(mean) for index, last, mean in _LAST_EVAL.findall(log) if index == last]


def timm_final_top1(summary_csv: Path) -> float:
    """Val top-1 (a share) of the last epoch in timm's summary.csv (which holds percent)."""
    with open(summary_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or "eval_top1" not in rows[-1]:
        raise RuntimeError(f"{summary_csv} has no eval_top1 row: the peer finished no validated epoch")
    return float(rows[-1]["eval_top1"]) / 100


def ours_train_figures(run_dir: Path) -> tuple[float, list[float], list[float]]:
    """(train images, each epoch's train seconds, each epoch's val seconds) of a `transfer train` run."""
    records = read_metrics(run_dir)
    images = sum(record["train/images_per_s"] * record["train/seconds"] for record in records)
    return images, [record["train/seconds"] for record in records], [record["val/seconds"] for record in records]


def _checked(side: str, timed: Timed, log: Path) -> Timed:
    if timed.returncode != 0:
        raise RuntimeError(f"peer race: {side} failed (exit {timed.returncode}):\n{timed.tail(log)}")
    return timed


def race_timm(job: FineTuneJob, inputs: BenchInputs, tmp: Path, env: dict[str, str]) -> dict[str, Any] | str:
    """Both sides of the race, or `skipped: <why>` where the script, the photos or the weights are absent."""
    reason = inputs.missing_peer() or inputs.missing_photos() or (
        inputs.missing_weights(job.model) if job.pretrained else None)
    if reason:
        return f"skipped: {reason}"
    env = inputs.env(env)
    photos = str(Path(inputs.photos).resolve())
    warm_file_cache(Path(photos))
    train_images = sum(count_images(Path(photos) / "train").values())
    steps = train_images // job.batch  # both drop the last partial batch
    command = timm_command(job, str(Path(inputs.peer_timm).resolve()), photos, tmp / "timm")
    peer = _checked("timm train.py", timed_command(command, tmp / "timm.log", env=env), tmp / "timm.log")
    peer_log = (tmp / "timm.log").read_text(errors="replace")
    peer_seconds = timm_train_seconds(peer_log)
    if len(peer_seconds) != job.epochs:
        raise RuntimeError(f"peer race: timm's log shows {len(peer_seconds)} finished epochs, not {job.epochs}")
    timm_top1 = timm_final_top1(tmp / "timm" / "peer" / "summary.csv")
    run_dir = tmp / "transfer-run"
    overrides = transfer_overrides(job, photos)
    ours = _checked("transfer train", timed_command(
        [sys.executable, "-m", "transfer_cli", "train", *overrides, f"hydra.run.dir={run_dir}"],
        tmp / "transfer.log", env=env), tmp / "transfer.log")
    our_images, our_seconds, our_val_seconds = ours_train_figures(run_dir)
    our_top1 = json.loads((run_dir / "summary.json").read_text())["final_val_acc"]
    return {"job": asdict(job), "train_images": train_images,
            "timm": {"seconds": peer.seconds, "peak_rss_mb": peer.peak_rss_mb, "val_acc1": timm_top1,
                     "train_images_per_s": steps * job.batch * job.epochs / sum(peer_seconds),
                     "train_seconds": peer_seconds, "val_seconds": timm_eval_seconds(peer_log),
                     "command": command[1:]},
            "transfer": {"seconds": ours.seconds, "peak_rss_mb": ours.peak_rss_mb, "val_acc1": our_top1,
                         "train_images_per_s": our_images / sum(our_seconds), "train_seconds": our_seconds,
                         "val_seconds": our_val_seconds, "overrides": overrides},
            "ratio": ours.seconds / peer.seconds, "accuracy_diff": our_top1 - timm_top1}
