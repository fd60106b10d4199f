"""`transfer eval` and `transfer predict` on a tiny run trained once for the whole module."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from transfer_cli.cli import main as transfer_main
from transfer_cli.config.schema import TrainConfig
from transfer_cli.data.synthetic import SyntheticImages
from transfer_cli.inference.evaluate import Counts, count_predictions, evaluate_run, summarize
from transfer_cli.inference.load import load_trained_model
from transfer_cli.inference.predict import predict_images
from transfer_cli.models.runtime import Precision
from transfer_cli.runs import checkpoint, runlog
from transfer_cli.training.run import train

from conftest import REPO, compose_train


TINY = ["experiment=smoke", "dataset.train_size=64", "dataset.val_size=32", "trainer.epochs=3"]  # 3: one per stage


def train_run(run_dir: Path, overrides: list[str]) -> tuple[TrainConfig, Path]:
    """A run dir as `transfer train` leaves it (the train command writes config.yaml, train() the rest)."""
    cfg = compose_train(overrides)
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml", resolve=True)
    train(cfg, run_dir)
    return cfg, run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("eval") / "run", TINY)[1]


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory: pytest.TempPathFactory, run: Path) -> Path:
    """The run's val images as lossless PNGs in <class>/ folders: what predict sees is what eval saw."""
    cfg = compose_train(TINY)
    val = SyntheticImages(cfg.dataset.num_classes, cfg.dataset.val_size, cfg.dataset.image_size, cfg.trainer.seed + 1)
    root = tmp_path_factory.mktemp("images")
    for index in range(len(val)):
        image, label = val[index]
        (root / val.classes[label]).mkdir(exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / val.classes[label] / f"{index:03d}.png")
    return root


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("transfer: error: "), err
    return err


# --------------------------------------------------------------------------- eval


def test_eval_top1_equals_the_runs_own_val_accuracy(run: Path) -> None:
    last = runlog.read_metrics(run)[-1]
    metrics, _ = evaluate_run(run, ["checkpoint=last"])
    assert metrics["acc1"] == last["val/acc1"]
    assert metrics["loss"] == pytest.approx(last["val/loss"], rel=1e-6)
    best, _ = evaluate_run(run, [])
    assert best["checkpoint"] == "best"
    assert best["acc1"] == json.loads((run / "summary.json").read_text())["reported_val_acc"]


def test_confusion_matrix_agrees_with_per_class_accuracy_and_macro_f1(run: Path) -> None:
    metrics, out = evaluate_run(run, ["checkpoint=last"])
    saved = json.loads((out / "confusion_matrix.json").read_text())
    matrix, classes = saved["matrix"], saved["classes"]
    assert sum(map(sum, matrix)) == metrics["images"] == 32
    assert sum(matrix[i][i] for i in range(len(classes))) / 32 == metrics["acc1"]
    f1s = []
    for i, name in enumerate(classes):
        row, column = sum(matrix[i]), sum(r[i] for r in matrix)
        assert metrics["per_class"][name]["accuracy"] == matrix[i][i] / row
        precision = matrix[i][i] / column if column else 0.0
        recall = matrix[i][i] / row
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    assert metrics["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert json.loads((out / "metrics.json").read_text())["macro_f1"] == metrics["macro_f1"]


def test_eval_writes_its_files_atomically_and_prints_a_table(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert transfer_main(["eval", str(run), "trainer.device=cpu", "trainer.eval_batch_size=7"]) == 0
    out = run / "eval" / "val" / "best"
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.json", "confusion_matrix.png", "metrics.json",
                                                     "predictions.csv", "top_losses.png"]  # 32 px: a 1 x 1 map, no CAM
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "metrics.json").read_text())["overrides"] == [
        "trainer.device=cpu", "trainer.eval_batch_size=7"]
    printed = capsys.readouterr().out
    assert "top-1" in printed and "macro-F1" in printed and "class_3" in printed


