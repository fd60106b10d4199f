"""Checkpoints that cost what trains: the frozen part of the network written once per run, each epoch only what
changed; every reader (resume, eval, predict, export) gets the whole network back bit for bit, or one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.inference.load import load_trained_model
from transfer_cli.runs import checkpoint
from transfer_cli.runs.frozen import FrozenStore, file_name, tensors_digest, untrained_tensors
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.run import train

from conftest import compose_train
from helpers import comparable


def raw(path: Path) -> dict:
    """A checkpoint as stored, without merging its frozen file back."""
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Known starting weights: what the frozen backbone must still be, bit for bit, after any round trip."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    return path


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    cfg = compose_train(overrides)
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml", resolve=True)
    train(cfg, run_dir)
    return run_dir


def extract(weights: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", "dataset.train_size=48", "dataset.val_size=32", "trainer.epochs=3",
            f"backbone.checkpoint={weights}", "strategy=feature_extract", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Path:
    """A 3-epoch feature-extraction run; its checkpoints as they stood after epoch 1 are kept in `after-1/`."""
    run_dir = tmp_path_factory.mktemp("frozen") / "run"
    real = checkpoint.save_atomic

    def save(payload: dict, path: Path) -> None:
        real(payload, path)
        if payload.get("epoch") == 1:
            (run_dir / "after-1").mkdir(exist_ok=True)
            shutil.copy2(path, run_dir / "after-1" / path.name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save_atomic", save)
        return train_run(run_dir, extract(weights))


def test_feature_extraction_writes_the_backbone_once_and_each_epoch_only_the_head(run: Path) -> None:
    folder = run / "checkpoints"
    frozen = sorted(folder.glob("frozen-*.pt"))
    assert len(frozen) == 1
    last, best = raw(folder / "last.pt"), raw(folder / "best.pt")
    for payload in (last, best):
        assert sorted(payload["model"]) == ["fc.bias", "fc.weight"]  # the head: all that trains
        assert payload["frozen"]["file"] == frozen[0].name
        assert len(payload["frozen"]["model"]) > 10 and not any(k.startswith("fc.") for k in payload["frozen"]["model"])
    assert "optimizer" in last and "rng" in last
    assert not {"optimizer", "scheduler", "rng", "tally"} & best.keys()  # best.pt: weights, not resume state
    backbone_bytes = frozen[0].stat().st_size
    assert (folder / "last.pt").stat().st_size * 5 < backbone_bytes, "last.pt still carries the backbone"


def test_the_backbone_is_bit_identical_after_the_round_trip(run: Path, weights: Path) -> None:
    start = torch.load(weights, weights_only=True)
    for name in ("best", "last"):
        _, model, _ = load_trained_model(run, name)
        state = model.model.state_dict()
        backbone = [key for key in start if not key.startswith("fc.")]
        assert backbone and all(torch.equal(state[key], start[key]) for key in backbone)
        assert not torch.equal(state["fc.weight"], start["fc.weight"])  # the head did train
    merged = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(merged[key], start[key]) for key in start if not key.startswith("fc."))


def test_eval_predict_and_export_read_the_new_checkpoints(run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run)]) == 0
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.json").is_file()


def stopped_copy(run: Path, copy: Path) -> Path:
    """A copy of `run` as it stood after epoch 1: its checkpoints then, one line of metrics, no summary."""
    shutil.copytree(run, copy)
    for saved in (copy / "after-1").iterdir():
        shutil.copy2(saved, copy / "checkpoints" / saved.name)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text(lines[0])
    for name in ("summary.json", "curves.png"):
        (copy / name).unlink(missing_ok=True)
    return copy


def test_resume_adopts_the_frozen_file_and_ends_as_one_uninterrupted_run(run: Path, tmp_path: Path) -> None:
    """The run as it stood after epoch 1 (its checkpoints then, one line of metrics), resumed: the frozen file
    is neither rewritten nor duplicated, and the metrics equal the uninterrupted run's."""
    stopped = stopped_copy(run, tmp_path / "stopped")
    frozen = next((stopped / "checkpoints").glob("frozen-*.pt"))
    before = (frozen.stat().st_mtime_ns, frozen.read_bytes())

    assert main(["resume", str(stopped)]) == 0
    assert sorted((stopped / "checkpoints").glob("frozen-*.pt")) == [frozen]
    assert (frozen.stat().st_mtime_ns, frozen.read_bytes()) == before
    assert comparable(read_metrics(stopped)) == comparable(read_metrics(run))


