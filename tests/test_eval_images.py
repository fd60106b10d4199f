"""What `transfer eval` says about single images: predictions.csv, balanced accuracy, the top-losses galleries,
Grad-CAM and test-time augmentation, each checked against an independent recomputation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from transfer_cli.cli import main as transfer_main
from transfer_cli.data.synthetic import SyntheticImages
from transfer_cli.data.transforms import Preprocessing, eval_transform
from transfer_cli.inference.cam import NOT_SPATIAL, CamUnavailable, grad_cam
from transfer_cli.inference.evaluate import evaluate_run
from transfer_cli.inference.gallery import top_losses
from transfer_cli.inference.load import load_trained_model, preprocessing_of
from transfer_cli.inference.predictions import score_split, scores_of, write_predictions
from transfer_cli.inference.tta import five_crop_transform, tta_scores
from transfer_cli.models.runtime import Precision

from conftest import compose_train
from helpers import build, one_error_line, snapshot_params, timm_backbone, tiny_resnet, trained_in_process, tv_backbone


TINY = ["experiment=smoke", "dataset.select_fraction=0",
        "dataset.train_size=32", "dataset.val_size=32", "trainer.epochs=3"]  # 3: one per stage
CPU = Precision(torch.device("cpu"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_in_process(tmp_path_factory.mktemp("eval-images") / "run", compose_train(TINY))


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def from_rows(rows: list[dict[str, str]], classes: list[str]) -> dict:
    """top-1, per-class recall, balanced accuracy, confusion matrix and mean loss, recomputed from the CSV alone."""
    matrix = [[0] * len(classes) for _ in classes]
    for row in rows:
        matrix[classes.index(row["true"])][classes.index(row["predicted"])] += 1
    recall = {name: matrix[i][i] / sum(matrix[i]) for i, name in enumerate(classes) if sum(matrix[i])}
    return {"acc1": sum(row["true"] == row["predicted"] for row in rows) / len(rows), "recall": recall,
            "balanced": sum(recall.values()) / len(recall), "matrix": matrix,
            "loss": sum(float(row["loss"]) for row in rows) / len(rows)}


def the_runs_val_images(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's val split as its eval transform makes it, built here from the generator and the run's config."""
    cfg, model, _ = load_trained_model(run)
    dataset = cfg.dataset
    val = SyntheticImages(dataset.num_classes, dataset.val_size, dataset.image_size, dataset.split_seed + 1)
    transform = eval_transform(preprocessing_of(cfg, model))
    return torch.stack([transform(val[i][0]) for i in range(len(val))]), torch.tensor(val.targets)


# --------------------------------------------------------------------------- predictions.csv, balanced accuracy