def test_top5_and_metrics_from_known_logits() -> None:
    """Six classes, hand-chosen logits: top-1, top-5, confusion matrix and F1 by hand."""
    logits = torch.eye(6)[[0, 0, 1, 2, 5, 5, 0]] * 10 - torch.arange(6.0) * 0.1  # top-1: 0 0 1 2 5 5 0
    labels = torch.tensor([0, 1, 1, 2, 5, 0, 5])
    loader = DataLoader(TensorDataset(logits, labels), batch_size=4)
    counts = count_predictions(torch.nn.Identity(), loader, Precision(torch.device("cpu")), 6)
    assert counts.confusion[0] == [1, 0, 0, 0, 0, 1] and counts.confusion[5] == [1, 0, 0, 0, 0, 1]
    metrics = summarize(counts, [f"c{i}" for i in range(6)])
    assert metrics["acc1"] == 4 / 7
    # after the peak, the -0.1 * class tiebreak ranks 0, 1, 2, 3, 4: only label 5 under a peak at 0 misses
    assert metrics["acc5"] == 6 / 7
    # F1 = 2 tp / (support + predicted): c0 2/(2+3), c1 2/(2+1), c2 1, c5 2/(2+2); c3, c4 never occur
    assert metrics["macro_f1"] == pytest.approx((2 / 5 + 2 / 3 + 1 + 1 / 2) / 4)
    assert metrics["per_class"]["c3"] == {"support": 0, "accuracy": None, "precision": None, "f1": None}


def test_summarize_refuses_an_empty_split() -> None:
    from transfer_cli.core.errors import TransferError

    with pytest.raises(TransferError, match="no images"):
        summarize(Counts([[0, 0], [0, 0]], {1: 0}, 0.0), ["a", "b"])


def test_ema_runs_are_evaluated_with_the_averaged_weights(tmp_path: Path) -> None:
    _, run_dir = train_run(tmp_path / "ema", [*TINY, "trainer.ema_decay=0.5"])
    metrics, _ = evaluate_run(run_dir, ["checkpoint=last"])
    assert metrics["acc1"] == runlog.read_metrics(run_dir)[-1]["val/acc1"]


def test_a_moved_starting_checkpoint_does_not_matter(run: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    config = OmegaConf.load(copy / "config.yaml")
    config.backbone.checkpoint = str(tmp_path / "gone.pth")
    OmegaConf.save(config, copy / "config.yaml")
    _, model, classes = load_trained_model(copy, "last")
    assert classes == ["class_0", "class_1", "class_2", "class_3"] and not model.model.training


def foreign_checkpoint_run(run: Path, tmp_path: Path) -> Path:
    """A copy of `run` whose best.pt holds a 3-class head: saved by some other run."""
    copy = Path(shutil.copytree(run, tmp_path / "foreign"))
    _, model, _ = load_trained_model(run, "best")
    payload = checkpoint.load(run / "checkpoints" / "best.pt")
    state = model.model.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(3, state["fc.weight"].shape[1]), torch.zeros(3)
    checkpoint.save_atomic({**payload, "model": state, "ema": None}, copy / "checkpoints" / "best.pt")
    return copy


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{run}", "checkpoint=middle"], "use best or last"),
        (["{run}", "dataset.val_splt=test"], "dataset.val_splt"),
        (["{run}", "trainer.eval_batch_size=many"], "trainer.eval_batch_size"),
        (["{run}", "backbone.name=resnet18"], "the model comes from the run"),
        (["{run}", "dataset.val_split=test"], "dataset=synthetic has a single held-out split"),
        (["{run}", "trainer.device"], "not a key=value override"),
        (["{run}", "--bogus"], "unrecognized arguments"),
        (["{foreign}"], "does not fit this run's model (test_resnet, 4 classes): 2 tensor(s) differ in shape"),
    ],
)
def test_eval_mistakes_are_one_line_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           args: list[str], message: str) -> None:
    places = {"run": run, "missing": tmp_path / "nope"}
    if "{foreign}" in args:
        places["foreign"] = foreign_checkpoint_run(run, tmp_path)
    assert transfer_main(["eval", *(arg.format(**places) for arg in args)]) == 2
    assert message in one_line_error(capsys)


# --------------------------------------------------------------------------- predict


