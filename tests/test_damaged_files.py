"""Damaged files the tool reads back (a run's config.yaml, checkpoints, summary.json, metrics.jsonl,
a `backbone.checkpoint` file): each command ends in one line naming the file and what is wrong,
with a non-zero exit and no traceback; `transfer report` reports the readable runs and lists the rest.

One tiny run is trained per module; each test damages its own copy.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.config.compose import compose_config

from conftest import compose_train
from helpers import fresh_copy, trained_in_process


TINY = ["experiment=smoke", "strategy=fine_tune", "dataset.train_size=64", "dataset.val_size=32", "trainer.epochs=2",
        "trainer.batch_size=32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run directory laid out as `transfer train` leaves it."""
    return trained_in_process(tmp_path_factory.mktemp("trained") / "run", compose_train(TINY))


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return fresh_copy(trained, tmp_path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated": _truncate,
    "not a zip": lambda path: path.write_text("this is not a checkpoint\n"),
    "empty": lambda path: path.write_bytes(b""),
    "foreign list": lambda path: torch.save([torch.zeros(2)], path),
    "missing keys": lambda path: torch.save({"weights": torch.zeros(2)}, path),
    "pickled code": lambda path: torch.save({"model": argparse.Namespace(a=1)}, path),  # weights_only refuses it
}
CONFIGS = {
    "not yaml": b"backbone: {source: timm\n  name: [",
    "binary": bytes(range(128, 256)) * 4,
    "a list": b"- 1\n- 2\n",
    "foreign keys": b"foo: 1\n",
    "empty": b"",
}


def assert_one_line_naming(capsys: pytest.CaptureFixture[str], code: int, path: Path) -> str:
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("transfer: error: ") and str(path) in lines[0], lines[0]
    return lines[0]


def test_the_undamaged_copy_evaluates(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control: what the tests below damage works as it is."""
    assert main(["eval", str(run), "checkpoint=last"]) == 0
    assert (run / "eval" / "val" / "last" / "metrics.json").is_file()


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("which", ["best", "last"])
def test_eval_of_a_damaged_checkpoint_is_one_line(run: Path, capsys: pytest.CaptureFixture[str], damage: str,
                                                  which: str) -> None:
    file = run / "checkpoints" / f"{which}.pt"
    DAMAGE[damage](file)
    assert_one_line_naming(capsys, main(["eval", str(run), f"checkpoint={which}"]), file)
    assert not (run / "eval").exists()


@pytest.mark.parametrize("content", list(CONFIGS))
@pytest.mark.parametrize("command", ["eval", "resume", "predict"])
def test_a_damaged_config_yaml_is_one_line(run: Path, capsys: pytest.CaptureFixture[str], content: str,
                                           command: str) -> None:
    (run / "summary.json").unlink()  # resume: an unfinished run
    (run / "config.yaml").write_bytes(CONFIGS[content])
    args = [str(run), str(run)] if command == "predict" else [str(run)]  # predict: any path; it fails first
    assert_one_line_naming(capsys, main([command, *args]), run / "config.yaml")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_from_a_damaged_last_checkpoint_is_one_line_and_keeps_the_run(
        run: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    (run / "summary.json").unlink()
    file = run / "checkpoints" / "last.pt"
    DAMAGE[damage](file)
    before = _contents(run)
    assert_one_line_naming(capsys, main(["resume", str(run)]), file)
    after = _contents(run)
    assert {name: after.get(name) for name in before} == before  # every file of the run as it was


def _contents(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def test_resume_refuses_a_checkpoint_without_its_progress(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A readable checkpoint that is not a resumable one (best.pt-like payloads copied over last.pt by hand)."""
    (run / "summary.json").unlink()
    file = run / "checkpoints" / "last.pt"
    payload = torch.load(file, weights_only=True)
    del payload["progress"]
    torch.save(payload, file)
    line = assert_one_line_naming(capsys, main(["resume", str(run)]), file)
    assert "progress" in line


def _sweep_job(tmp_path: Path, seed: int) -> tuple[Path, list[str]]:
    """A sweep's job 0 as an earlier attempt left it (its config.yaml), and the overrides that re-run it."""
    sweep = tmp_path / "sweep"
    job = sweep / "0"
    job.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(compose_config([*TINY, f"trainer.seed={seed}"])), job / "config.yaml")
    return job, ["train", "-m", *TINY, f"trainer.seed={seed}", f"hydra.sweep.dir={sweep}"]


