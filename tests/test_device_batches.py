"""What crosses to the device: uint8 batches normalized there (trainer.normalize_on_device, on by default
for CUDA, run here on CPU) train exactly as the loader's float batches; trainer.num_workers=auto."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from transfer_cli.benchmarks.loader import write_photos
from transfer_cli.core.errors import TransferError
from transfer_cli.data.device_decode import EncodedImages
from transfer_cli.data.folder import ImageFolderDataset
from transfer_cli.data.loaders import SampleKey, make_loader, resolve_workers, sample_seed
from transfer_cli.data.transforms import Preprocessing, eval_transform
from transfer_cli.models.runtime import Precision
from transfer_cli.training.assemble import prepare
from transfer_cli.training.loop import Tally
from transfer_cli.training.run import train
from transfer_cli.training.stages import enter_stage
from transfer_cli.training.state import Progress

from conftest import FAST, compose_train
from helpers import assert_same_metrics


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("channels_last", [True, False])
def test_to_device_normalizes_uint8_as_todtype_and_normalize_do(channels_last: bool) -> None:
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)
    precision = Precision(torch.device("cpu"), None, channels_last, (MEAN, STD))
    moved, labels = precision.to_device(images, torch.arange(4))
    expected = v2.Normalize(list(MEAN), list(STD))(v2.ToDtype(torch.float32, scale=True)(images))
    assert moved.dtype == torch.float32 and torch.equal(moved, expected) and torch.equal(labels, torch.arange(4))
    assert moved.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_float_batches_pass_as_they_are_and_uint8_needs_the_statistics() -> None:
    features = torch.randn(4, 16)  # cached features, or images the loader normalized
    moved, _ = Precision(torch.device("cpu"), normalize=(MEAN, STD)).to_device(features, torch.zeros(4))
    assert torch.equal(moved, features)
    with pytest.raises(ValueError, match="uint8 images reached Precision.to_device"):
        Precision(torch.device("cpu")).to_device(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2))


def _prepared(tmp_path: Path, on_device: bool, extra: list[str]):
    cfg = compose_train(FAST + ["strategy=fine_tune", f"trainer.normalize_on_device={str(on_device).lower()}",
                                *extra])
    return prepare(cfg, tmp_path / str(on_device))


@pytest.mark.parametrize("extra", [[], ["augment=basic", "augment.mixup_alpha=0.4", "augment.cutmix_alpha=1.0"]],
                         ids=["eval", "augmented+mixed"])
def test_uint8_batches_give_the_float_paths_logits_and_loss(tmp_path: Path, extra: list[str]) -> None:
    """Same model, same samples: the loaders differ only in where ToDtype and Normalize run. MixUp and
    CutMix run after to_device, on normalized images, in both."""
    runs = {on: _prepared(tmp_path, on, extra) for on in (False, True)}
    assert runs[False].setup.runner.precision.normalize is None
    assert runs[True].setup.runner.precision.normalize == (runs[True].preprocessing.mean, runs[True].preprocessing.std)
    losses = {}
    for on, prepared in runs.items():
        setup = prepared.setup
        for loader in (setup.train_loader, setup.val_loader):
            assert next(iter(loader))[0].dtype == (torch.uint8 if on else torch.float32)
        run = enter_stage(setup, Progress(), 0)
        setup.train_loader.sampler.set_epoch(0)
        images, labels = next(iter(setup.train_loader))
        precision = run.runner.precision
        prepared.setup.model.model.eval()
        with torch.no_grad():
            logits = prepared.setup.model.model(precision.to_device(images, labels)[0])
        prepared.setup.model.model.train()
        torch.manual_seed(0)  # the mixer's draws
        tally = Tally(precision.device, (1,))
        run.runner(*precision.to_device(images, labels), tally)
        losses[on] = (logits, tally.loss.item())
    assert torch.allclose(losses[True][0], losses[False][0], rtol=1e-5, atol=1e-5)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("extra", [["strategy=gradual", "augment=none"],
                                   ["strategy=fine_tune", "augment=basic", "augment.mixup_alpha=0.4"]],
                         ids=["feature-cached head, then fine-tuning", "augmented+mixup"])
@pytest.mark.slow
def test_a_run_normalizing_on_the_device_logs_the_same_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                extra: list[str]) -> None:
    monkeypatch.setenv("TRANSFER_CACHE", str(tmp_path / "feature-cache"))  # empty: each run computes its features
    for on in ("false", "true"):
        train(compose_train(FAST + ["trainer.epochs=3", f"trainer.normalize_on_device={on}", *extra]), tmp_path / on)
    assert_same_metrics(tmp_path / "true", tmp_path / "false")


def test_normalizing_on_the_device_is_for_cuda_by_default(tmp_path: Path) -> None:
    cfg = compose_train(FAST)
    assert cfg.trainer.normalize_on_device == "auto"
    assert prepare(cfg, tmp_path).setup.runner.precision.normalize is None  # CPU: the loader normalizes
    with pytest.raises(TransferError, match=r"^trainer\.normalize_on_device=yes: must be one of auto, true, false$"):
        compose_train(FAST + ["trainer.normalize_on_device=yes"])


# --------------------------------------------------------------------------- trainer.num_workers


def test_num_workers_auto_is_what_the_gpu_bench_uses(tmp_path: Path) -> None:
    cpus = os.cpu_count() or 1
    assert resolve_workers("auto") == min(8, cpus)
    assert resolve_workers(0) == 0 and resolve_workers(10_000) == cpus
    data = torch.utils.data.TensorDataset(torch.zeros(8, 2), torch.zeros(8))
    assert make_loader(data, 2, train=False, num_workers="auto", seed=0, pin_memory=False).num_workers == min(8, cpus)
    cfg = compose_train(["experiment=smoke", "trainer.num_workers=auto"])
    assert compose_train([]).trainer.num_workers == "auto"  # conf/trainer/default.yaml
    setup = prepare(cfg, tmp_path).setup
    assert setup.train_loader.num_workers == setup.val_loader.num_workers == min(8, cpus)


@pytest.mark.parametrize("value", ["-1", "two", "2.5", "[2]"])
def test_a_bad_worker_count_is_one_line(value: str) -> None:
    with pytest.raises(TransferError, match=rf"^trainer\.num_workers={re.escape(value)}: must be auto or a whole "
                                            r"number >= 0$"):
        compose_train(["experiment=smoke", f"trainer.num_workers={value}"])


# --------------------------------------------------------------------------- trainer.decode_on_device


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photo-like JPEGs in two classes, plus what the device decoder does not take: a PNG, a CMYK JPEG."""
    root = write_photos(tmp_path_factory.mktemp("jpegs"), 12, size=(320, 240))
    photo = Image.open(next((root / "class_0").glob("*.jpg"))).convert("RGB")
    photo.save(root / "class_0" / "lossless.png")
    photo.convert("CMYK").save(root / "class_1" / "cmyk.jpg")
    photo.convert("L").save(root / "class_1" / "grey.jpg")
    return root