def test_predictions_csv_agrees_with_metrics_and_with_the_model(run: Path) -> None:
    metrics, out = evaluate_run(run, ["checkpoint=last"])
    rows, classes = read_rows(out), json.loads((out / "confusion_matrix.json").read_text())["classes"]
    recomputed = from_rows(rows, classes)
    assert recomputed["acc1"] == metrics["acc1"]
    assert recomputed["recall"] == {name: row["accuracy"] for name, row in metrics["per_class"].items()}
    assert recomputed["balanced"] == metrics["balanced_accuracy"]
    assert recomputed["matrix"] == json.loads((out / "confusion_matrix.json").read_text())["matrix"]
    assert recomputed["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    # one row per image in split order, each the model's own softmax for that image
    images, labels = the_runs_val_images(run)
    _, model, _ = load_trained_model(run, "last")
    with torch.no_grad():
        expected = model.model(images).softmax(dim=1)
    assert [row["path"] for row in rows] == [str(i) for i in range(32)]
    assert [row["true"] for row in rows] == [classes[label] for label in labels]
    got = torch.tensor([[float(row[f"prob_{name}"]) for name in classes] for row in rows])
    assert torch.allclose(got, expected, atol=1e-6)
    for row, probabilities in zip(rows, got):
        assert row["predicted"] == classes[int(probabilities.argmax())]
        assert float(row["loss"]) == pytest.approx(-math.log(float(row[f"prob_{row['true']}"])), rel=1e-5)


def write_imbalanced_folder(root: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(1)
    for name, count in counts.items():
        (root / "val" / name).mkdir(parents=True)
        (root / "train" / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / name / f"{i}.png")
        Image.fromarray(pixels).save(root / "train" / name / "0.png")


def test_balanced_accuracy_on_an_imbalanced_folder_names_files_relative_to_the_root(run: Path,
                                                                                    tmp_path: Path) -> None:
    counts = {"class_0": 2, "class_1": 3, "class_2": 14, "class_3": 1}
    write_imbalanced_folder(tmp_path / "data", counts)
    metrics, out = evaluate_run(run, ["dataset.name=folder", f"dataset.root={tmp_path / 'data'}", "top_losses=4"])
    rows = read_rows(out)
    assert sorted(row["path"] for row in rows) == sorted(f"val/{name}/{i}.png" for name, n in counts.items()
                                                          for i in range(n))
    assert all(row["path"].split("/")[1] == row["true"] for row in rows)  # each row labelled by its own folder
    recalls = []  # scikit-learn's balanced_accuracy_score: the mean recall over the classes with images
    for name in counts:
        mine = [row for row in rows if row["path"].split("/")[1] == name]
        recalls.append(sum(row["predicted"] == name for row in mine) / len(mine))
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-12)
    top1 = sum(row["predicted"] == row["path"].split("/")[1] for row in rows) / len(rows)
    assert metrics["acc1"] == top1 and metrics["balanced_accuracy"] != top1  # imbalance tells them apart
    assert len(metrics["top_losses"]) == 4 and all(path.startswith("val/") for path in metrics["top_losses"])
    with Image.open(out / "top_losses.png") as png:
        png.verify()


def test_class_names_with_commas_quotes_and_line_breaks_survive_the_csv(tmp_path: Path) -> None:
    classes = ['a, "quoted" one', "plain", "two\nlines", "=1+2"]
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 3])
    write_predictions(tmp_path / "predictions.csv", scores_of(logits, labels), classes, ["x,1.png", "y.png", "z"])
    rows = read_rows(tmp_path)
    assert list(rows[0]) == ["path", "true", "predicted", *(f"prob_{name}" for name in classes), "loss"]
    assert [(row["path"], row["true"], row["predicted"]) for row in rows] == [
        ("x,1.png", classes[0], classes[0]), ("y.png", "plain", "two\nlines"), ("z", "'=1+2", "'=1+2")]
    assert float(rows[1]["loss"]) == pytest.approx(-math.log(float(rows[1]["prob_plain"])))


# --------------------------------------------------------------------------- the top-losses gallery


def test_top_losses_are_the_highest_losses_highest_first_ties_in_split_order() -> None:
    losses = [0.5, 2.0, 0.1, 2.0, 3.0, 0.5]
    assert top_losses(losses, 3) == [4, 1, 3]
    assert top_losses(losses, 5) == [4, 1, 3, 0, 5]
    assert top_losses(losses, 100) == [4, 1, 3, 0, 5, 2]
    assert top_losses(losses, 0) == []


