"""`transfer bench`: how fast our loop, the feature cache and the CLI are; writes outputs/bench/bench.json.

Figures (targets are for a 2-core CPU; `--check` exits 1 when one is missed):

- train_throughput_ratio: images/s of our StepRunner/train_one_epoch over the lesson's plain
  loop, same model, batch, optimizer, lr and in-memory tensors, timed in alternating runs
  (ours, ref, ref, ours, ...) after a warm-up; medians of each side.
- feature_cache_speedup: wall time of a 10-epoch feature-extraction `train()` without the
  feature cache over the same run with it (a fresh, empty cache, so it pays for the features;
  the median of cached runs before and after the uncached one). The speedup grows with the
  backbone's share of a run, so the images are as many as make one uncached epoch last about
  `cache_epoch_seconds` on this machine (from a timed forward pass).
- help_seconds: median wall time of `transfer --help`, which must not import torch.
- peak_rss_mb: the OS's peak resident set (getrusage maxrss) of the `train()` processes.
- peer_timm_fine_tune, feature_cache_vs_probe: our wall time over timm's train.py's on the same fine-tuning
  job, and over a scikit-learn probe on backbone features (races.py); `skipped: <why>` without their inputs.

Every timed workload runs in a child process (benchmarks/children.py), so each pays its imports before its
clock starts and reports its own peak RSS. On CUDA, GPU images/s of torchvision resnet50 and
efficientnet_b0 (AMP, channels_last) on synthetic tensors and on a JPEG folder are added;
`transfer bench --gpu` measures only those.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transfer_cli.benchmarks.costs import measure_first_step
from transfer_cli.benchmarks.gpu import gpu_figures
from transfer_cli.benchmarks.inputs import BenchInputs
from transfer_cli.benchmarks.loader import loader_report, loader_spec, table_rows
from transfer_cli.benchmarks.peers import LITE0_RACE, QUICK_RACE, FineTuneJob
from transfer_cli.benchmarks.probe import LITE0_PROBE, QUICK_PROBE, ProbeJob
from transfer_cli.benchmarks.races import race_check, race_figures, race_rows
from transfer_cli.core.tables import aligned


# figure -> (comparison, threshold): what `make bench` checks
TARGETS: dict[str, tuple[str, float]] = {
    "train_throughput_ratio": (">=", 1.0),
    "feature_cache_fraction_of_bound": (">=", 0.95),
    "checkpoint_bytes_reduction": (">=", 10.0),
    "help_seconds": ("<", 1.0),
    "draft_decode_speedup": (">=", 2.0),
    "peer_timm_fine_tune": ("<=", 1.0),  # wall time over timm's train.py's, at the same accuracy
    "feature_cache_vs_probe": ("<=", 0.5),  # wall time (warm feature cache) over the probe's
}


@dataclass(frozen=True)
class Workload:
    """How much work each measurement does (FULL for `make bench`, QUICK for tests)."""

    loop_backbone: str  # timm model, random init
    loop_image_size: int
    loop_images: int  # a multiple of loop_batch: both loops see every image
    loop_batch: int
    loop_epochs: int  # per timed run
    loop_rounds: int  # timed (ours, reference) pairs
    cache_backbone: str
    cache_image_size: int
    cache_batch: int
    cache_epochs: int
    cache_train: int  # images, unless cache_epoch_seconds sizes them
    cache_val: int
    cache_epoch_seconds: float | None  # size the data so one uncached epoch takes about this long here
    cache_runs: int  # cached runs bracketing the uncached one (1 or 2)
    help_runs: int
    # feature-extraction runs whose checkpoint bytes per epoch are counted: (timm model, extra overrides)
    checkpoint_models: tuple[tuple[str, tuple[str, ...]], ...] = ()
    checkpoint_epochs: int = 3
    first_step_runs: int = 3  # fresh `transfer train experiment=smoke` processes timed to their first step
    loader_photos: int = 64  # 2000x1500 JPEGs for the loader figures (loader.py)
    loader_rounds: int = 2  # timed passes over each train loader, with and without reduced decoding
    loader_model_steps: int = 4  # timed training steps of each workload's model
    race: FineTuneJob = LITE0_RACE  # against timm's train.py
    probe: ProbeJob = LITE0_PROBE  # against a scikit-learn probe


VIT_AT_32PX = ("+backbone.kwargs.img_size=32",)  # ViT-B/16's 86M parameters, 4 patches an image: a quick forward
# `make bench`'s sizes: the uncached 10-epoch run is most of its time
FULL = Workload(loop_backbone="resnet18", loop_image_size=64, loop_images=128, loop_batch=32, loop_epochs=1,
                loop_rounds=4, cache_backbone="resnet18", cache_image_size=128, cache_batch=64, cache_epochs=10,
                cache_train=512, cache_val=128, cache_epoch_seconds=11.0, cache_runs=2, help_runs=7,
                checkpoint_models=(("vit_base_patch16_224", VIT_AT_32PX), ("resnet18", ())))
QUICK = Workload(loop_backbone="test_resnet", loop_image_size=32, loop_images=64, loop_batch=16, loop_epochs=1,
                 loop_rounds=2, cache_backbone="test_resnet", cache_image_size=32, cache_batch=32, cache_epochs=2,
                 cache_train=64, cache_val=32, cache_epoch_seconds=None, cache_runs=1, help_runs=3,
                 checkpoint_models=(("test_vit", VIT_AT_32PX), ("test_resnet", ())), checkpoint_epochs=2,
                 first_step_runs=1, loader_photos=16, loader_rounds=1, loader_model_steps=2, race=QUICK_RACE,
                 probe=QUICK_PROBE)


# --------------------------------------------------------------------------- shared helpers


def _smoke(backbone: str, image_size: int, train: int, val: int, batch: int) -> list[str]:
    """experiment=smoke (synthetic images, random-init timm model, CPU) at another size."""
    return ["experiment=smoke", f"backbone.name={backbone}", f"transforms.image_size={image_size}",
            f"dataset.image_size={image_size}", f"dataset.train_size={train}", f"dataset.val_size={val}",
            f"trainer.batch_size={batch}", "trainer.device=cpu", "trainer.num_workers=0"]


def child_env() -> dict[str, str]:
    """The children's environment: OpenMP threads sleep rather than spin while they wait.

    On a shared, oversubscribed CPU, torch's default (spinning) OpenMP threads lose their
    core mid-barrier and one step can take several times longer, at random; passive waiting keeps
    timings stable. A value the user set is kept (and recorded in bench.json).
    """
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _child(name: str, spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run CHILDREN[name](spec) in a fresh interpreter and return its result."""
    with tempfile.TemporaryDirectory(prefix="transfer-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "transfer_cli.benchmarks.children", "--child", name, json.dumps(spec),
                   str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env())
        if done.returncode != 0 or not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"bench child '{name}' failed (exit {done.returncode}):\n{tail}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- the CPU figures


