"""The Python API (`transfer_cli.train`, `transfer_cli.load_run`) against the commands it stands for."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import transfer_cli
from transfer_cli.cli import main as transfer_main
from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError

from conftest import REPO


# one stage, so two epochs are enough; a tiny run in a few seconds on a CPU
TINY = ["experiment=smoke", "strategy=fine_tune", "dataset.train_size=64", "dataset.val_size=32", "trainer.epochs=2"]


def tree(root: Path) -> dict[str, Any]:
    """Every entry under `root`, with each file's mtime and content hash: any write shows."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    run_dir = tmp_path_factory.mktemp("api") / "run"
    return transfer_cli.train(TINY, run_dir=run_dir), run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PNGs of several sizes, some in a subfolder (predict searches folders recursively)."""
    root = tmp_path_factory.mktemp("images")
    (root / "more").mkdir()
    generator = torch.Generator().manual_seed(0)
    for index, (height, width) in enumerate([(32, 32), (40, 48), (32, 32), (64, 40), (36, 36)] * 2):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / ("more" if index % 3 == 0 else ".") / f"{index:02d}.png")
    return root


def command_predictions(run_dir: Path, paths: list[Path], out: Path, top_k: int) -> list[dict[str, Any]]:
    assert transfer_main(["predict", str(run_dir), *map(str, paths), "--top-k", str(top_k), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def as_rows(predictions: list[Any]) -> list[dict[str, Any]]:
    return [{"path": p.path, "top": [{"class": c, "probability": prob} for c, prob in p.top]} for p in predictions]


# --------------------------------------------------------------------------- train


def test_train_returns_the_summary_it_wrote(trained: tuple[dict[str, Any], Path]) -> None:
    summary, run_dir = trained
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary.run_dir == run_dir.resolve() and summary["epochs_run"] == 2
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_second_run_in_the_same_process_gets_its_own_clock_made_dir(
        trained: tuple[dict[str, Any], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv, root = list(sys.argv), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    summary = transfer_cli.train([*TINY[:-1], "trainer.epochs=1"])
    assert sys.argv == argv and root.handlers == handlers and root.level == level  # the caller's, untouched
    assert summary.run_dir.parent == tmp_path / "outputs" / "runs" and summary.run_dir != trained[1].resolve()
    assert summary == json.loads((summary.run_dir / "summary.json").read_text()) and summary["epochs_run"] == 1


def test_a_dir_holding_a_run_is_refused_as_the_command_refuses_it(
        trained: tuple[dict[str, Any], Path], hydra_in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = trained[1]
    before = tree(run_dir)
    with pytest.raises(TransferError, match="already holds a finished run") as refused:
        transfer_cli.train(TINY, run_dir=run_dir)
    assert tree(run_dir) == before
    capsys.readouterr()
    assert transfer_main(["train", *TINY, f"hydra.run.dir={run_dir}"]) == 2
    assert capsys.readouterr().err.strip() == f"transfer: error: {refused.value}"
    assert tree(run_dir) == before


@pytest.mark.parametrize(("overrides", "says"), [
    ([*TINY, "trainer.epochz=3"], "epochz"),
    ([*TINY, "trainer.epochs=0"], "trainer.epochs"),
    (["-m", *TINY], "transfer train -m"),
    ([*TINY, "hydra.mode=MULTIRUN"], "transfer train -m"),
    (["--cfg", "job", *TINY], "--cfg"),
])
def test_a_mistake_raises_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], overrides: list[str],
                                             says: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransferError, match=says.replace(".", r"\.")):
        transfer_cli.train(overrides)
    with pytest.raises(TransferError, match=says.replace(".", r"\.")):
        transfer_cli.train(overrides, run_dir=tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
    assert "transfer: error" not in capsys.readouterr().err  # raised, not printed


def test_a_mistake_found_by_the_job_raises_and_leaves_no_run(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """gradual has 3 stages: too few epochs for them is a mistake, found before a directory is claimed."""
    argv = list(sys.argv)
    with pytest.raises(TransferError, match="fewer than the strategy's 3 stages"):
        transfer_cli.train([*TINY, "strategy=gradual"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists() and sys.argv == argv
    assert "transfer: error" not in capsys.readouterr().err


@pytest.mark.parametrize("ending", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.slow
def test_a_bug_or_ctrl_c_in_the_job_is_raised_as_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         ending: BaseException) -> None:
    """Not the command's one line and exit code: the exception itself, the run without a checkpoint discarded."""
    import transfer_cli.training.run as training

    def fails(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ending

    monkeypatch.setattr(training, "train", fails)
    with pytest.raises(type(ending)) as raised:
        transfer_cli.train(TINY, run_dir=tmp_path / "run")
    assert raised.value is ending and not (tmp_path / "run").exists()
    if isinstance(ending, RuntimeError):
        assert "full traceback in" in ending.__notes__[0]


@pytest.mark.slow
def test_train_and_predict_from_a_plain_python_process(tmp_path: Path) -> None:
    """docs/python-api.md's example in a fresh interpreter (no test fixture has registered anything), once as it
    is and once after the caller initialised Hydra for its own configs: sys.argv, Hydra's globals (GlobalHydra,
    HydraConfig) and the root logger stay the caller's while the run trains, and after it."""
    code = f"""
import logging, sys
from pathlib import Path
from PIL import Image
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
import transfer_cli
import transfer_cli.training.run as run
caller = sys.argv[1] == "caller"
if caller:
    from hydra import initialize
    initialize(version_base="1.3")
argv = sys.argv
def state():
    return (sys.argv is argv, list(sys.argv), GlobalHydra.instance().hydra, HydraConfig.instance().cfg,
            list(logging.getLogger().handlers), logging.getLogger().level)
before, during = state(), []
real = run.train
def observed(*args, **kwargs):
    during.append(state())
    return real(*args, **kwargs)
run.train = observed
summary = transfer_cli.train({TINY!r} + ["trainer.epochs=1", "strategy=feature_extract"], run_dir=sys.argv[2])
assert during == [before] and state() == before, (before, during, state())
assert (before[2] is not None) == caller
images = Path(sys.argv[2]).parent / "images"
images.mkdir(exist_ok=True)
Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "red.png")
predictions = transfer_cli.load_run(summary.run_dir).predict([images], top_k=2)
assert summary["epochs_run"] == 1 and len(predictions) == 1 and len(predictions[0].top) == 2, predictions
assert (summary.run_dir / "train.log").read_text().count("epoch 1") >= 1  # the run's own log, as the command's
print("ok")
"""
    for mode in ("plain", "caller"):
        done = subprocess.run([sys.executable, "-c", code, mode, str(tmp_path / mode / "run")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (mode, done.stderr[-2000:])


def test_importing_the_package_loads_neither_torch_nor_hydra() -> None:
    code = "import sys, transfer_cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'hydra'}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    import transfer_cli.api as api

    assert transfer_cli.train is api.train and transfer_cli.load_run is api.load_run
    assert {"train", "load_run", "__version__"} <= set(dir(transfer_cli))
    with pytest.raises(AttributeError):
        transfer_cli.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- load_run


def test_load_run_gives_the_model_classes_transform_and_config(trained: tuple[dict[str, Any], Path],
                                                               images: Path) -> None:
    summary, run_dir = trained
    run = transfer_cli.load_run(run_dir)
    assert isinstance(run.model, torch.nn.Module) and not run.model.training
    assert run.classes == summary["classes"] and isinstance(run.config, TrainConfig)
    assert run.config.trainer.epochs == 2 and run.config.backbone.name == "test_resnet"
    file = next(images.glob("*.png"))
    tensor = run.transform(Image.open(file).convert("RGB"))
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and tensor.min() < 0  # normalized
    with torch.inference_mode():
        probabilities = run.model(tensor[None]).softmax(dim=1)[0]
    top = run.predict(file, top_k=1)[0].top[0]
    assert top[0] == run.classes[int(probabilities.argmax())]
    assert top[1] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_predict_on_files_gives_what_the_command_gives(trained: tuple[dict[str, Any], Path], images: Path,
                                                       tmp_path: Path) -> None:
    run = transfer_cli.load_run(trained[1])
    files = sorted(images.glob("*.png"))[:3]
    for paths, top_k in (([images], 3), ([*files, images / "more"], 2), ([files[0], images], 9)):
        expected = command_predictions(trained[1], paths, tmp_path / "out.json", top_k)
        got = as_rows(run.predict(paths, top_k=top_k))
        assert got == expected  # same paths, classes and probabilities, to the last bit
    assert len(expected) == 10 and len(expected[0]["top"]) == len(run.classes)  # each file once; k <= classes


def test_predict_takes_pil_images(trained: tuple[dict[str, Any], Path], images: Path) -> None:
    run = transfer_cli.load_run(trained[1])
    files = sorted(images.rglob("*.png"))
    from_files = run.predict(files)
    opened = [Image.open(file) for file in files]
    from_images = run.predict(opened)
    assert [p.path for p in from_images] == [f"<image {i}>" for i in range(len(files))]
    assert [p.top for p in from_images] == [p.top for p in from_files]
    mixed = run.predict([opened[1], files[0], opened[2]])
    assert [p.path for p in mixed] == ["<image 0>", str(files[0]), "<image 2>"]
    assert [p.top for p in mixed] == [from_files[1].top, from_files[0].top, from_files[2].top]


def test_evaluate_gives_what_the_eval_command_computes(trained: tuple[dict[str, Any], Path]) -> None:
    summary, run_dir = trained
    metrics = transfer_cli.load_run(run_dir).evaluate(split="val")
    assert metrics["acc1"] == pytest.approx(summary["reported_val_acc"]) and "macro_f1" in metrics
    assert set(metrics["per_class"]) == set(summary["classes"])
    (run_dir / "eval" / "val" / "best" / "metrics.json").unlink()
    assert transfer_main(["eval", str(run_dir)]) == 0
    assert json.loads((run_dir / "eval" / "val" / "best" / "metrics.json").read_text()) == metrics
    assert transfer_cli.load_run(run_dir, checkpoint="last").evaluate()["checkpoint"] == "last"


def test_load_run_mistakes_raise(trained: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="not a run directory"):
        transfer_cli.load_run(tmp_path)
    with pytest.raises(TransferError, match="does not exist"):
        transfer_cli.load_run(tmp_path / "missing")
    with pytest.raises(TransferError, match="checkpoint=worst"):
        transfer_cli.load_run(trained[1], checkpoint="worst")
    with pytest.raises(TransferError, match="trainer.device=gpu"):
        transfer_cli.load_run(trained[1], device="gpu")
    run = transfer_cli.load_run(trained[1])
    with pytest.raises(TransferError, match="does not exist"):
        run.predict([tmp_path / "missing.png"])
    with pytest.raises(TransferError, match="top_k=0"):
        run.predict([tmp_path], top_k=0)
    with pytest.raises(TransferError, match="single held-out split"):
        run.evaluate(split="test")


class Enough(Exception):
    """A user's callback deciding the run has gone far enough."""


def test_callbacks_see_each_epoch_and_one_that_raises_stops_the_run_resumably(tmp_path: Path,
                                                                            hydra_in_process: None) -> None:
    class Seen(transfer_cli.Callback):
        def __init__(self) -> None:
            self.started: list[int] = []
            self.ended: list[dict[str, Any]] = []

        def on_epoch_start(self, stage: Any, epoch: int) -> None:
            self.started.append(epoch)

        def on_epoch_end(self, record: dict[str, Any]) -> None:
            self.ended.append(record)

    seen = Seen()
    summary = transfer_cli.train(TINY, run_dir=tmp_path / "run", callbacks=[seen])
    logged = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert seen.started == [1, 2] and seen.ended == logged

    class StopAfterOne(transfer_cli.Callback):
        def on_epoch_end(self, record: dict[str, Any]) -> None:
            raise Enough(f"enough after epoch {record['epoch']}")

    stopped = tmp_path / "stopped"
    with pytest.raises(Enough, match="enough after epoch 1") as raised:
        transfer_cli.train(TINY, run_dir=stopped, callbacks=[StopAfterOne()])
    assert "transfer resume" in raised.value.__notes__[0]
    assert (stopped / "checkpoints" / "last.pt").is_file() and not (stopped / "summary.json").exists()
    assert transfer_main(["resume", str(stopped)]) == 0
    assert json.loads((stopped / "summary.json").read_text())["epochs_run"] == 2