@pytest.mark.parametrize("damaged", ["config.yaml", "summary.json", "checkpoints/last.pt"])
def test_a_sweep_rerun_over_a_damaged_job_is_one_line(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], damaged: str) -> None:
    job, argv = _sweep_job(tmp_path, seed=3)
    file = job / damaged
    file.parent.mkdir(exist_ok=True)
    file.write_text('{"reported_val_acc": 0.' if damaged == "summary.json" else "garbage: [")
    assert_one_line_naming(capsys, main(argv), file)
    assert not (job / "metrics.jsonl").exists()  # nothing trained


def _damage_summary(run_dir: Path) -> None:
    (run_dir / "summary.json").write_text('{"reported_val_acc": 0.9, "final_')


def _damage_config(run_dir: Path) -> None:
    (run_dir / "config.yaml").write_bytes(CONFIGS["not yaml"])


def _damage_metrics_middle(run_dir: Path) -> None:
    first, second = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(f"{first}\n{{garbage\n{second}\n")


def _config_a_list(run_dir: Path) -> None:
    (run_dir / "config.yaml").write_bytes(CONFIGS["a list"])


REPORT_DAMAGE = {"summary.json": _damage_summary, "config.yaml": _damage_config,
                 "metrics.jsonl": _damage_metrics_middle, "config.yaml ": _config_a_list}


def test_report_reports_the_readable_runs_and_lists_each_unreadable_one(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    for index in range(len(REPORT_DAMAGE) + 2):
        shutil.copytree(trained, sweep / str(index))
    damaged = {}
    for index, (name, damage) in enumerate(REPORT_DAMAGE.items(), start=1):  # 0 and the last stay readable
        damage(sweep / str(index))
        damaged[index] = sweep / str(index) / name.strip()
    code = main(["report", str(sweep)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # two readable copies of one run: the same config and seed, so the second is a repeat, not a seed
    assert [row.rstrip(" |").rsplit("| ", 1)[-1] for row in rows] == ["0", "5"]
    assert "repeat of" in rows[1] and "repeat of" not in rows[0]
    skipped = [line for line in err.splitlines() if line.startswith("transfer: skipped an unreadable run: ")]
    assert len(skipped) == len(REPORT_DAMAGE)
    for line, file in zip(skipped, damaged.values()):
        assert str(file) in line, line
    written = (sweep / "results.md").read_text()
    assert all(str(file) in written for file in damaged.values())


def test_report_of_only_unreadable_runs_is_one_line(trained: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(trained, tmp_path / "only")
    _damage_summary(tmp_path / "only")
    assert_one_line_naming(capsys, main(["report", str(tmp_path / "only")]), tmp_path / "only" / "summary.json")


def _state_dict_of_the_run(trained: Path, file: Path) -> None:
    """A real state dict (the run's own weights), cut in half."""
    torch.save(torch.load(trained / "checkpoints" / "best.pt", weights_only=True)["model"], file)
    _truncate(file)


BACKBONE_FILES = {
    "truncated": _state_dict_of_the_run,
    "not a zip": lambda trained, file: file.write_text("weights\n"),
    "a list": lambda trained, file: torch.save([torch.zeros(3)], file),
    "non-tensor values": lambda trained, file: torch.save({"conv1.weight": "zeros"}, file),
    "foreign keys": lambda trained, file: torch.save({"encoder.weight": torch.zeros(3)}, file),
    "pickled code": lambda trained, file: torch.save({"model": argparse.Namespace()}, file),
}


@pytest.mark.parametrize("damage", list(BACKBONE_FILES))
@pytest.mark.slow
def test_train_from_a_damaged_backbone_checkpoint_is_one_line_and_leaves_no_run_dir(
        trained: Path, tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str],
        damage: str) -> None:
    file = tmp_path / "weights.pth"
    BACKBONE_FILES[damage](trained, file)
    run_dir = tmp_path / "run"
    code = main(["train", *TINY, f"backbone.checkpoint={file}", f"hydra.run.dir={run_dir}"])
    line = assert_one_line_naming(capsys, code, file)
    assert "backbone.checkpoint" in line
    assert not run_dir.exists()


def test_summary_json_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    from transfer_cli.core.errors import TransferError
    from transfer_cli.runs.rundir import read_summary

    path = tmp_path / "summary.json"
    path.write_text(json.dumps([0.9]))
    with pytest.raises(TransferError, match=r"summary\.json is not a run summary \(a JSON object\): it holds a list"):
        read_summary(path)