def measure_loop(work: Workload, tmp: Path) -> dict[str, Any]:
    """Our loop vs the lesson's; with cache_epoch_seconds, also times the feature-cache backbone's forward."""
    overrides = _smoke(work.loop_backbone, work.loop_image_size, work.loop_images, work.loop_batch, work.loop_batch)
    overrides += ["strategy=fine_tune", "optimizer=adam", "scheduler=constant", "trainer.cache_features=false"]
    calibrate = ({"backbone": work.cache_backbone, "image_size": work.cache_image_size, "batch": work.cache_batch}
                 if work.cache_epoch_seconds else None)
    result = _child("loop", {"overrides": overrides, "run_dir": str(tmp / "loop"), "epochs": work.loop_epochs,
                             "rounds": work.loop_rounds, "calibrate": calibrate})
    ours, reference = statistics.median(result["ours_runs"]), statistics.median(result["reference_runs"])
    paired = statistics.median(o / r for o, r in zip(result["ours_runs"], result["reference_runs"]))
    cpu = statistics.median(result["ours_cpu_runs"]) / statistics.median(result["reference_cpu_runs"])
    return {"train_throughput_ratio": ours / reference, "ours_images_per_s": ours,
            "reference_images_per_s": reference,
            "loop": {**result, "overrides": overrides, "paired_ratio_median": paired, "cpu_time_ratio": cpu}}


def cache_split_sizes(work: Workload, forward_ms: float | None) -> tuple[int, int]:
    """(train, val) images: fixed, or as many as one uncached epoch's forward passes take cache_epoch_seconds for.

    The speedup grows with the backbone's share of a run, so a fixed image count would give a
    smaller figure on a faster (or idler) machine and blow the time budget on a slower one.
    """
    if not work.cache_epoch_seconds or not forward_ms:
        return work.cache_train, work.cache_val
    per_epoch = work.cache_epoch_seconds * 1000 / forward_ms  # train + val images, val = train / 4
    batches = min(max(round(0.8 * per_epoch / work.cache_batch), 2), 64)
    return batches * work.cache_batch, batches * work.cache_batch // 4


