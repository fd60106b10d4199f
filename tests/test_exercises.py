"""The lesson's five exercises: their configs hold the lesson's numbers, the Makefile targets run
end to end (tiny random-init models on synthetic data or a generated folder), and exercise 5
reports the top-1 a hand-written evaluation gets.

The quick mode on the real assets runs only where TRANSFER_TEST_ASSETS is set.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from transfer_cli.config.schema import BackboneConfig, HeadConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.lesson.exercise5 import sample_indices
from transfer_cli.lesson.imagenet_classes import imagenet_index
from transfer_cli.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from transfer_cli.models.model import build_model
from transfer_cli.training.stages import plan_stages

from conftest import REPO, compose_train


EXPERIMENTS = REPO / "conf" / "experiment"
LESSON_DISCRIMINATIVE = {"layer1": 1e-5, "layer2": 3e-5, "layer3": 1e-4, "layer4": 3e-4, "head": 1e-3}
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

# Every exercise shrunk to seconds: a random-init timm ResNet at 32 px on a few synthetic images.
TINY = ["dataset=synthetic", "backbone=timm", "backbone.name=test_resnet", "backbone.pretrained=false", "augment=none",
        "dataset.train_subset=null", "dataset.val_subset=null", "dataset.train_size=32", "dataset.val_size=16",
        "dataset.image_size=32", "transforms.image_size=32", "transforms.crop_pct=1.0",
        "trainer.batch_size=16", "trainer.num_workers=0", "trainer.device=cpu", "trainer.epochs=1"]


@pytest.fixture(scope="module")
def resnet18():
    """torchvision ResNet-18, random init (the exercises' backbone, no download)."""
    return build_model(BackboneConfig(source="torchvision", name="resnet18", weights=None, pretrained=False),
                       HeadConfig(), 10, pretrained=False)


@pytest.fixture(scope="module")
def lite0():
    """timm EfficientNet-Lite0, random init (the quick mode's backbone, no download)."""
    return build_model(BackboneConfig(source="timm", name="tf_efficientnet_lite0.in1k", pretrained=False),
                       HeadConfig(), 2, pretrained=False)


def sweep_params(experiment: str) -> dict[str, str]:
    config = OmegaConf.load(EXPERIMENTS / f"{experiment}.yaml")
    return dict(OmegaConf.select(config, "hydra.sweeper.params", default={}) or {})


def stages_of(overrides: list[str], model) -> list[tuple[str, int, dict[str, float]]]:
    cfg = compose_train(overrides)
    return [(s.name, s.epochs, s.lrs)
            for s in plan_stages(cfg.strategy, model, cfg.trainer.epochs, cfg.optimizer.lr_scale)]


# --------------------------------------------------------------------------- the lesson's numbers


def test_exercise1_feature_extraction_vs_fine_tuning_on_500_flowers(resnet18) -> None:
    assert sweep_params("exercise1") == {"strategy": "feature_extract,fine_tune_low_lr"}
    runs = {}
    for strategy in ("feature_extract", "fine_tune_low_lr"):
        cfg = compose_train(["experiment=exercise1", f"strategy={strategy}"])
        assert (cfg.backbone.source, cfg.backbone.name, cfg.backbone.weights) == (
            "torchvision", "resnet18", "IMAGENET1K_V1")
        assert (cfg.dataset.name, cfg.dataset.train_subset, cfg.strategy.pretrained) == ("flowers102", 500, True)
        runs[strategy] = stages_of(["experiment=exercise1", f"strategy={strategy}"], resnet18)
    assert runs["feature_extract"] == [("head", 10, {"head": 1e-3})]
    assert runs["fine_tune_low_lr"] == [
        ("all", 10, {g: 1e-5 for g in ("stem", "layer1", "layer2", "layer3", "layer4", "head")})]


def test_exercise2_gradual_unfreezing_5_5_10(resnet18) -> None:
    cfg = compose_train(["experiment=exercise2"])
    assert (cfg.backbone.name, cfg.backbone.weights, cfg.dataset.name) == ("resnet18", "IMAGENET1K_V1", "flowers102")
    assert stages_of(["experiment=exercise2"], resnet18) == [
        ("head", 5, {"head": 1e-3}),
        ("last_block", 5, {"layer4": 1e-4, "head": 1e-4}),
        ("all", 10, {g: 1e-5 for g in ("stem", "layer1", "layer2", "layer3", "layer4", "head")}),
    ]


def test_exercise3_discriminative_lrs_vs_uniform_on_2000_cifar10(resnet18) -> None:
    for experiment in ("exercise3", "exercise3_uniform"):
        cfg = compose_train([f"experiment={experiment}"])
        assert (cfg.backbone.name, cfg.dataset.name, cfg.dataset.train_subset, cfg.trainer.epochs) == (
            "resnet18", "cifar10", 2000, 15)
    assert stages_of(["experiment=exercise3"], resnet18) == [("all", 15, LESSON_DISCRIMINATIVE)]
    assert stages_of(["experiment=exercise3_uniform"], resnet18) == [
        ("all", 15, dict.fromkeys(LESSON_DISCRIMINATIVE, 1e-4))]


@pytest.mark.slow
def test_exercise3_on_lite0_maps_the_lesson_rates_onto_its_blocks(lite0) -> None:
    rates = {"blocks.1": 1e-5, "blocks.2": 3e-5, "blocks.3": 1e-4, "blocks.4": 1e-4, "blocks.5": 3e-4, "blocks.6": 3e-4,
             "head": 1e-3}
    assert compose_train(["experiment=exercise3_lite0"]).backbone.name == "tf_efficientnet_lite0.in1k"
    assert stages_of(["experiment=exercise3_lite0"], lite0) == [("all", 15, rates)]
    assert stages_of(["experiment=exercise3_lite0_uniform"], lite0) == [("all", 15, dict.fromkeys(rates, 1e-4))]


def test_exercise4_three_strategies_on_a_near_and_a_far_dataset(resnet18) -> None:
    assert sweep_params("exercise4") == {"strategy": "scratch,feature_extract,fine_tune"}
    for dataset in ("cifar10", "dtd"):
        for strategy in ("scratch", "feature_extract", "fine_tune"):
            cfg = compose_train(["experiment=exercise4", f"dataset={dataset}", f"strategy={strategy}"])
            assert (cfg.backbone.name, cfg.dataset.name, cfg.dataset.train_subset, cfg.trainer.epochs) == (
                "resnet18", dataset, 1880, 10)
            assert cfg.strategy.pretrained == (strategy != "scratch")
    assert stages_of(["experiment=exercise4", "strategy=feature_extract"], resnet18) == [("head", 10, {"head": 1e-3})]


def test_exercise5_efficientnet_b0_on_100_imagenette_images() -> None:
    cfg = compose_train(["experiment=exercise5"])
    assert (cfg.backbone.source, cfg.backbone.name, cfg.backbone.weights) == (
        "torchvision", "efficientnet_b0", "IMAGENET1K_V1")
    assert (cfg.dataset.name, cfg.dataset.val_subset) == ("imagenette", 100)


# --------------------------------------------------------------------------- the Makefile


def make_commands(target: str, *variables: str) -> list[list[str]]:
    """The `transfer` command lines `make TARGET` would run, as argument lists (env assignments dropped)."""
    result = subprocess.run(["make", "-n", "-s", target, "EXERCISES=/tmp/ex", *variables], cwd=REPO,
                            capture_output=True, text=True, check=True)
    text = result.stdout.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in line.replace("&&", ";").split(";"):
            words = shlex.split(part)
            words = words[next((i for i, w in enumerate(words) if w.endswith("/transfer")), len(words)):]
            if words:
                commands.append(words[1:])
    return commands


def composed_sweep_params(overrides: list[str]) -> dict[str, str]:
    """`hydra.sweeper.params` as Hydra merges them for a command line (an experiment's, a quick config's)."""
    from hydra import compose, initialize_config_dir

    from transfer_cli.config.compose import register_configs
    from transfer_cli.config.loading import config_dir

    first = [o.split(",")[0] if "," in o and "={" not in o else o for o in overrides if not o.startswith("hydra.")]
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        config = compose("train", overrides=first, return_hydra_config=True)
    return {str(k): str(v) for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()}


def expand(overrides: list[str], experiment_sweep: dict[str, str]) -> list[list[str]]:
    """Hydra's basic sweep: comma-separated choices (and the experiment's own sweeper params) as jobs."""
    fixed = [o for o in overrides if not o.startswith("hydra.") and not ("," in o and "={" not in o)]
    swept = [[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")]
             for o in overrides if "," in o and "={" not in o and not o.startswith("hydra.")]
    swept_keys = {choices[0].split("=")[0] for choices in swept}
    swept += [[f"{k}={v}" for v in values.split(",")] for k, values in experiment_sweep.items() if k not in swept_keys]
    return [[*fixed, *combination] for combination in itertools.product(*swept)]


@needs_make
@pytest.mark.parametrize("quick", [False, True], ids=["real", "quick"])
@pytest.mark.slow
def test_make_targets_run_what_the_lesson_asks(quick: bool, resnet18, lite0, monkeypatch: pytest.MonkeyPatch) -> None:
    variables = ["QUICK=1", "ASSETS=/assets"] if quick else []  # without ASSETS the target fetches them first
    monkeypatch.setenv("TRANSFER_ASSETS", "/assets")  # what the target sets for its commands
    model = lite0 if quick else resnet18
    jobs: dict[int, list[tuple[str, str, int, int | None, int]]] = {}
    for number in range(1, 5):
        commands = make_commands(f"exercise{number}", *variables)
        trains = [c for c in commands if c[:2] == ["train", "-m"]]
        assert [c[0] for c in commands][-1] == "report"
        assert commands[-1][1:] == [f"/tmp/ex/ex{number}/runs", "--out", f"/tmp/ex/ex{number}"]
        jobs[number] = []
        for train in trains:
            for overrides in expand(train[2:], composed_sweep_params(train[2:])):
                cfg = compose_train(overrides)
                stages = plan_stages(cfg.strategy, model, cfg.trainer.epochs, cfg.optimizer.lr_scale)
                data = Path(cfg.dataset.root).name if cfg.dataset.name == "folder" else cfg.dataset.name
                jobs[number].append((cfg.strategy.name, data, sum(s.epochs for s in stages),
                                     cfg.dataset.train_subset, cfg.trainer.seed))
                assert cfg.backbone.name == ("tf_efficientnet_lite0.in1k" if quick else "resnet18")
                if quick:
                    assert cfg.trainer.epochs <= 4 and cfg.dataset.train_subset in (64, 100, 105)
    seeds = [0, 1, 2] if quick else [42]  # QUICK: every row is a mean ± std over three training seeds
    for runs in jobs.values():
        by_row: dict[tuple[str, str], list[int]] = {}
        for strategy, data, _, _, seed in runs:
            by_row.setdefault((strategy, data), []).append(seed)
        assert all(sorted(found) == seeds for found in by_row.values()), by_row
    names = {number: sorted({(s, d) for s, d, *_ in runs}) for number, runs in jobs.items()}
    photos = "hymenoptera" if quick else "flowers102"
    near, far = ("hymenoptera", "eurosat5") if quick else ("cifar10", "dtd")
    assert names[1] == [("feature_extract", photos), ("fine_tune_low_lr", photos)]
    assert names[2] == [("gradual_lesson", "eurosat5" if quick else "flowers102")]
    assert names[3] == [("discriminative", "hymenoptera" if quick else "cifar10"),
                        ("uniform", "hymenoptera" if quick else "cifar10")]
    assert names[4] == sorted((s, d) for s in ("scratch", "feature_extract", "fine_tune") for d in (near, far))
    if not quick:
        assert {e for _, _, e, _, _ in jobs[1]} == {10} and {e for _, _, e, _, _ in jobs[2]} == {20}
        assert {e for _, _, e, _, _ in jobs[3]} == {15} and {e for _, _, e, _, _ in jobs[4]} == {10}
        assert {t for *_, t, _ in jobs[1]} == {500} and {t for *_, t, _ in jobs[3]} == {2000}
        assert {t for *_, t, _ in jobs[4]} == {1880}
    five = make_commands("exercise5", *variables)
    assert five[0][:4] == ["exercise", "normalization", "--out", "/tmp/ex/ex5"]
    assert ("--seeds" in five[0]) == quick and (not quick or five[0][five[0].index("--seeds") + 1] == "0,1,2")


# --------------------------------------------------------------------------- ImageNet classes


@pytest.mark.parametrize(("name", "index"), [
    ("310", 310), ("0", 0), ("n02219486", 310), ("ant", 310), ("ants", 310), ("bees", 309), ("Bee", 309),
    ("tench", 0), ("English_springer", 217), ("chain saw", 491), ("French horn", 566), ("golf-ball", 574),
])
def test_class_folders_map_to_imagenet_indices(name: str, index: int) -> None:
    assert imagenet_index(name) == index


def test_imagenette_classes_map_to_their_wordnet_ids() -> None:
    from timm.data import ImageNetInfo
    from torchvision.datasets import Imagenette

    wnids = ImageNetInfo().label_names()
    for wnid, names in Imagenette._WNID_TO_CLASS.items():
        assert imagenet_index(names[0]) == wnids.index(wnid) == imagenet_index(wnid)


@pytest.mark.parametrize("name", ["1000", "n99999999", "spaceship-cat", "crane"])
def test_unknown_or_ambiguous_class_names_are_errors(name: str) -> None:
    with pytest.raises(TransferError):
        imagenet_index(name)


def test_figure_samples_take_every_class_in_turn() -> None:
    assert sample_indices([0, 0, 0, 1, 1, 2], 4) == [0, 3, 5, 1]
    assert sample_indices([0, 1], 5) == [0, 1]


# --------------------------------------------------------------------------- end to end


def make(target: str, tmp_path: Path, args: list[str], *variables: str) -> subprocess.CompletedProcess:
    """`make TARGET` itself, in a subprocess (the shell glue included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    command = ["make", "-s", target, f"EXERCISES={tmp_path}", f"ARGS={' '.join(args)}", *variables]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.fixture
def in_process(hydra_in_process: None, tmp_path: Path):
    """Runs the `transfer` commands `make TARGET` would run, in this process (no interpreter start-up
    per command)."""
    from transfer_cli.cli import main

    def run(target: str, args: list[str], *variables: str) -> None:
        quoted = " ".join(shlex.quote(a) for a in args)
        for command in make_commands(target, f"EXERCISES={tmp_path}", f"ARGS={quoted}", *variables):
            assert main(command) == 0, f"transfer {' '.join(command)} failed"

    return run


def table_rows(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header, _, *rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]
    return [dict(zip(header, row)) for row in rows]


@needs_make
@pytest.mark.slow
@pytest.mark.parametrize(("number", "variables", "rows"), [
    (1, [], {("feature_extract",), ("fine_tune_low_lr",)}),
    (3, [], {("discriminative",), ("uniform",)}),
    (4, ["EX4_NEAR=dataset=synthetic dataset.num_classes=3", "EX4_FAR=dataset=synthetic dataset.num_classes=4"],
     {(d, s) for d in ("3", "4") for s in ("scratch", "feature_extract", "fine_tune")}),
], ids=["exercise1", "exercise3", "exercise4"])
def test_exercise_targets_write_their_table(number: int, variables: list[str], rows: set, in_process,
                                           tmp_path: Path) -> None:
    in_process(f"exercise{number}", TINY, *variables)
    out = tmp_path / f"ex{number}"
    found = table_rows(out / "results.md")
    keys = ["dataset.num_classes", "strategy.name"] if number == 4 else ["strategy.name"]
    assert {tuple(row[key] for key in keys) for row in found} == rows
    assert all(row["status"] == "finished" and row["epochs"] == "1" for row in found)
    assert (out / "results.csv").is_file() and (out / "val_acc.png").is_file()


@needs_make
@pytest.mark.slow
def test_exercise2_target_plots_val_accuracy_over_the_three_stages(tmp_path: Path) -> None:
    make("exercise2", tmp_path, [*TINY, "trainer.epochs=3"])
    out = tmp_path / "ex2"
    assert [row["epochs"] for row in table_rows(out / "results.md")] == ["3"]  # one run: no differing keys
    assert (out / "val_acc.png").is_file() and (out / "curves.png").is_file()
    summary = json.loads((out / "runs" / "0" / "summary.json").read_text())
    assert [(s["name"], s["epochs"]) for s in summary["stages"]] == [("head", 1), ("last_block", 1), ("all", 1)]
    records = [json.loads(line) for line in (out / "runs" / "0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["head", "last_block", "all"]  # two boundaries on the plots


def write_folder(root: Path, model: torch.nn.Module, count: int = 12) -> dict[str, list[np.ndarray]]:
    """Images sorted into two class folders named by ImageNet index: the two classes the model
    predicts most under ImageNet normalization, so the three normalizations score differently."""
    generator = np.random.default_rng(0)
    images = []
    for _ in range(count):
        colour = generator.uniform(0, 255, size=3)
        noise = generator.normal(0, 40, size=(32, 32, 3))
        images.append(np.clip(colour + noise, 0, 255).astype(np.uint8))
    predictions = predict(model, images, IMAGENET_MEAN, IMAGENET_STD)
    ranked = [c for c, _ in sorted(((c, predictions.count(c)) for c in set(predictions)), key=lambda x: -x[1])]
    first, second = ranked[0], ranked[1] if len(ranked) > 1 else (ranked[0] + 1) % 1000
    folders: dict[str, list[np.ndarray]] = {str(first): [], str(second): []}
    for i, (image, predicted) in enumerate(zip(images, predictions)):
        folders[str(first) if predicted == first and i < count - 2 else str(second)].append(image)
    for split in ("train", "val"):
        for name, members in folders.items():
            (root / split / name).mkdir(parents=True)
            for i, image in enumerate(members):
                Image.fromarray(image).save(root / split / name / f"{i:02d}.png")
    return folders


@torch.no_grad()
def predict(model: torch.nn.Module, images: list[np.ndarray], mean, std, among: list[int] | None = None) -> list[int]:
    """By hand: [0, 1] pixels, normalized, the 1000-way head's argmax (or argmax among `among`)."""
    batch = torch.stack([torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in images])
    batch = (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    logits = model.eval()(batch)
    if among is not None:
        return [among[i] for i in logits[:, among].argmax(dim=1).tolist()]
    return logits.argmax(dim=1).tolist()


@needs_make
@pytest.mark.slow
def test_exercise5_scores_the_imagenet_head_under_three_normalizations(in_process, tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)  # its own 1000-class head, random init
    weights = tmp_path / "test_resnet.pth"
    torch.save(model.state_dict(), weights)
    folders = write_folder(tmp_path / "imagenet_folder", model)
    args = ["backbone=timm", "backbone.name=test_resnet", f"backbone.checkpoint={weights}", "dataset=folder",
            f"dataset.root={tmp_path / 'imagenet_folder'}", "dataset.val_subset=null", "transforms.image_size=32",
            "transforms.crop_pct=1.0", "transforms.interpolation=bilinear", "trainer.num_workers=0",
            "trainer.device=cpu"]
    in_process("exercise5", args)
    out = tmp_path / "ex5"
    report = json.loads((out / "results.json").read_text())
    assert report["classes"] == sorted(folders) and report["targets"] == [int(c) for c in sorted(folders)]
    assert report["weights"].startswith("file ") and report["images"] == 12
    expected_norms = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": ((0.0,) * 3, (1.0,) * 3),
                      "half": ((0.5,) * 3, (0.5,) * 3)}
    images = [image for name in sorted(folders) for image in folders[name]]
    truth = [int(name) for name in sorted(folders) for _ in folders[name]]
    top1 = {}
    for result in report["results"]:
        mean, std = expected_norms[result["key"]]
        assert result["mean"] == pytest.approx(list(mean)) and result["std"] == pytest.approx(list(std))
        predicted = predict(model, images, mean, std)
        among = predict(model, images, mean, std, among=sorted(int(c) for c in folders))
        top1[result["key"]] = np.mean([p == t for p, t in zip(predicted, truth)])
        assert result["predictions"] == predicted
        assert result["top1"] == pytest.approx(top1[result["key"]])
        assert result["top1_among_classes"] == pytest.approx(np.mean([p == t for p, t in zip(among, truth)]))
        assert result["weights_own"] == (result["key"] == "half")  # timm test_resnet was trained at 0.5
    assert [r["key"] for r in report["results"]] == ["imagenet", "none", "half"]
    assert top1["imagenet"] >= 0.5  # the folders follow the model's ImageNet-normalized predictions
    rows = table_rows(out / "results.md")
    assert [row["normalization"] for row in rows] == ["ImageNet mean/std", "none (mean 0, std 1)", "mean = std = 0.5"]
    own = "the weights' own normalization"
    assert [row["for these weights"] for row in rows] == ["another one", "another one", own]
    assert [float(row["top-1"]) for row in rows] == pytest.approx(
        [top1[k] for k in ("imagenet", "none", "half")], abs=1e-4)
    assert (out / "normalization.png").stat().st_size > 10_000 and (out / "results.csv").is_file()


def test_exercise5_seeds_draw_other_subsets_and_report_mean_and_std(tmp_path: Path) -> None:
    """--seeds 0,1,2: each seed's numbers equal a separate run with that dataset.split_seed, and the
    table shows their mean ± sample std (the subsets differ, so the numbers do too)."""
    import timm

    from transfer_cli.cli import main

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    weights = tmp_path / "test_resnet.pth"
    torch.save(model.state_dict(), weights)
    write_folder(tmp_path / "imagenet_folder", model, count=24)
    args = ["backbone=timm", "backbone.name=test_resnet", f"backbone.checkpoint={weights}", "dataset=folder",
            f"dataset.root={tmp_path / 'imagenet_folder'}", "dataset.val_subset=8", "transforms.image_size=32",
            "trainer.num_workers=0", "trainer.device=cpu"]
    assert main(["exercise", "normalization", "--out", str(tmp_path / "all"), "--samples", "0", "--seeds", "0,1,2",
                 *args]) == 0
    together = json.loads((tmp_path / "all" / "results.json").read_text())
    assert together["split_seeds"] == [0, 1, 2]
    alone = []
    for seed in (0, 1, 2):
        out = tmp_path / f"seed{seed}"
        assert main(["exercise", "normalization", "--out", str(out), "--samples", "0", *args,
                     f"dataset.split_seed={seed}"]) == 0
        alone.append(json.loads((out / "results.json").read_text())["results"])
    assert [run["results"] for run in together["per_seed"]] == alone
    predictions = {tuple(run[0]["predictions"]) for run in alone}
    assert len(predictions) > 1, "the seeds should pick different evaluation images"
    rows = table_rows(tmp_path / "all" / "results.md")
    for row, key in zip(rows, ("imagenet", "none", "half")):
        top1 = [next(r["top1"] for r in run if r["key"] == key) for run in alone]
        assert row["top-1"] == f"{np.mean(top1):.4f} ± {np.std(top1, ddof=1):.4f}"
        entry = next(r for r in together["results"] if r["key"] == key)
        assert (entry["top1"] == pytest.approx(np.mean(top1))
                and entry["top1_std"] == pytest.approx(np.std(top1, ddof=1)))
    with open(tmp_path / "all" / "results.csv", newline="") as file:
        assert [int(r["split_seed"]) for r in csv.DictReader(file)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_exercise5_command_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from transfer_cli.cli import main

    (tmp_path / "val" / "spaceship-cat").mkdir(parents=True)
    assert main(["exercise", "normalization", "--out", str(tmp_path / "out"), "dataset=folder",
                 f"dataset.root={tmp_path}", "trainer.epoch=3"]) == 2
    assert "trainer.epoch" in capsys.readouterr().err
    assert main(["exercise", "7"]) == 2
    assert "unknown exercise" in capsys.readouterr().err
    assert main(["exercise", "normalization", "--seeds", "0,one"]) == 2
    assert "--seeds '0,one': give comma-separated integers" in capsys.readouterr().err


# --------------------------------------------------------------------------- quick mode on the real assets


@needs_make
@pytest.mark.slow
def test_exercise5_quick_on_hymenoptera_with_real_weights(assets: Path, tmp_path: Path) -> None:
    make("exercise5", tmp_path, [], "QUICK=1", f"ASSETS={assets}")
    report = json.loads((tmp_path / "ex5" / "results.json").read_text())
    assert report["weights"].startswith("hf-hub") and report["images"] == 100 and report["split_seeds"] == [0, 1, 2]
    assert report["targets"] == [310, 309]  # ants -> ant, bees -> bee
    by_key = {r["key"]: r for r in report["results"]}
    assert by_key["half"]["weights_own"]  # tf_efficientnet_lite0 was trained on [-1, 1] inputs
    assert by_key["half"]["top1"] >= 0.8
    assert by_key["half"]["top1"] > max(by_key["imagenet"]["top1"], by_key["none"]["top1"])
    assert (tmp_path / "ex5" / "normalization.png").is_file()
