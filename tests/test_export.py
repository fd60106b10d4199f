"""`transfer export` on a tiny run trained once for the module: each format gives the run's own logits,
its top-1 is `transfer predict`'s, model.json describes the run, and mistakes write nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.transforms import v2

from transfer_cli.cli import main as transfer_main
from transfer_cli.core.extras import installed
from transfer_cli.data.synthetic import SyntheticImages
from transfer_cli.inference.load import load_trained_model, preprocessing_of
from transfer_cli.training.run import train

from conftest import compose_train
from helpers import build, timm_backbone


CLASSES = ["ants", "bees", "wasps"]
FILES = {"torchscript": "model.pt", "onnx": "model.onnx", "safetensors": "model.safetensors"}
ONNX_READY = all(installed(name) for name in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not ONNX_READY, reason='needs the export extra: pip install -e ".[export]"')
# the formats this install can export: onnx only with its extra
FORMATS = {fmt: name for fmt, name in FILES.items() if fmt != "onnx" or ONNX_READY}
KEYS = {"format", "checkpoint", "classes", "input_size", "mean", "std", "interpolation", "crop_pct", "backbone",
        "metrics"}

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def write_class_folders(root: Path, count: int, seed: int, size: tuple[int, int] = (32, 32)) -> Path:
    """Synthetic images as lossless PNGs in <class>/ folders, (width, height) `size`."""
    images = SyntheticImages(len(CLASSES), count, 32, seed)
    for index in range(count):
        image, label = images[index]
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        picture.resize(size, Image.BICUBIC).save(root / CLASSES[label] / f"{index:03d}.png")
    return root


def trained_run(folder: Path, overrides: list[str], train_images: int = 24, val_images: int = 12) -> Path:
    """A finished run on class folders (train/ and val/) written in `folder`, as `transfer train` leaves it."""
    data = folder / "data"
    write_class_folders(data / "train", train_images, seed=1)
    write_class_folders(data / "val", val_images, seed=2)
    cfg = compose_train(["experiment=smoke", "dataset=folder", f"dataset.root={data}", *overrides])
    run_dir = folder / "run"
    run_dir.mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml", resolve=True)
    train(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run on class folders (train/ and val/), as `transfer train` leaves it."""
    return trained_run(tmp_path_factory.mktemp("export"), ["trainer.epochs=3"])


@pytest.fixture(scope="module")
def exports(run: Path) -> dict[str, Path]:
    """Each format exported once with the defaults: format -> its folder."""
    for fmt in FORMATS:
        assert transfer_main(["export", str(run), "--format", fmt]) == 0
    assert transfer_main(["export", str(run)]) == 0  # the default format again: replaces its files
    return {fmt: run / "export" / fmt for fmt in FORMATS}