def measure_feature_cache(work: Workload, tmp: Path, forward_ms: float | None = None) -> dict[str, Any]:
    """Cached runs (each with a fresh, empty cache) before and after the uncached one, for drift."""
    train, val = cache_split_sizes(work, forward_ms)
    base = _smoke(work.cache_backbone, work.cache_image_size, train, val, work.cache_batch)
    base += ["strategy=feature_extract", "augment=none", f"trainer.epochs={work.cache_epochs}"]

    def run(tag: str, mode: str) -> dict[str, Any]:
        overrides = base + [f"trainer.cache_features={mode}", f"trainer.cache_dir={tmp / ('cache-' + tag)}"]
        return _child("train", {"overrides": overrides, "run_dir": str(tmp / f"run-{tag}")})

    cached = [run("cached-1", "auto")]
    uncached = run("uncached", "false")
    if work.cache_runs > 1:
        cached.append(run("cached-2", "auto"))
    cached_s = statistics.median(r["seconds"] for r in cached)
    speedup = uncached["seconds"] / cached_s
    return {"feature_cache_speedup": speedup, "feature_cache_fraction_of_bound": speedup / work.cache_epochs,
            "uncached_seconds": uncached["seconds"],
            "cached_seconds": cached_s,
            "feature_cache": {"uncached": uncached, "cached": cached, "overrides": base, "train_images": train,
                              "val_images": val, "forward_ms_per_image": forward_ms,
                              "cpu_seconds_ratio": uncached["cpu_seconds"] / statistics.median(
                                  r["cpu_seconds"] for r in cached)}}


def measure_checkpoint_bytes(work: Workload, tmp: Path) -> dict[str, Any]:
    """Checkpoint bytes per epoch of feature extraction, per model, against full-model checkpoints (costs.py)."""
    figures = {}
    for model, extra in work.checkpoint_models:
        overrides = _smoke(model, 32, 32, 16, 16) + ["strategy=feature_extract", "augment=none",
                                                     f"trainer.epochs={work.checkpoint_epochs}",
                                                     f"trainer.cache_dir={tmp / 'checkpoint-cache'}", *extra]
        figures[model] = _child("checkpoint_bytes", {"overrides": overrides, "run_dir": str(tmp / f"bytes-{model}")})
    return {"checkpoint_bytes_per_epoch": figures,
            "checkpoint_bytes_reduction": min(figure["reduction"] for figure in figures.values())}


def measure_help(runs: int) -> dict[str, Any]:
    """Median wall time of `transfer --help` in a fresh process, and whether it imports torch."""
    script = Path(sys.executable).parent / "transfer"
    command = [str(script), "--help"] if script.is_file() else [sys.executable, "-m", "transfer_cli", "--help"]
    subprocess.run(command, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return {"help_seconds": statistics.median(times), "help_runs": times, "help_command": " ".join(command),
            "help_imports_torch": "torch" in imported_modules(["-m", "transfer_cli", "--help"])}


def imported_modules(args: list[str]) -> set[str]:
    """Every module `python <args>` imports (python -X importtime)."""
    probe = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True)
    return {line.rsplit("|", 1)[-1].strip() for line in probe.stderr.splitlines() if line.startswith("import time:")}


# --------------------------------------------------------------------------- report


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    checks = {}
    for name, (op, threshold) in TARGETS.items():
        value = report[name]
        if not isinstance(value, (int, float)):  # a race: a dict of figures, or skipped
            checks[name] = race_check(value, op, threshold)
            continue
        checks[name] = {"value": value, "target": f"{op} {threshold:g}",
                        "met": value >= threshold if op == ">=" else value < threshold}
    return checks


