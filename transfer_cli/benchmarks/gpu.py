"""GPU training images/s for `transfer bench` (`--gpu`, or added to the CPU figures where CUDA is
present): torchvision models under our StepRunner with AMP and channels_last, on synthetic
tensors and on a JPEG folder read by our data pipeline."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from transfer_cli.config.compose import compose_config


GPU_MODELS = ("resnet50", "efficientnet_b0")


def write_jpegs(root: Path, count: int = 256, classes: int = 4, size: tuple[int, int] = (320, 256)) -> Path:
    """`count` random-noise JPEGs in `classes` class folders under `root` (a folder dataset)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)
    return root


def gpu_figures(data_root: str | None = None, *, device: str = "cuda", models: tuple[str, ...] = GPU_MODELS,
                image_size: int = 224, batch: int = 128, warmup: int = 10, steps: int = 40,
                jpegs: int = 256) -> dict[str, Any]:
    """Training images/s of torchvision `models` (weights=None) under our StepRunner, AMP and
    channels_last (trainer.amp/channels_last=auto), on synthetic tensors and on a JPEG folder
    (`data_root`, else `jpegs` random JPEGs written to a temp dir). `device="cpu"` exercises the
    same code without CUDA (tests)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return {"available": False,
                "reason": f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"}
    workers = min(8, os.cpu_count() or 1)
    result: dict[str, Any] = {"available": True, "device": _device_name(device), "image_size": image_size,
                              "batch_size": batch, "steps": steps, "num_workers": workers, "models": {}}
    with tempfile.TemporaryDirectory(prefix="transfer-bench-gpu-") as tmp:
        root = Path(data_root).expanduser() if data_root else write_jpegs(Path(tmp) / "jpegs", jpegs)
        result["jpeg_root"] = str(root) if data_root else f"{jpegs} random JPEGs 320x256 (temp dir)"
        for name in models:
            overrides = ["backbone=torchvision", f"backbone.name={name}", "backbone.weights=null", "strategy=fine_tune",
                         "optimizer=adamw", "dataset=folder", f"dataset.root={root}", "dataset.cache_images=false",
                         "augment=basic", f"transforms.image_size={image_size}", f"trainer.device={device}",
                         f"trainer.batch_size={batch}", f"trainer.num_workers={workers}",
                         "trainer.cache_features=false"]
            figures = _gpu_model(compose_config(overrides), Path(tmp) / name, warmup, steps)
            on_device = _gpu_model(compose_config([*overrides, "trainer.decode_on_device=true"]),
                                   Path(tmp) / f"{name}-decode", warmup, steps, synthetic=False)
            figures["jpeg_decode_on_device_images_per_s"] = on_device["jpeg_images_per_s"]
            result["models"][name] = figures
    return result


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


def _gpu_model(cfg: Any, run_dir: Path, warmup: int, steps: int, synthetic: bool = True) -> dict[str, Any]:
    """Images/s on synthetic tensors (`synthetic`) and on the folder through the run's own train pipeline
    (trainer.decode_on_device=true: JPEG bytes from the workers, decoded and augmented on the device)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from transfer_cli.data.loaders import DeviceDecodingLoader
    from transfer_cli.training.assemble import prepare
    from transfer_cli.training.loop import Tally
    from transfer_cli.training.stages import enter_stage
    from transfer_cli.training.state import Progress

    prepared = prepare(cfg, run_dir)  # on CUDA: cudnn.benchmark and TF32, as every training run
    setup, batch = prepared.setup, cfg.trainer.batch_size
    runner = enter_stage(setup, Progress(), 0).runner
    setup.model.model.train()
    precision = runner.precision
    cuda = precision.device.type == "cuda"

    def images_per_s(batches: Iterator[tuple[Any, Any]]) -> float:
        tally = Tally(precision.device, (1,))
        for index in range(warmup + steps):
            if index == warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            runner(*precision.to_device(*next(batches)), tally)
        tally.loss.item()  # waits for the last step
        return steps * batch / (time.perf_counter() - start)

    size = prepared.preprocessing.image_size
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, setup.num_classes, (batch,))
    if cuda:
        images, labels = images.pin_memory(), labels.pin_memory()
    synthetic_figure = images_per_s(iter(lambda: (images, labels), None)) if synthetic else None
    # one long epoch over the folder (our dataset and train transform), so every worker stays busy
    dataset = setup.train_loader.dataset
    on_device = isinstance(setup.train_loader, DeviceDecodingLoader)
    kind, where = (DeviceDecodingLoader, {"device": precision.device}) if on_device else (DataLoader, {})
    loader = kind(dataset, **where, batch_size=batch, num_workers=setup.train_loader.num_workers, pin_memory=cuda,
                  sampler=RandomSampler(dataset, replacement=True, num_samples=batch * (warmup + steps)))
    jpeg = images_per_s(iter(loader))
    return {"synthetic_images_per_s": synthetic_figure, "jpeg_images_per_s": jpeg,
            "amp": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else None,
            "channels_last": precision.channels_last, "grad_scaler": runner.scaler is not None,
            "jpeg_train_images": len(dataset)}