def test_encoded_items_are_file_bytes_where_the_device_can_decode_them(jpeg_folder: Path) -> None:
    data = ImageFolderDataset(jpeg_folder, ["class_0", "class_1"])
    items = EncodedImages(data, eval_transform(PRE, normalize=False))
    for index, (path, label) in enumerate(data.samples):
        payload, served_label, seed = items[index]
        assert (served_label, seed) == (label, None)
        if path.name in ("lossless.png", "cmyk.jpg"):  # decoded in the worker: the pixels PIL gives
            assert torch.equal(payload, v2.functional.pil_to_tensor(data[index][0]))
        else:
            assert payload.dim() == 1 and payload.numpy().tobytes() == path.read_bytes()
    assert items[SampleKey(0, 7, 2)][2] == sample_seed(SampleKey(0, 7, 2))


PRE = Preprocessing(image_size=32, crop_pct=0.875, interpolation="bilinear", mean=MEAN, std=STD, crop_mode="center")


def _folder_run(tmp_path: Path, root: Path, decode: bool, workers: int = 0):
    cfg = compose_train(["experiment=smoke", "dataset=folder", f"dataset.root={root}", "dataset.cache_images=false",
                         "augment=basic", "transforms.draft_decode=false", "trainer.normalize_on_device=true",
                         f"trainer.decode_on_device={str(decode).lower()}", f"trainer.num_workers={workers}"])
    return prepare(cfg, tmp_path / f"decode-{decode}-{workers}")


def test_device_decoded_batches_are_the_cpu_paths_within_rounding(tmp_path: Path, jpeg_folder: Path) -> None:
    """Same samples, same crops and flips (each drawn under its SampleKey's seed), decoded by libjpeg either
    way here; only the resize of a tensor rounds differently from PIL's."""
    cpu, device = _folder_run(tmp_path, jpeg_folder, False), _folder_run(tmp_path, jpeg_folder, True, workers=2)
    assert type(device.setup.train_loader).__name__ == "DeviceDecodingLoader"
    assert device.setup.runner.precision.normalize is not None  # device-decoded batches are uint8
    for name in ("train_loader", "val_loader"):
        ours, theirs = getattr(device.setup, name), getattr(cpu.setup, name)
        if name == "train_loader":
            ours.sampler.set_epoch(1), theirs.sampler.set_epoch(1)
        for (a, labels_a), (b, labels_b) in zip(ours, theirs):
            assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape and torch.equal(labels_a, labels_b)
            diff = (a.float() - b.float()).abs()
            assert diff.mean() < 1.0 and diff.max() <= 12, name


def test_a_run_decoding_on_the_device_trains(tmp_path: Path, jpeg_folder: Path) -> None:
    device = _folder_run(tmp_path, jpeg_folder, True)
    setup = device.setup
    run = enter_stage(setup, Progress(), 0)
    setup.train_loader.sampler.set_epoch(0)
    images, labels = next(iter(setup.train_loader))
    tally = Tally(run.runner.precision.device, (1,))
    before = [p.detach().clone() for p in device.setup.model.model.parameters()]
    run.runner(*run.runner.precision.to_device(images, labels), tally)
    assert images.shape[1:] == (3, 32, 32) and torch.isfinite(tally.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, device.setup.model.model.parameters()))


@pytest.mark.slow
def test_generated_images_train_alike_decoded_on_the_device(tmp_path: Path) -> None:
    """Synthetic images are uint8 tensors: on the device only the transform moves, so the run is the same."""
    for decode in ("false", "true"):
        train(compose_train(FAST + ["strategy=fine_tune", "trainer.epochs=2", "augment=basic",
                                    "trainer.normalize_on_device=true",
                                    f"trainer.decode_on_device={decode}"]), tmp_path / decode)
    assert_same_metrics(tmp_path / "true", tmp_path / "false")


def test_decoding_on_the_device_refuses_batchnorm_reestimation(tmp_path: Path) -> None:
    cfg = compose_train(FAST + ["strategy=fine_tune", "strategy.stages.0.bn=reestimate",
                                "trainer.decode_on_device=true"])
    with pytest.raises(TransferError, match=r"^trainer\.decode_on_device=true cannot re-estimate BatchNorm"):
        prepare(cfg, tmp_path)