def format_table(report: dict[str, Any]) -> str:
    """The figures, their targets and pass/fail, as a text table."""
    rows = [("figure", "value", "target", "status")]
    targets = report.get("targets", {})

    def add(name: str, value: str) -> None:
        check = targets.get(name)
        verdict = ("pass" if check["met"] else "FAIL") if check and check["met"] is not None else (
            "skipped" if check else "")
        rows.append((name, value, check["target"] if check else "", verdict))

    if "train_throughput_ratio" in report:
        add("train_throughput_ratio", f"{report['train_throughput_ratio']:.3f}")
        add("  ours images/s", f"{report['ours_images_per_s']:.1f}")
        add("  reference images/s", f"{report['reference_images_per_s']:.1f}")
        add("feature_cache_speedup", f"{report['feature_cache_speedup']:.2f}")
        add("  uncached seconds", f"{report['uncached_seconds']:.1f}")
        add("  cached seconds", f"{report['cached_seconds']:.1f}")
        add("feature_cache_fraction_of_bound", f"{report['feature_cache_fraction_of_bound']:.3f}")
        add("  bound (epochs)", str(report["workload"]["cache_epochs"]))
        add("checkpoint_bytes_reduction", f"{report['checkpoint_bytes_reduction']:.0f}")
        for model, figure in report["checkpoint_bytes_per_epoch"].items():
            add(f"  {model} MB/epoch", f"{figure['bytes_per_epoch'] / 1e6:.3f} (full checkpoints: "
                f"{figure['full_model_bytes_per_epoch'] / 1e6:.1f}; frozen file once: "
                f"{figure['frozen_file_bytes'] / 1e6:.1f})")
        add("time_to_first_step_s", f"{report['time_to_first_step_s']:.2f}")
        first = report["first_step"]["runs"][0]
        add("  imports torch/torchvision/timm s", "/".join(f"{first[f'import_{n}_s']:.2f}"
                                                          for n in ("torch", "torchvision", "timm")))
        for name, value in table_rows(report):
            add(name, value)
        for name, value in race_rows(report):
            add(name, value)
        add("help_seconds", f"{report['help_seconds']:.3f}")
        add("  help imports torch", str(report["help_imports_torch"]).lower())
        add("peak_rss_mb", f"{report['peak_rss_mb']:.0f}")
    gpu = report.get("gpu", {})
    if not gpu.get("available"):
        add("gpu", "unavailable")
    if gpu.get("available"):
        add("gpu", f"{gpu['device']}, batch {gpu['batch_size']}, {gpu['image_size']}px")
    for model, figures in gpu.get("models", {}).items():
        add(f"gpu {model} synthetic img/s", f"{figures['synthetic_images_per_s']:.0f}")
        add(f"gpu {model} jpeg img/s", f"{figures['jpeg_images_per_s']:.0f}")
        add(f"gpu {model} jpeg, decode_on_device img/s", f"{figures['jpeg_decode_on_device_images_per_s']:.0f}")
    table = aligned(rows, right=(1,))
    return table + (f"\ngpu: {gpu.get('reason', 'not measured')}" if not gpu.get("available") else "")


def machine_info() -> dict[str, Any]:
    """The machine a report was measured on: cores, platform, Python, its load average now."""
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "omp_wait_policy": child_env()["OMP_WAIT_POLICY"],
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run_cpu(work: Workload, data_root: str | None, inputs: BenchInputs | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    report: dict[str, Any] = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "quick": work is QUICK, "machine": machine_info(), "workload": asdict(work)}
    report.update(measure_help(work.help_runs))
    with tempfile.TemporaryDirectory(prefix="transfer-bench-") as tmp:
        report.update(measure_loop(work, Path(tmp)))
        report.update(measure_feature_cache(work, Path(tmp), report["loop"]["forward_ms_per_image"]))
        report.update(measure_checkpoint_bytes(work, Path(tmp)))
        report.update(measure_first_step(Path(tmp), child_env(), work.first_step_runs))
        report.update(loader_report(_child("loader", loader_spec(work, Path(tmp), _smoke))))
        report.update(race_figures(work.race, work.probe, inputs or BenchInputs(), Path(tmp), child_env()))
    loop = report["loop"]
    runs = [report["feature_cache"]["uncached"], *report["feature_cache"]["cached"]]
    report["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)  # the train() children
    report["machine"].update(device=loop["device"], torch=loop["torch"], torch_threads=loop["threads"],
                             cuda_available=loop["cuda_available"])
    report["gpu"] = (gpu_figures(data_root) if loop["cuda_available"] else
                     {"available": False, "reason": f"no CUDA device (torch {loop['torch']}: "
                                                    "torch.cuda.is_available() is False)"})
    report["targets"] = _targets(report)
    report["all_targets_met"] = all(check["met"] is not False for check in report["targets"].values())  # skips pass
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["total_seconds"] = time.perf_counter() - started
    return report