@pytest.mark.parametrize("damage", ["missing", "torn", "another run's"])
def test_a_missing_torn_or_foreign_frozen_file_is_refused_in_one_line(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    copy = stopped_copy(run, tmp_path / "copy")
    frozen = next((copy / "checkpoints").glob("frozen-*.pt"))
    if damage == "missing":
        frozen.unlink()
    elif damage == "torn":
        frozen.write_bytes(frozen.read_bytes()[: frozen.stat().st_size // 2])
    else:  # same names and shapes, other values: only the digest can tell
        stored = torch.load(frozen, weights_only=True)
        stored["tensors"] = {key: value + 1 if value.is_floating_point() else value
                             for key, value in stored["tensors"].items()}
        torch.save(stored, frozen)
    capsys.readouterr()
    for command in (["eval", str(copy)], ["predict", str(copy), str(copy)], ["resume", str(copy)]):
        assert main(command) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and frozen.name in err[0], err
        assert {"missing": "is missing", "torn": "cannot read", "another run's": "sha256 differs"}[damage] in err[0]


def test_gradual_stores_inline_what_a_stage_unfroze_and_still_loads_whole(tmp_path: Path, weights: Path) -> None:
    run = train_run(tmp_path / "gradual", extract(weights, "strategy=gradual"))
    last = raw(run / "checkpoints" / "last.pt")
    assert any(key.startswith("layer4.") for key in last["model"])  # trained in stage 2: inline
    start = torch.load(weights, weights_only=True)
    _, model, _ = load_trained_model(run, "last")
    state = model.model.state_dict()
    untouched = [key for key in start if key.startswith(("layer1.", "layer2.")) and "running" not in key]
    assert untouched and not all(torch.equal(state[key], start[key]) for key in untouched)  # stage 3 trains all
    assert len(list((run / "checkpoints").glob("frozen-*.pt"))) == 1


def test_a_fine_tuned_run_writes_no_frozen_file(tmp_path: Path) -> None:
    run = train_run(tmp_path / "scratch", ["experiment=smoke", "dataset.train_size=32", "dataset.val_size=16",
                                           "trainer.epochs=1", "strategy=scratch"])
    assert not list((run / "checkpoints").glob("frozen-*.pt"))
    assert "frozen" not in raw(run / "checkpoints" / "last.pt")


def test_an_ema_run_references_its_averaged_frozen_tensors_too(tmp_path: Path, weights: Path) -> None:
    run = train_run(tmp_path / "ema", extract(weights, "trainer.ema_decay=0.9"))
    best = raw(run / "checkpoints" / "best.pt")
    assert best["frozen"]["ema"] and all(key.startswith("module.") for key in best["frozen"]["ema"])
    assert not any(key.startswith("module.layer") for key in best["ema"])
    start = torch.load(weights, weights_only=True)
    _, model, _ = load_trained_model(run, "best")  # the EMA's weights, merged
    assert all(torch.equal(model.model.state_dict()[key], start[key]) for key in start if key.startswith("layer"))


def test_store_inlines_a_frozen_tensor_that_changed_and_references_equal_ones(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    for parameter in model[0].parameters():
        parameter.requires_grad_(False)
    store = FrozenStore()
    first = store.shrink({"model": model.state_dict()}, model, tmp_path)
    assert sorted(first["frozen"]["model"]) == ["0.bias", "0.weight"]  # BatchNorm1d has trainable affine
    with torch.no_grad():
        model[0].weight[0, 0] += 1  # a "frozen" tensor changed after all: stored inline, never lost
    second = store.shrink({"model": model.state_dict()}, model, tmp_path)
    assert "0.weight" in second["model"] and second["frozen"]["model"] == ["0.bias"]
    assert len(list(tmp_path.glob("frozen-*.pt"))) == 1
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(second, path)
    whole = checkpoint.load(path)["model"]
    assert all(torch.equal(whole[key], value) for key, value in model.state_dict().items())
    assert tensors_digest(untrained_tensors(model)) != store.digest  # the digest covers values


def test_file_modes_follow_the_umask(run: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in (run / "checkpoints").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_frozen_files_no_checkpoint_names_are_removed_and_named_ones_kept(tmp_path: Path) -> None:
    """A resume that could not adopt the old frozen file writes a new one: the old stays while best.pt names it,
    an orphan goes, and nothing goes while a checkpoint cannot be read."""
    def frozen_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        model[0].requires_grad_(False)
        return model

    old, new, orphan = FrozenStore(), FrozenStore(), FrozenStore()
    checkpoint.save_atomic(old.shrink({"model": frozen_model(0).state_dict()}, frozen_model(0), tmp_path),
                           tmp_path / "best.pt")
    orphan.shrink({"model": frozen_model(1).state_dict()}, frozen_model(1), tmp_path)
    checkpoint.save_atomic(new.shrink({"model": frozen_model(2).state_dict()}, frozen_model(2), tmp_path),
                           tmp_path / "last.pt")
    assert len(list(tmp_path.glob("frozen-*.pt"))) == 3

    (tmp_path / "best.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:40])  # torn: might name any of them
    new.remove_unreferenced(tmp_path, ("last.pt", "best.pt"))
    assert len(list(tmp_path.glob("frozen-*.pt"))) == 3

    checkpoint.save_atomic(old.shrink({"model": frozen_model(0).state_dict()}, frozen_model(0), tmp_path),
                           tmp_path / "best.pt")
    new.remove_unreferenced(tmp_path, ("last.pt", "best.pt"))
    assert sorted(p.name for p in tmp_path.glob("frozen-*.pt")) == sorted([file_name(old.digest),
                                                                           file_name(new.digest)])
    assert torch.equal(checkpoint.load(tmp_path / "best.pt")["model"]["0.weight"], frozen_model(0)[0].weight)