def test_the_gallery_shows_the_highest_loss_rows_and_an_eval_without_one_leaves_none(run: Path) -> None:
    metrics, out = evaluate_run(run, ["top_losses=5", "transforms.image_size=64"])
    rows = read_rows(out)
    by_loss = sorted(rows, key=lambda row: -float(row["loss"]))  # stable: equal losses in split order
    assert metrics["top_losses"] == [row["path"] for row in by_loss[:5]]
    for name in ("top_losses.png", "top_losses_cam.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.size[0] > 100
            png.verify()
    assert metrics["grad_cam"] == {"file": "top_losses_cam.png", "reason": None}
    metrics, out = evaluate_run(run, ["top_losses=0"])
    assert metrics["top_losses"] == [] and not (out / "top_losses.png").exists()
    assert not (out / "top_losses_cam.png").exists()


def test_more_images_asked_than_the_split_holds_shows_them_all(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics, out = evaluate_run(run, ["top_losses=200"])
    assert sorted(metrics["top_losses"], key=int) == [str(i) for i in range(32)]
    # 32 px: the tiny ResNet's last feature map is 1 x 1, which localises nothing
    assert metrics["grad_cam"]["file"] is None and "1 x 1" in metrics["grad_cam"]["reason"]
    assert capsys.readouterr().err.count("Grad-CAM: not available for test_resnet") == 1
    assert not (out / "top_losses_cam.png").exists()


# --------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_is_a_non_negative_map_of_the_feature_maps_shape_and_changes_nothing() -> None:
    model = tiny_resnet(num_classes=3).model
    model.train()
    model.layer1.eval()  # a mixed state, which must come back as it was
    modes = {name: module.training for name, module in model.named_modules()}
    before = snapshot_params(model)
    images = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        feature_shape = model.eval().forward_features(images).shape
        predicted = model(images).argmax(dim=1)
    model.train()
    model.layer1.eval()
    maps = grad_cam(model, images, predicted)
    assert maps.shape == (3, *feature_shape[2:]) and feature_shape[2:] == (4, 4)
    assert (maps >= 0).all() and (maps.flatten(1).amax(dim=1) > 0).all()
    assert {name: module.training for name, module in model.named_modules()} == modes
    after = snapshot_params(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(parameter.grad is None for parameter in model.parameters())


def test_grad_cam_weighs_the_feature_map_by_the_class_gradient() -> None:
    """A head that is linear in the pooled features: the gradient of class k is its weight row / (H*W), so the
    map is relu(sum_c W[k, c] * A_c) / (H*W), computed here by hand."""
    model = tiny_resnet(num_classes=3).model.eval()
    images = torch.randn(2, 3, 96, 96)
    classes = torch.tensor([2, 0])
    with torch.no_grad():
        features = model.forward_features(images)
    weights = model.fc.weight[classes].detach()
    expected = (torch.einsum("bc,bchw->bhw", weights, features) / features[0, 0].numel()).clamp(min=0)
    assert torch.allclose(grad_cam(model, images, classes), expected, atol=1e-6)


@pytest.mark.parametrize("backbone", [timm_backbone("test_vit", kwargs={"img_size": 32}), tv_backbone("resnet18")],
                         ids=["timm vit", "torchvision"])
def test_grad_cam_is_unavailable_without_a_spatial_feature_map(backbone) -> None:
    model = build(backbone, num_classes=3).model
    with pytest.raises(CamUnavailable, match=NOT_SPATIAL):
        grad_cam(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


@pytest.mark.slow
def test_eval_of_a_vit_run_says_grad_cam_is_unavailable_once_and_exits_0(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_train([*TINY, "backbone.name=test_vit", "+backbone.kwargs.img_size=32", "strategy=fine_tune",
                         "trainer.epochs=1"])
    vit = trained_in_process(tmp_path / "vit", cfg)
    capsys.readouterr()
    assert transfer_main(["eval", str(vit)]) == 0
    err = capsys.readouterr().err
    line = "Grad-CAM: not available for test_vit: its last features are not a spatial map"
    assert err.count(line) == 1, err
    out = vit / "eval" / "val" / "best"
    assert (out / "top_losses.png").is_file() and not (out / "top_losses_cam.png").exists()
    recorded = json.loads((out / "metrics.json").read_text())["grad_cam"]
    assert recorded == {"file": None, "reason": "not available for test_vit: its last features are not a spatial map"}


# --------------------------------------------------------------------------- test-time augmentation


class Halves(nn.Module):
    """Logits from the mean of the left and of the right half of each channel: a mirror image swaps them."""

    def __init__(self, symmetric: bool) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.mix = nn.Linear(6, 4)
        torch.nn.init.normal_(self.mix.weight, std=3.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.symmetric:  # exactly flip-invariant: x + mirror(x) is the same sum, bit for bit, for a mirror image
            images = images + images.flip(-1)
        left, right = images.chunk(2, dim=-1)
        return self.mix(torch.cat([left.mean(dim=(2, 3)), right.mean(dim=(2, 3))], dim=1))


def halves_data() -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(24, 3, 8, 8), torch.arange(24) % 4), batch_size=5)


def test_flip_tta_of_a_flip_invariant_model_is_the_plain_score() -> None:
    torch.manual_seed(1)
    model, loader = Halves(symmetric=True), halves_data()
    plain, flipped = score_split(model, loader, CPU), tta_scores(model, loader, CPU, "flip")
    assert torch.allclose(flipped.probabilities, plain.probabilities, atol=1e-6)
    assert torch.equal(flipped.predicted, plain.predicted)
    assert flipped.counts.confusion == plain.counts.confusion
    assert flipped.counts.loss_sum == pytest.approx(plain.counts.loss_sum, rel=1e-5)


def test_flip_tta_averages_the_softmax_of_the_image_and_its_mirror() -> None:
    torch.manual_seed(1)
    model, loader = Halves(symmetric=False), halves_data()
    images, labels = loader.dataset.tensors
    with torch.no_grad():
        expected = (model(images).softmax(dim=1) + model(images.flip(-1)).softmax(dim=1)) / 2
    flipped, plain = tta_scores(model, loader, CPU, "flip"), score_split(model, loader, CPU)
    assert torch.allclose(flipped.probabilities, expected, atol=1e-6)
    assert not torch.allclose(flipped.probabilities, plain.probabilities, atol=1e-3)
    loss = -expected[torch.arange(24), labels].log().double().sum()
    assert flipped.counts.loss_sum == pytest.approx(float(loss), rel=1e-5)


def test_five_crop_sees_the_four_corners_and_the_centre_at_the_input_size() -> None:
    pre = Preprocessing(image_size=24, crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    ys, xs = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    image = torch.stack([ys * 6, xs * 6, (ys + xs) * 3]).to(torch.uint8)  # every pixel differs
    crops = five_crop_transform(pre)(image)
    assert crops.shape == (5, 3, 24, 24)
    # crop_pct 1.0 leaves no margin: five_crop resizes to 24 / 0.875 = 27 px, and crops 24 px from it
    resized = v2.functional.resize(image, [27], antialias=True)
    wanted = [resized[:, :24, :24], resized[:, :24, 3:], resized[:, 3:, :24], resized[:, 3:, 3:],
              resized[:, 2:26, 2:26]]  # torchvision's order: top-left, top-right, bottom-left, bottom-right, centre
    for crop, expected in zip(crops, wanted):
        assert torch.allclose(crop, (expected / 255 - 0.5) / 0.25, atol=1e-6)
    assert len({crop.numpy().tobytes() for crop in crops}) == 5


def test_eval_with_flip_tta_reports_both_and_recomputes_independently(run: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert transfer_main(["eval", str(run), "tta=flip"]) == 0
    printed = capsys.readouterr().out.splitlines()
    metrics = json.loads((run / "eval" / "val" / "best" / "metrics.json").read_text())
    tta = metrics["tta"]
    assert set(tta) == {"name", "acc1", "balanced_accuracy", "macro_f1", "loss"} and tta["name"] == "flip"
    assert printed[0].endswith(f"top-1 {metrics['acc1']:.4f}  balanced {metrics['balanced_accuracy']:.4f}  "
                               f"macro-F1 {metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}")
    assert printed[1].strip() == (f"tta=flip: top-1 {tta['acc1']:.4f}  balanced {tta['balanced_accuracy']:.4f}  "
                                  f"macro-F1 {tta['macro_f1']:.4f}  loss {tta['loss']:.4f}")
    images, labels = the_runs_val_images(run)
    _, model, _ = load_trained_model(run)
    with torch.no_grad():
        averaged = (model.model(images).softmax(dim=1) + model.model(images.flip(-1)).softmax(dim=1)) / 2
    assert tta["acc1"] == float((averaged.argmax(dim=1) == labels).float().mean())
    assert tta["loss"] == pytest.approx(float(-averaged[torch.arange(32), labels].log().mean()), rel=1e-5)


def test_eval_with_five_crop_tta_recomputes_independently(run: Path) -> None:
    """The run's 32 px images, crop_pct 1.0: five_crop resizes them to 32 / 0.875 = 36 px and averages the softmax
    of the four 32 px corners and the centre, cut here by hand."""
    metrics, _ = evaluate_run(run, ["tta=five_crop", "top_losses=0"])
    cfg, model, _ = load_trained_model(run)
    pre = preprocessing_of(cfg, model)
    val = SyntheticImages(cfg.dataset.num_classes, cfg.dataset.val_size, 32, cfg.dataset.split_seed + 1)
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    crops = []
    for index in range(len(val)):
        resized = v2.functional.resize(val[index][0], [36], v2.InterpolationMode(pre.interpolation), antialias=True)
        crops += [resized[:, top:top + 32, left:left + 32] for top, left in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2))]
    with torch.no_grad():
        probabilities = model.model((torch.stack(crops).float() / 255 - mean) / std).softmax(dim=1)
    averaged, labels = probabilities.view(len(val), 5, -1).mean(dim=1), torch.tensor(val.targets)
    assert metrics["tta"]["name"] == "five_crop"
    assert metrics["tta"]["acc1"] == float((averaged.argmax(dim=1) == labels).float().mean())
    expected_loss = float(-averaged[torch.arange(len(val)), labels].log().mean())
    assert metrics["tta"]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["tta"]["loss"] != pytest.approx(metrics["loss"], rel=1e-5)  # other views than the plain one


@pytest.mark.parametrize(("argument", "names"), [
    ("tta=mirror", ["tta=mirror", "none, flip, five_crop"]),
    ("top_losses=many", ["top_losses=many", "0 to 256"]),
    ("top_losses=-1", ["top_losses=-1"]),
    ("top_losses=1000", ["top_losses=1000", "0 to 256"]),
])
def test_bad_eval_options_are_one_line_errors(run: Path, capsys: pytest.CaptureFixture[str], argument: str,
                                              names: list[str]) -> None:
    capsys.readouterr()
    code = transfer_main(["eval", str(run), argument])
    one_error_line(code, capsys.readouterr().err, *names)