def test_predict_agrees_with_eval_and_gives_sorted_probabilities(run: Path, val_folder: Path) -> None:
    predictions = predict_images(run, [val_folder], top_k=10)
    assert len(predictions) == 32
    for prediction in predictions:
        probabilities = [p for _, p in prediction.top]
        assert len(probabilities) == 4  # top-k stops at the class count
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    right = sum(Path(p.path).parent.name == p.top[0][0] for p in predictions)
    assert right / 32 == evaluate_run(run, [])[0]["acc1"]


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_predict_writes_csv_or_json(run: Path, val_folder: Path, tmp_path: Path, suffix: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / f"predictions{suffix}"
    first = val_folder / "class_0" / "000.png"
    assert transfer_main(["predict", str(run), str(val_folder / "class_1"), str(first), "--top-k", "2",
                          "--out", str(out)]) == 0
    if suffix == ".csv":
        rows = list(csv.DictReader(out.open()))
        assert list(rows[0]) == ["path", "class_1", "probability_1", "class_2", "probability_2"]
        paths, top = [row["path"] for row in rows], [float(rows[0]["probability_1"]), float(rows[0]["probability_2"])]
    else:
        rows = json.loads(out.read_text())
        paths, top = [row["path"] for row in rows], [entry["probability"] for entry in rows[0]["top"]]
    assert len(paths) == 9 and paths[-1] == str(first) and top[0] >= top[1]
    assert not list(out.parent.glob(".*.tmp"))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["image", "top-1", "top-2"] and len(printed) == 10


def test_predict_skips_unreadable_images_with_a_warning(run: Path, tmp_path: Path, val_folder: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = Path(shutil.copytree(val_folder / "class_2", tmp_path / "mixed"))
    (folder / "broken.png").write_bytes(b"not a png")
    assert transfer_main(["predict", str(run), str(folder)]) == 0
    captured = capsys.readouterr()
    assert "skipping unreadable image" in captured.err and "broken.png" in captured.err
    assert len(captured.out.splitlines()) == 9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "{images}"], "does not exist"),
        (["{run}", "{images}", "--out", "{tmp}/p.txt"], "must end in .csv or .json"),
        (["{run}", "{tmp}/empty"], "no images"),
        (["{run}", "{tmp}/nothing_here.png"], "does not exist"),
        (["{run}", "{tmp}/notes.txt"], "is not an image file"),
        (["{run}", "{images}", "--top-k", "0"], "at least 1"),
        (["{run}", "{images}", "--checkpoint", "middle"], "invalid choice"),
        (["{run}"], "required: PATH"),
    ],
)
def test_predict_mistakes_are_one_line_errors(run: Path, val_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], args: list[str],
                                              message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    places = {"run": run, "missing": tmp_path / "nope", "images": val_folder, "tmp": tmp_path}
    assert transfer_main(["predict", *(arg.format(**places) for arg in args)]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "p.txt").exists()


# --------------------------------------------------------------------------- the installed command


def transfer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transfer_cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_eval_and_predict() -> None:
    from transfer_cli.cli import USAGE

    assert "\n  eval " in USAGE and "\n  predict " in USAGE


@pytest.mark.slow
def test_eval_command(run: Path) -> None:
    result = transfer("eval", str(run), "checkpoint=last")
    assert result.returncode == 0, result.stderr
    assert f"top-1 {runlog.read_metrics(run)[-1]['val/acc1']:.4f}" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_predict_command(run: Path, val_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.json"
    result = transfer("predict", str(run), str(val_folder), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert len(json.loads(out.read_text())) == 32 and len(result.stdout.splitlines()) == 33


@pytest.mark.parametrize(("classes", "top5"), [(5, False), (6, True)])
def test_top5_is_reported_only_with_more_than_5_classes_and_best_and_last_keep_their_own_eval(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], classes: int, top5: bool) -> None:
    """With 5 classes or fewer top-5 is always 1.0: no column says nothing. `transfer eval` of best.pt and of
    last.pt write apart, so the second never overwrites the first."""
    run = tmp_path / "run"
    assert transfer_main(["train", "experiment=smoke", "strategy=feature_extract", f"dataset.num_classes={classes}",
                          "dataset.train_size=40", "dataset.val_size=20", "trainer.epochs=2",
                          f"hydra.run.dir={run}"]) == 0
    records = runlog.read_metrics(run)
    assert all(("val/acc5" in record) == top5 for record in records)
    assert transfer_main(["eval", str(run)]) == 0 and transfer_main(["eval", str(run), "checkpoint=last"]) == 0
    best = json.loads((run / "eval" / "val" / "best" / "metrics.json").read_text())
    last = json.loads((run / "eval" / "val" / "last" / "metrics.json").read_text())
    assert (best["checkpoint"], last["checkpoint"]) == ("best", "last") and ("acc5" in best) == top5
    assert last["acc1"] == records[-1]["val/acc1"]
    assert ("top-5" in capsys.readouterr().out) == top5
