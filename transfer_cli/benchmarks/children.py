"""The timed work of `transfer bench`, each run in a fresh interpreter so it pays its own imports
before its clock starts and reports its own peak RSS:
`python -m transfer_cli.benchmarks.children --child NAME SPEC_JSON OUT_JSON`."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transfer_cli.benchmarks.costs import checkpoint_bytes
from transfer_cli.benchmarks.loader import loader_figures
from transfer_cli.config.compose import compose_config
from transfer_cli.runs.runlog import read_metrics, write_json


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loop_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """images/s of our loop and of the lesson's loop, alternating runs of `epochs` epochs each."""
    import copy

    import torch

    from transfer_cli.data.loaders import make_loader
    from transfer_cli.inference.topk import topk_for
    from transfer_cli.training.assemble import prepare
    from transfer_cli.training.freezing import hold_frozen_batchnorm
    from transfer_cli.training.loop import Tally, train_one_epoch
    from transfer_cli.training.stages import enter_stage
    from transfer_cli.training.state import Progress

    cfg = compose_config(spec["overrides"])
    prepared = prepare(cfg, Path(spec["run_dir"]))
    setup = prepared.setup
    model, stage = setup.model, setup.stages[0]
    # same architecture and initial weights, in the lesson's plain (contiguous) memory format
    reference = copy.deepcopy(model.model).to(memory_format=torch.contiguous_format)
    tensors, batch, device = _in_memory(prepared), cfg.trainer.batch_size, setup.runner.precision.device
    run = enter_stage(setup, Progress(), 0)  # what fit does on entering the stage
    loader = make_loader(tensors, batch, train=True, num_workers=0, seed=cfg.trainer.seed, pin_memory=False)
    epochs_done = [0]

    def ours() -> tuple[float, float]:
        seen, start, cpu = 0, time.perf_counter(), _cpu_seconds()
        for _ in range(spec["epochs"]):
            model.model.train()
            hold_frozen_batchnorm(model, stage)
            loader.sampler.set_epoch(epochs_done[0])
            tally = Tally(device, topk_for(setup.num_classes))
            train_one_epoch(run.runner, loader, run.scheduler, tally, check_every=setup.check_every)
            seen, epochs_done[0] = seen + tally.count, epochs_done[0] + 1
        return seen / (time.perf_counter() - start), seen / (_cpu_seconds() - cpu)

    lr = max(stage.lrs.values())
    optimizer = type(setup.optimizer.optimizer)(reference.parameters(), lr=lr)
    lesson = _lesson_loop(reference, optimizer, tensors, batch, device, spec["epochs"])
    ours(), lesson()  # warm-up: allocator, oneDNN primitives, optimizer state
    runs = _abba({"ours": ours, "reference": lesson}, spec["rounds"])
    calibration = spec.get("calibrate")
    return {"ours_runs": [wall for wall, _ in runs["ours"]], "reference_runs": [wall for wall, _ in runs["reference"]],
            # images per CPU-second: a steadier view of the same runs when other work shares the cores
            "ours_cpu_runs": [cpu for _, cpu in runs["ours"]],
            "reference_cpu_runs": [cpu for _, cpu in runs["reference"]],
            "lr": lr,
            "optimizer": type(optimizer).__name__, "images": len(tensors), "device": str(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(), "peak_rss_mb": _peak_rss_mb(),
            "forward_ms_per_image": forward_ms_per_image(**calibration) if calibration else None}


def _in_memory(prepared: Any) -> Any:
    """The run's training images through its eval transform, held in memory as one TensorDataset."""
    import torch
    from torch.utils.data import TensorDataset

    from transfer_cli.data.loaders import TransformedDataset
    from transfer_cli.data.transforms import eval_transform

    data = TransformedDataset(prepared.splits.train, eval_transform(prepared.preprocessing))
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([int(data[i][1]) for i in range(len(data))])
    return TensorDataset(images, labels)


def _lesson_loop(model: Any, optimizer: Any, tensors: Any, batch: int, device: Any,
                 epochs: int) -> Callable[[], tuple[float, float]]:
    """The lesson's loop, verbatim: a plain shuffling DataLoader over the same tensors; (images/s, images/CPU-s)."""
    from torch import nn
    from torch.utils.data import DataLoader

    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(tensors, batch_size=batch, shuffle=True)

    def lesson() -> tuple[float, float]:
        seen, start, cpu = 0, time.perf_counter(), _cpu_seconds()
        for _ in range(epochs):
            model.train()
            running_loss, correct = 0.0, 0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                out = model(x)
                loss = criterion(out, y)
                loss.backward()
                optimizer.step()
                running_loss += loss.item()
                correct += (out.argmax(1) == y).sum().item()
                seen += y.size(0)
        return seen / (time.perf_counter() - start), seen / (_cpu_seconds() - cpu)

    return lesson


def _abba(sides: dict[str, Callable[[], tuple[float, float]]], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Each side timed `rounds` times in ABBA order, so drift in the machine's load hits both sides alike."""
    first, second = sides
    runs: dict[str, list[tuple[float, float]]] = {first: [], second: []}
    for round_ in range(rounds):
        for side in ((first, second) if round_ % 2 == 0 else (second, first)):
            runs[side].append(sides[side]())
    return runs


def forward_ms_per_image(backbone: str, image_size: int, batch: int) -> float:
    """Milliseconds per image of a random-init timm `backbone`'s inference forward on CPU, median of 3 batches."""
    import timm
    import torch

    model = timm.create_model(backbone, pretrained=False).eval()
    images = torch.randn(batch, 3, image_size, image_size)
    times = []
    with torch.inference_mode():
        model(images)  # warm-up
        for _ in range(3):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch


def train_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Wall and CPU seconds of one `transfer_cli.training.run.train` call, imports paid before the clock."""
    import timm  # noqa: F401  (backbones imports it when building the model)
    import torchvision  # noqa: F401

    from transfer_cli.core.plotting import pyplot
    from transfer_cli.training.run import train

    pyplot()  # plot_curves imports it at the end of every run

    cfg = compose_config(spec["overrides"])
    cpu, start = _cpu_seconds(), time.perf_counter()
    summary = train(cfg, Path(spec["run_dir"]))
    seconds = time.perf_counter() - start
    cache = Path(cfg.trainer.cache_dir) if cfg.trainer.cache_dir else None
    epochs = [record["seconds"] for record in read_metrics(Path(spec["run_dir"]))]
    return {"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu, "epochs_run": summary["epochs_run"],
            # each epoch's own seconds: the rest of `seconds` is what a run pays once (model, data, cache, plot)
            "epoch_seconds": epochs, "outside_epochs_seconds": seconds - sum(epochs),
            "cache_files": len(list(cache.glob("*.pt"))) if cache and cache.is_dir() else 0,
            "peak_rss_mb": _peak_rss_mb()}


CHILDREN = {"loop": loop_throughput, "train": train_run, "checkpoint_bytes": checkpoint_bytes,
            "loader": loader_figures}


def run_child(argv: list[str]) -> int:
    """`python -m transfer_cli.benchmarks.cpu --child NAME SPEC OUT`: one measurement in a fresh process."""
    name, spec, out = argv[argv.index("--child") + 1:][:3]
    write_json(Path(out), CHILDREN[name](json.loads(spec)))
    return 0



if __name__ == "__main__":
    sys.exit(run_child(sys.argv[1:]))
