"""Loader images/s alone vs the model's training images/s, for `transfer bench`'s workloads.

On a folder of full-size photos the bench writes itself (2000x1500 JPEGs with a photo's spread of
detail: smooth regions, edges and grain), each workload's own train loader (prepare(): its
transforms, `dataset=folder`, no image cache, no workers) is timed alone, with and without reduced-
size JPEG decoding (`transforms.draft_decode`, data/decode.py); its model is timed training on
batches already in memory. Whichever is slower bounds an epoch that decodes in the training process
(workers take the loader's share off it, up to the core count).

`draft_decode_speedup` is the smaller of the workloads' ratios of loader images/s with over without
reduced decoding (their 32-128 px inputs let a 2000x1500 photo decode at 1/8). A 224 px eval loader,
the usual ImageNet input, is timed as well and reported beside it: there the decode may only halve
each side (decode.py's 2x margin), so it gains less. The work runs in one child process (children.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


PHOTO_SIZE = (2000, 1500)  # (width, height): a 3-megapixel photo
RESIZE_224 = ("transforms.image_size=224", "transforms.crop_pct=0.875", "augment=none")


def write_photos(root: Path, count: int, size: tuple[int, int] = PHOTO_SIZE, classes: int = 2, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (quality 90, ~0.8 MB at 2000x1500) in `root`/<class>/, deterministic in `seed`.

    Random noise would make JPEGs no camera writes (3x larger, all entropy coding); these mix a smooth
    colour field, mid-scale detail and per-pixel grain, as photos do.
    """
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    grain = rng.integers(-6, 7, (height, width), dtype=np.int16)
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 50), max(2, width // 50), 3), dtype=np.uint8))
        detail = Image.fromarray(rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8))
        mixed = Image.blend(coarse.resize(size, Image.Resampling.BICUBIC),
                            detail.resize(size, Image.Resampling.BILINEAR), 0.3)
        shifted = np.roll(grain, int(rng.integers(0, grain.size))).reshape(height, width, 1)
        pixels = (np.asarray(mixed).astype(np.int16) + shifted).clip(0, 255).astype(np.uint8)
        folder = root / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)
    return root


def loader_spec(work: Any, tmp: Path, smoke: Callable[..., list[str]]) -> dict[str, Any]:
    """The child's spec: the bench workloads' overrides (`smoke`: cpu._smoke), where to write how many photos."""
    loop = smoke(work.loop_backbone, work.loop_image_size, 1, 1, work.loop_batch)
    cache = smoke(work.cache_backbone, work.cache_image_size, 1, 1, work.cache_batch)
    return {"root": str(tmp / "photos"), "photos": work.loader_photos, "rounds": work.loader_rounds,
            "model_steps": work.loader_model_steps, "run_dir": str(tmp / "loader"),
            "workloads": {"loop": loop + ["strategy=fine_tune", "optimizer=adam", "scheduler=constant"],
                          "feature_cache": cache + ["strategy=feature_extract", "augment=none"]},
            "resize_224": cache + list(RESIZE_224)}


def loader_report(result: dict[str, Any]) -> dict[str, Any]:
    """bench.json's figures from the child's result."""
    workloads = result["workloads"]
    speedups = {name: figures["draft_images_per_s"] / figures["full_images_per_s"]
                for name, figures in {**workloads, "resize_224": result["resize_224"]}.items()}
    return {"loader_images_per_s": {name: w["draft_images_per_s"] for name, w in workloads.items()},
            "model_train_images_per_s": {name: w["model_train_images_per_s"] for name, w in workloads.items()},
            "draft_decode_speedup": min(speedups[name] for name in workloads),
            "loader": {**result, "draft_decode_speedups": speedups}}