@pytest.fixture(scope="module")
def batch(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 5 (a size no export was built with) and the run's own logits for it."""
    _, model, _ = load_trained_model(run)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return images, model.model(images)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("transfer: error: "), err
    return err


def files_below(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# --------------------------------------------------------------------------- logits


def test_torchscript_gives_the_runs_logits(exports: dict[str, Path], batch: tuple) -> None:
    images, expected = batch
    loaded = torch.jit.load(str(exports["torchscript"] / "model.pt"))
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, rtol=1e-5, atol=1e-5)


@needs_onnx
def test_onnx_gives_the_runs_logits_at_any_batch_size(exports: dict[str, Path], batch: tuple) -> None:
    import onnxruntime

    images, expected = batch
    session = onnxruntime.InferenceSession(str(exports["onnx"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and session.get_outputs()[0].name == "logits"
    for rows in (slice(0, 5), slice(2, 3)):
        logits = session.run(None, {"image": images[rows].numpy()})[0]
        np.testing.assert_allclose(logits, expected[rows].numpy(), rtol=1e-4, atol=1e-4)
    assert json.loads(session.get_modelmeta().custom_metadata_map["transfer_cli"])["classes"] == CLASSES


def test_safetensors_rebuild_with_timm_gives_the_runs_logits(exports: dict[str, Path], batch: tuple) -> None:
    images, expected = batch
    folder = exports["safetensors"]
    meta = json.loads((folder / "model.json").read_text())
    assert meta["rebuild"] == f"timm.create_model('test_resnet', num_classes={len(CLASSES)})"
    network = timm.create_model(meta["backbone"]["name"], num_classes=len(meta["classes"]))
    network.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(images), expected, rtol=1e-5, atol=1e-5)
    with safe_open(folder / "model.safetensors", framework="pt") as file:
        embedded = json.loads(file.metadata()["transfer_cli"])
    assert {key: embedded[key] for key in KEYS} == {key: meta[key] for key in KEYS}


def test_last_checkpoint_to_another_folder(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy" / "v1"
    assert transfer_main(["export", str(run), "--checkpoint", "last", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.pt", "preprocess.py"]
    assert json.loads((out / "model.json").read_text())["checkpoint"] == "last"
    _, model, _ = load_trained_model(run, "last")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out / "model.pt"))(images), model.model(images),
                                   rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- what a user does with it


def transform_from(meta: dict) -> v2.Compose:
    """The eval preprocessing as model.json describes it (crop_mode center): the short side to
    floor(size / crop_pct), centre crop, 0-1, normalize."""
    _, height, width = meta["input_size"]
    assert meta["crop_mode"] == "center" and height == width
    return v2.Compose([
        v2.Resize(int(height / meta["crop_pct"]), interpolation=v2.InterpolationMode(meta["interpolation"]),
                  antialias=True),
        v2.CenterCrop([height, width]), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(meta["mean"], meta["std"]),
    ])


def test_exported_top1_is_predicts(run: Path, exports: dict[str, Path], tmp_path: Path) -> None:
    images = write_class_folders(tmp_path / "new", 12, seed=3, size=(44, 38))  # resized and cropped on the way
    out = tmp_path / "predictions.json"
    assert transfer_main(["predict", str(run), str(images), "--top-k", "1", "--out", str(out)]) == 0
    predicted = {row["path"]: row["top"][0]["class"] for row in json.loads(out.read_text())}
    meta = json.loads((exports["torchscript"] / "model.json").read_text())
    transform = transform_from(meta)
    paths = sorted(predicted)
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    scripted = torch.jit.load(str(exports["torchscript"] / "model.pt"))
    with torch.no_grad():
        by_script = scripted(batch).argmax(dim=1).tolist()
    assert [meta["classes"][i] for i in by_script] == [predicted[path] for path in paths]
    if ONNX_READY:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(exports["onnx"] / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.run(None, {"image": batch.numpy()})[0].argmax(axis=1).tolist() == by_script


# --------------------------------------------------------------------------- model.json and the files


@pytest.mark.parametrize("fmt", [pytest.param(fmt, marks=[needs_onnx] if fmt == "onnx" else []) for fmt in FILES])
def test_model_json_describes_the_run(run: Path, exports: dict[str, Path], fmt: str) -> None:
    meta = json.loads((exports[fmt] / "model.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    cfg, model, classes = load_trained_model(run)
    pre = preprocessing_of(cfg, model)
    assert KEYS <= set(meta)
    assert meta["format"] == fmt and meta["checkpoint"] == "best" and meta["file"] == FILES[fmt]
    assert meta["classes"] == classes == CLASSES == summary["classes"]
    assert meta["input_size"] == [3, 32, 32]
    assert (meta["mean"], meta["std"]) == (list(pre.mean), list(pre.std))
    assert (meta["interpolation"], meta["crop_pct"]) == (pre.interpolation, pre.crop_pct) == ("bilinear", 1.0)
    assert meta["backbone"]["source"] == "timm" and meta["backbone"]["name"] == "test_resnet"
    assert meta["backbone"]["weights"] == summary["weights"] == "random init"
    for key in ("reported_val_acc", "best_epoch", "final_val_acc", "epochs_run"):
        assert meta["metrics"][key] == summary[key]
    assert 0 <= meta["verified"]["max_abs_diff"] <= meta["verified"]["tolerance"]


def test_files_are_whole_and_follow_the_umask(exports: dict[str, Path]) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for fmt, folder in exports.items():
        assert files_below(folder) == sorted(["model.json", FILES[fmt], "preprocess.py"])  # no .*.tmp left behind
        for path in folder.iterdir():
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
            assert path.stat().st_size > 0, path


# --------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(("args", "message"), [
    (["{tmp}"], "is not a run directory"),
    (["{tmp}/nope"], "does not exist"),
    (["{run}", "--format", "pdf"], "invalid choice: 'pdf'"),
    (["{run}", "--checkpoint", "middle"], "invalid choice: 'middle'"),
    (["{copy}", "--checkpoint", "last"], "last.pt does not exist"),
    (["{run}", "--out", "{tmp}/a-file"], "is a file"),
])
def test_mistakes_are_one_line_and_write_nothing(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 args: list[str], message: str) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("export")))
    (copy / "checkpoints" / "last.pt").unlink()
    (tmp_path / "a-file").write_text("hello")
    before, run_before = files_below(tmp_path), files_below(run)
    places = {"run": run, "tmp": tmp_path, "copy": copy}
    argv = [arg.format(**places) for arg in args]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    assert transfer_main(["export", *argv, *out]) == 2
    assert message in one_line_error(capsys)
    assert files_below(tmp_path) == before and files_below(run) == run_before


def test_onnx_without_the_extra_names_it(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("transfer_cli.inference.export.installed", lambda module: module != "onnx")
    assert transfer_main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "out")]) == 2
    assert 'pip install -e ".[export]"' in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_export_that_differs_from_the_run_is_refused(run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reads the written bytes back: a trace that drifts (here, shifted logits) writes nothing."""
    trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda network, example: trace(Shifted(network), example))
    assert transfer_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "differs from the run's model" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


class Shifted(torch.nn.Module):
    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images) + 1e-3


@pytest.mark.slow  # trains a run per head
@pytest.mark.parametrize(("head", "rebuilt"), [(["head.dropout=0.2"], True), (["head=mlp"], False)],
                         ids=["linear head behind a dropout", "mlp head"])
def test_safetensors_keys_follow_the_head(tmp_path: Path, head: list[str], rebuilt: bool) -> None:
    """A linear head behind a dropout (`fc.1.*`) is saved as timm's `fc.*`; an mlp head keeps the run's own keys,
    for transfer_cli's build_model, and model.json says there is no library call to rebuild it with."""
    run_dir = trained_run(tmp_path, ["strategy=fine_tune", "trainer.epochs=1", *head], train_images=6, val_images=3)
    out = tmp_path / "out"
    assert transfer_main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    state = load_file(out / "model.safetensors")
    cfg, model, _ = load_trained_model(run_dir)
    network = model.model.eval()
    if rebuilt:
        assert "fc.1.weight" in network.state_dict() and "fc.1.weight" not in state  # renamed on the way out
        assert meta["rebuild"] == "timm.create_model('test_resnet', num_classes=3)"
        assert meta["state_dict_keys"] == "rebuild"
        target = timm.create_model("test_resnet", num_classes=3)
    else:
        assert meta["rebuild"] is None and meta["state_dict_keys"] == "transfer_cli"
        assert state.keys() == network.state_dict().keys()
        target = build(timm_backbone(), num_classes=3, head=cfg.head, seed=1).model
    target.eval().load_state_dict(state, strict=True)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(images), network(images))
