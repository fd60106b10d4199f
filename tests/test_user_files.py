"""Nothing of the user's is ever deleted, overwritten or mislabelled: a folder of the user's given as a run or
sweep dir, links in a run directory, hand-edited run files in a report, formula-like CSV cells, a resume line
for any path.

Every check is from the user's side (the CLI in this process, real files), and compares whole trees byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest

from transfer_cli.cli import main
from transfer_cli.config.compose import compose_config, sweep_jobs
from transfer_cli.core.errors import Interrupted, TransferError, bug_line
from transfer_cli.inference import predict
from transfer_cli.runs import runlock, runlog
from transfer_cli.training import run as train_module
from transfer_cli.training.job import train_in


QUICK = ["experiment=smoke", "strategy=feature_extract", "dataset.train_size=64", "dataset.val_size=32",
         "trainer.epochs=3"]

pytestmark = pytest.mark.usefixtures("hydra_in_process")


def tree(root: Path) -> dict[str, Any]:
    """Every entry under `root` (links as links), each file's mtime and content hash: any write shows."""
    def entry(path: Path) -> Any:
        if path.is_symlink():
            return ("link", str(path.readlink()))
        if path.is_file():
            return (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        return "dir"
    return {str(p.relative_to(root)): entry(p) for p in sorted(root.rglob("*"))}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def users_folder(root: Path) -> Path:
    """A folder of the user's that looks a little like a run: their own train.log, .hydra/ and notes."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text("my: own\n")
    (root / "train.log").write_text("my own log\n")
    (root / "notes.txt").write_text("mine\n")
    return root


# --------------------------------------------------------------------------- a folder of the user's as the run dir


def test_a_folder_holding_the_users_train_log_and_hydra_is_refused_with_every_byte_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = users_folder(tmp_path / "mine")
    before = tree(folder)
    assert main(["train", *QUICK, f"hydra.run.dir={folder}"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"transfer: error: {folder} is not empty and holds files this run would write (train.log, .hydra): "
        "give an empty or new directory")
    assert tree(folder) == before


@pytest.mark.slow
def test_a_run_that_fails_beside_the_users_files_removes_only_what_it_wrote(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def mistake(*args: Any) -> Any:
        raise TransferError("simulated mistake found while setting up")

    monkeypatch.setattr(train_module, "build_plan", mistake)
    folder = tmp_path / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "a.txt").write_text("a")
    (folder / "notes.txt").write_text("mine\n")
    (folder / runlock.LOCK_NAME).write_text("left by an earlier process\n")  # there before: kept too
    before = tree(folder)
    assert main(["train", *QUICK, f"hydra.run.dir={folder}"]) == 2
    assert "simulated mistake" in one_line(capsys.readouterr().err)
    after = tree(folder)
    assert set(after) == set(before)  # Hydra's .hydra/ and train.log went, the user's entries stayed
    assert all(after[name] == before[name] for name in before if name != runlock.LOCK_NAME)
    assert (folder / runlock.LOCK_NAME).is_file()


# --------------------------------------------------------------------------- a sweep given again


def finished_job(sweep_dir: Path, *overrides: str) -> Path:
    """Job 0 of a sweep, finished, laid out as `transfer train -m` leaves it (no training: its config is composed)."""
    job = sweep_jobs([*overrides, f"hydra.sweep.dir={sweep_dir}"])[0]
    (job.run_dir / ".hydra").mkdir(parents=True)
    job.save_config()  # as the job saves it
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (job.run_dir / ".hydra" / name).write_text(f"{name} as Hydra wrote it\n")
    (job.run_dir / "train.log").write_text("the job's log\n")
    (job.run_dir / "summary.json").write_text(json.dumps({"status": "finished", "reported_val_acc": 0.5}))
    return job.run_dir


@pytest.mark.slow
def test_a_sweep_given_again_with_other_overrides_is_refused_before_hydra_writes_a_byte(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = tmp_path / "sweep"
    job = finished_job(sweep_dir, *QUICK, "trainer.seed=1")
    assert job == sweep_dir / "0"
    before = tree(sweep_dir)
    assert main(["train", "-m", *QUICK, "trainer.seed=3", f"hydra.sweep.dir={sweep_dir}"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"transfer: error: {job} holds a run with another config (trainer.seed: 1 there, 3 now): "
        "re-run a sweep with its own overrides, or give a new hydra.sweep.dir")
    assert tree(sweep_dir) == before  # .hydra/, train.log and no multirun.yaml: as they were


@pytest.mark.slow
def test_a_sweep_killed_before_a_job_saved_its_config_trains_that_job_when_given_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A preempted sweep: job 1 was killed after Hydra wrote its .hydra/ and train.log, before the job saved
    anything. The same command again trains it (Hydra's own files for that job number are not the user's)."""
    sweep_dir = tmp_path / "sweep"
    command = ["train", "-m", *QUICK, "trainer.epochs=1", "trainer.seed=1,2", f"hydra.sweep.dir={sweep_dir}"]
    assert main(command) == 0
    killed = sweep_dir / "1"
    for entry in killed.iterdir():
        if entry.name not in (".hydra", "train.log", runlock.LOCK_NAME):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    first = (sweep_dir / "0" / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(command) == 0, capsys.readouterr().err
    assert json.loads((killed / "summary.json").read_text())["status"] == "finished"
    assert (sweep_dir / "0" / "summary.json").read_bytes() == first  # the finished job skipped, not retrained
    # the job number in Hydra's hydra.yaml must be this job's: job 0's .hydra/ in job 1's place is not its own
    for entry in killed.iterdir():
        if entry.name != ".hydra":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    shutil.rmtree(killed / ".hydra")
    shutil.copytree(sweep_dir / "0" / ".hydra", killed / ".hydra")
    before = tree(sweep_dir)
    assert main(command) == 2
    assert "holds files this run would write" in one_line(capsys.readouterr().err)
    assert tree(sweep_dir) == before


@pytest.mark.slow
def test_a_sweep_job_dir_holding_the_users_files_is_refused_before_hydra_writes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = tmp_path / "sweep"
    users_folder(sweep_dir / "1")
    before = tree(sweep_dir)
    assert main(["train", "-m", *QUICK, "trainer.seed=1,2", f"hydra.sweep.dir={sweep_dir}"]) == 2
    assert "holds files this run would write (train.log, .hydra)" in one_line(capsys.readouterr().err)
    assert tree(sweep_dir) == before


@pytest.mark.slow
def test_the_jobs_of_a_sweep_are_numbered_as_hydra_numbers_them(tmp_path: Path) -> None:
    jobs = sweep_jobs(["experiment=smoke", "trainer.seed=1,2", "strategy=feature_extract,fine_tune",
                       f"hydra.sweep.dir={tmp_path}"])
    assert [(job.run_dir.name, job.config().trainer.seed, job.config().strategy.name) for job in jobs] == [
        ("0", 1, "feature_extract"), ("1", 1, "fine_tune"), ("2", 2, "feature_extract"), ("3", 2, "fine_tune")]


# --------------------------------------------------------------------------- links in a run directory


def interrupted_run(root: Path) -> Path:
    """A run directory resume accepts up to its lock (config.yaml, no summary.json)."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("trainer: {}\n")
    return run_dir


@pytest.mark.parametrize("name", [runlock.LOCK_NAME, "train.log", "metrics.jsonl"])
def test_resume_refuses_a_link_in_the_run_dir_and_leaves_its_target_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    run_dir = interrupted_run(tmp_path)
    target = tmp_path / "precious.txt"
    target.write_text("the user's\n")
    (run_dir / name).symlink_to(target)
    before, kept = tree(run_dir), tree(tmp_path)
    assert main(["resume", str(run_dir)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"transfer: error: {run_dir / name} is a symbolic link: a run directory's files must be its own; "
        "remove the link")
    assert tree(run_dir) == before and tree(tmp_path) == kept


def test_a_symlinked_checkpoints_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = interrupted_run(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (run_dir / "checkpoints").symlink_to(tmp_path / "elsewhere")
    assert main(["resume", str(run_dir)]) == 2
    assert f"{run_dir / 'checkpoints'} is a symbolic link" in one_line(capsys.readouterr().err)


def test_the_run_files_appended_to_are_never_opened_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("the user's\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(target)
    with pytest.raises(TransferError, match="metrics.jsonl is a symbolic link"):
        runlog.append_metrics(run_dir, {"epoch": 1})
    (run_dir / "error.log").symlink_to(target)
    line = bug_line(RuntimeError("simulated"), run_dir / "error.log")
    assert f"full traceback in {run_dir / 'error.log'}" not in line  # it went to a temp file instead
    assert target.read_text() == "the user's\n"


# --------------------------------------------------------------------------- report over hand-edited runs


def write_run(run_dir: Path, summary: dict[str, Any] | None, records: list[str], strategy: str = "fine_tune") -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"strategy:\n  name: '{strategy}'\ntrainer:\n  seed: 0\n")
    if records:
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in records))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_report_shows_each_runs_own_status_flags_non_finite_values_and_never_crashes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    epoch = '{{"epoch": {}, "stage": "head", "val/acc1": {}}}'
    write_run(tmp_path / "0", {"status": "failed", "stop_reason": "loss is not finite", "reported_val_acc": 0.5,
                               "final_val_acc": 0.4, "epochs_run": 2}, [epoch.format(1, 0.5), epoch.format(2, 0.4)],
              "failed_one")
    (tmp_path / "1" / ".hydra").mkdir(parents=True)  # NaN and Infinity: Python's JSON reads them
    (tmp_path / "1" / "config.yaml").write_text("strategy:\n  name: nonfinite\n")
    (tmp_path / "1" / "summary.json").write_text(
        '{"status": "finished", "reported_val_acc": NaN, "final_val_acc": Infinity, "epochs_run": 2}')
    write_run(tmp_path / "2", {"reported_val_acc": "high", "final_val_acc": [0.4], "epochs_run": True,
                               "wall_time_s": None,
                               "params_trainable": 12, "status": 3}, [], "wrong_types")
    write_run(tmp_path / "3", None, ['{"epoch": 1, "val/acc1": "x"}', '{"epoch": 2, "stage": 7, "val/acc1": 1e999}'],
              "missing_keys")
    write_run(tmp_path / "4", {"status": "finished", "reported_val_acc": 0.9, "final_val_acc": 0.9,
                               "epochs_run": 1}, [],
              "=HYPERLINK(1)")
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    rows = {line.split(" | ")[0].strip("| "): line for line in captured.out.splitlines()[2:]}
    assert "| failed |" in rows["failed_one"] and "0.5000" in rows["failed_one"]
    assert rows["nonfinite"].count("n/a (non-finite)") == 2 and "| finished |" in rows["nonfinite"]
    assert "| unknown |" in rows["wrong_types"] and "high" not in rows["wrong_types"]
    assert "| unfinished |" in rows["missing_keys"] and "n/a (non-finite)" in rows["missing_keys"]
    warnings = [line for line in captured.err.splitlines() if line.startswith("transfer: warning: ")]
    expected = [f"{tmp_path / '1' / 'summary.json'}: reported_val_acc is nan: shown as n/a (non-finite)",
                f"{tmp_path / '2' / 'summary.json'}: reported_val_acc is 'high' (a str), not a number",
                f"{tmp_path / '2' / 'summary.json'}: epochs_run is True (a bool), not a number",
                f"{tmp_path / '2' / 'summary.json'}: params_trainable is 12 (a int), not counts per stage",
                f"{tmp_path / '2' / 'summary.json'}: status is 3 (a int), not a run status",
                f"{tmp_path / '3' / 'metrics.jsonl'}: epoch 1 has a val/acc1 that is not a number",
                f"{tmp_path / '3' / 'metrics.jsonl'}: epoch 2 has a val/acc1 that is not finite",
                f"{tmp_path / '3' / 'metrics.jsonl'}: epoch 1 (and 1 more) has no stage name"]
    for text in expected:
        assert any(text in line for line in warnings), (text, warnings)
    with open(tmp_path / "results.csv", newline="") as file:
        names = [row["strategy.name"] for row in csv.DictReader(file)]
    assert "'=HYPERLINK(1)" in names and "failed_one" in names


# --------------------------------------------------------------------------- CSV cells and resume lines


def test_predict_csv_escapes_cells_that_a_spreadsheet_would_run() -> None:
    predictions = [predict.Prediction("=cmd.png", [("=1+2", 0.5), ("@SUM(1)", 0.25), ("-x", 0.15), ("tulip", 0.1)])]
    rows = list(csv.reader(io.StringIO(predict.render(predictions, ".csv"))))
    assert rows[1] == ["'=cmd.png", "'=1+2", "0.500000", "'@SUM(1)", "0.250000", "'-x", "0.150000", "tulip", "0.100000"]
    assert json.loads(predict.render(predictions, ".json"))[0]["top"][0]["class"] == "=1+2"  # JSON: as they are


@pytest.mark.parametrize("name", ["a b,c", "it's here", 'say "x"'])
def test_the_printed_resume_command_gives_the_path_back_in_a_shell(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    run_dir = tmp_path / name

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise Interrupted("interrupted after epoch 1")

    monkeypatch.setattr(train_module, "train", interrupted)
    outcome = train_in(compose_config(["experiment=smoke"]), run_dir, frozenset(), lambda: None)
    assert outcome.code == 130 and isinstance(outcome.error, Interrupted)
    command = one_line(outcome.line).split("continue with: ", 1)[1]
    assert shlex.split(command) == ["transfer", "resume", str(run_dir)]
    (run_dir / "config.yaml").parent.mkdir()
    (run_dir / "config.yaml").write_text("trainer: {}\n")
    with pytest.raises(TransferError) as refused:
        runlock.refuse_if_run(run_dir)
    assert shlex.split(str(refused.value).split("`")[1]) == ["transfer", "resume", str(run_dir)]
