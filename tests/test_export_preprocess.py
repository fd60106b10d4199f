"""The export's preprocess.py equals the tool's eval transform in every crop mode; with onnxruntime, run where
neither torch nor transfer_cli can be imported, it gives `transfer predict`'s probabilities on awkward images;
one with rounding for truncation, or without the reduced JPEG decode, does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from transfer_cli.cli import main as transfer_main
from transfer_cli.core.extras import installed
from transfer_cli.data.folder import load_rgb
from transfer_cli.data.transforms import Preprocessing, eval_transform
from transfer_cli.inference import preprocess_script
from transfer_cli.training.run import train

from conftest import compose_train


needs_onnx = pytest.mark.skipif(not all(installed(name) for name in ("onnx", "onnxruntime")),
                                reason='needs the export extra: pip install -e ".[export]"')

# resizing the short side to 32: 32 * 53 / 37 = 45.8 and 32 * 45 / 33 = 43.6 tell truncation from rounding;
# the 300 x 210 JPEG is decoded at half size (draft)
TRUNCATED = 'new_long = int(size * long / short)'
DRAFTED = 'spec["decode"]["draft"] and image.format == "JPEG"'
# run the script with torch and transfer_cli unimportable
RUNNER = ("import runpy, sys; sys.modules['torch'] = sys.modules['transfer_cli'] = None; "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def write_images(folder: Path) -> list[Path]:
    """A portrait, a tiny image, an RGBA PNG, a grayscale PNG and a noisy JPEG large enough for draft mode."""
    rng = np.random.default_rng(0)
    folder.mkdir()

    def noise(height: int, width: int, channels: int) -> np.ndarray:
        shape = (height, width, channels) if channels > 1 else (height, width)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    images = {"portrait.png": Image.fromarray(noise(53, 37, 3)), "tiny.png": Image.fromarray(noise(7, 9, 3)),
              "alpha.png": Image.fromarray(noise(40, 50, 4), "RGBA"), "grey.png": Image.fromarray(noise(33, 45, 1)),
              "large.jpg": Image.fromarray(noise(210, 300, 3))}
    for name, image in images.items():
        image.save(folder / name)
    return [folder / name for name in images]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], np.ndarray]:
    """The ONNX export of a tiny run, the images, and `transfer predict`'s probabilities for them (rows in the
    images' order, columns in the classes')."""
    folder = tmp_path_factory.mktemp("preprocess")
    run = folder / "run"
    run.mkdir()
    cfg = compose_train(["experiment=smoke", "trainer.epochs=3", "dataset.train_size=48", "dataset.val_size=16"])
    OmegaConf.save(OmegaConf.structured(cfg), run / "config.yaml", resolve=True)
    train(cfg, run)
    assert transfer_main(["export", str(run), "--format", "onnx"]) == 0
    export = run / "export" / "onnx"
    images = write_images(folder / "images")
    out = folder / "predictions.json"
    classes = json.loads((export / "model.json").read_text())["classes"]
    top_k = str(len(classes))  # every class's probability
    assert transfer_main(["predict", str(run), *map(str, images), "--top-k", top_k, "--out", str(out)]) == 0
    rows = {row["path"]: {top["class"]: top["probability"] for top in row["top"]}
            for row in json.loads(out.read_text())}
    expected = np.array([[rows[str(image)][name] for name in classes] for image in images])
    return export, images, expected


def probabilities(export: Path, script: Path, images: list[Path], work: Path) -> np.ndarray:
    """Softmax of the ONNX model on what `script` (a copy of preprocess.py beside model.json) makes of `images`."""
    import onnxruntime

    batch_file = work / "batch.npy"
    subprocess.run([sys.executable, "-c", RUNNER, str(script), str(batch_file), *map(str, images)], check=True,
                   cwd=work, capture_output=True)
    batch = np.load(batch_file)
    assert batch.dtype == np.float32 and batch.shape == (len(images), 3, 32, 32)
    session = onnxruntime.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": batch})[0].astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@needs_onnx
def test_preprocess_script_gives_predicts_probabilities(exported, tmp_path: Path) -> None:
    export, images, expected = exported
    assert (export / "model.json").exists() and json.loads((export / "model.json").read_text())["decode"]["draft"]
    actual = probabilities(export, export / "preprocess.py", images, tmp_path)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


@needs_onnx
@pytest.mark.parametrize(("old", "new"), [(TRUNCATED, "new_long = round(size * long / short)"), (DRAFTED, "False")],
                         ids=["rounding", "no-draft"])
def test_a_perturbed_script_differs(exported, tmp_path: Path, old: str, new: str) -> None:
    """The images tell a resize that rounds, or a full JPEG decode, from the tool's own: the test above would fail."""
    export, images, expected = exported
    text = (export / "preprocess.py").read_text()
    assert old in text
    script = export / "perturbed.py"  # beside model.json, which it reads
    script.write_text(text.replace(old, new))
    try:
        actual = probabilities(export, script, images, tmp_path)
    finally:
        script.unlink()
    assert np.abs(actual - expected).max() > 1e-5


@needs_onnx
def test_model_json_states_the_resize_and_decode(exported) -> None:
    meta = json.loads((exported[0] / "model.json").read_text())
    assert meta["preprocess"] == "preprocess.py" and meta["resize_size"] == 32 and meta["crop_mode"] == "center"
    assert "truncated" in meta["resize"]["rule"] and meta["interpolation"].upper() in meta["resize"]["resampling"]
    assert meta["decode"]["margin"] == 2 and "Image.draft" in meta["decode"]["rule"]


@pytest.mark.parametrize(("image_size", "crop_pct", "crop_mode"), [
    ((32, 40), 0.9, "center"), (32, 0.875, "squash"), ((40, 32), 0.95, "border"), (32, 1.2, "center"),
    (32, 1.1, "border")], ids=["center-keep-ratio", "squash", "border", "center-padded", "border-padded"])
def test_script_equals_the_eval_transform(tmp_path: Path, image_size, crop_pct: float, crop_mode: str) -> None:
    """Each resize rule (keep-ratio, squash, border with its mean-colour padding, black padding past crop_pct 1),
    with draft decoding, matches the tool's own pipeline to float rounding."""
    pre = Preprocessing(image_size, crop_pct, "bilinear", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), crop_mode)
    height, width = pre.size
    spec = json.loads(json.dumps({"input_size": [3, height, width], "resize_size": pre.resize_size,
                                  "crop_mode": crop_mode, "interpolation": pre.interpolation, "mean": pre.mean,
                                  "std": pre.std, "decode": {"draft": True, "margin": 2}}))
    transform = eval_transform(pre)
    for path in write_images(tmp_path / "images"):
        expected = transform(load_rgb(path, transform.decode)).numpy()
        np.testing.assert_allclose(preprocess_script.load(path, spec), expected, rtol=0, atol=1e-6, err_msg=path.name)