def table_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """format_table's rows for the loader figures."""
    speedups = report["loader"]["draft_decode_speedups"]
    rows = [("draft_decode_speedup", f"{report['draft_decode_speedup']:.2f}")]
    for name, figures in report["loader"]["workloads"].items():
        loader, model = figures["draft_images_per_s"], figures["model_train_images_per_s"]
        rows += [(f"  {name} loader img/s", f"{loader:.1f} ({figures['full_images_per_s']:.1f} full decode, "
                                             f"{speedups[name]:.2f}x)"),
                 (f"  {name} model train img/s", f"{model:.1f} (bound: {'loader' if loader < model else 'model'})")]
    resize = report["loader"]["resize_224"]
    rows.append(("  224px eval loader img/s", f"{resize['draft_images_per_s']:.1f} ({resize['full_images_per_s']:.1f} "
                                               f"full decode, {speedups['resize_224']:.2f}x)"))
    return rows


# --------------------------------------------------------------------------- the child


def loader_figures(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: writes the photos, then times each workload's loader and model."""
    started = time.perf_counter()
    root = write_photos(Path(spec["root"]), spec["photos"])
    written = time.perf_counter() - started
    result: dict[str, Any] = {"photos": spec["photos"], "photo_size": list(PHOTO_SIZE), "num_workers": 0,
                              "write_seconds": written, "workloads": {}}
    for name, overrides in spec["workloads"].items():
        loaders = _loaders(overrides, root, Path(spec["run_dir"]) / name)
        figures = _loader_images_per_s(loaders, spec["rounds"])
        figures["model_train_images_per_s"] = _model_images_per_s(loaders[True], spec["model_steps"])
        figures["overrides"] = overrides
        result["workloads"][name] = figures
    loaders = _loaders(spec["resize_224"], root, Path(spec["run_dir"]) / "resize_224")
    result["resize_224"] = {**_loader_images_per_s(loaders, spec["rounds"]), "overrides": spec["resize_224"]}
    return result


def _loaders(overrides: list[str], root: Path, run_dir: Path) -> dict[bool, Any]:
    """The run `overrides` describe, on the photos, prepared with and without reduced decoding."""
    from transfer_cli.config.compose import compose_config
    from transfer_cli.training.assemble import prepare

    folder = ["dataset=folder", f"dataset.root={root}", "dataset.val_fraction=0.25", "dataset.cache_images=false",
              "trainer.cache_features=false", "trainer.num_workers=0"]
    return {draft: prepare(compose_config([*overrides, *folder, f"transforms.draft_decode={str(draft).lower()}"]),
                           run_dir / f"draft-{draft}") for draft in (True, False)}


def _loader_images_per_s(prepared: dict[bool, Any], rounds: int) -> dict[str, Any]:
    """Images/s of one pass over each train loader, in ABBA order (drift hits both alike); medians."""
    runs: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(rounds):
        for draft in ((True, False) if round_ % 2 == 0 else (False, True)):
            loader = prepared[draft].setup.train_loader
            seen, start = 0, time.perf_counter()
            for _, labels in loader:
                seen += len(labels)
            runs[draft].append(seen / (time.perf_counter() - start))
    first = prepared[True].setup.train_loader
    return {"draft_images_per_s": statistics.median(runs[True]), "full_images_per_s": statistics.median(runs[False]),
            "draft_runs": runs[True], "full_runs": runs[False], "images": len(first.dataset),
            "batch_size": first.batch_size, "transform": repr(first.dataset.transform)}


def _model_images_per_s(prepared: Any, steps: int) -> float:
    """Training images/s of the run's model on one loader batch held in memory (a warm-up step first)."""
    from transfer_cli.training.freezing import hold_frozen_batchnorm
    from transfer_cli.training.loop import Tally
    from transfer_cli.training.stages import enter_stage
    from transfer_cli.training.state import Progress

    setup = prepared.setup
    run = enter_stage(setup, Progress(), 0)
    setup.model.model.train()
    hold_frozen_batchnorm(setup.model, run.stage)
    images, labels = next(iter(setup.train_loader))
    tally = Tally(run.runner.precision.device, (1,))
    run.runner(*run.runner.precision.to_device(images, labels), tally)
    start = time.perf_counter()
    for _ in range(steps):
        run.runner(*run.runner.precision.to_device(images, labels), tally)
    tally.loss.item()  # waits for the last step
    return steps * len(labels) / (time.perf_counter() - start)
