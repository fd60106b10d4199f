"""The `transfer` command: as a user runs it (a subprocess per behaviour), and its error paths in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transfer_cli.cli import main

from conftest import REPO


SMALL = ["experiment=smoke", "dataset.train_size=64", "dataset.val_size=32", "trainer.epochs=3"]


def transfer(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "transfer_cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_commands_without_importing_torch() -> None:
    code = "import sys; from transfer_cli.cli import main; main(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "train" in result.stdout
    assert result.stdout.strip().endswith("False")


def test_unknown_command_is_one_line_error() -> None:
    result = transfer("trian")
    assert result.returncode == 2
    assert "did you mean 'train'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_help_shows_config_groups_without_importing_torch() -> None:
    code = ("import sys\nfrom transfer_cli.cli import main\ntry:\n    main(['train', '--help'])\n"
            "finally:\n    print('torch' in sys.modules)")  # Hydra's --help ends with sys.exit(0)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("False")
    for group in ("backbone:", "strategy:", "dataset:", "augment:", "optimizer:", "scheduler:", "experiment:"):
        assert group in result.stdout
    assert "feature_extract, fine_tune" in result.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "transfer"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "commands:" in result.stdout


@pytest.mark.slow
def test_train_writes_a_complete_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = transfer("train", *SMALL, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    assert f"run dir: {run_dir}" in result.stdout and "val acc " in result.stdout
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 3


@pytest.mark.slow
def test_multirun_leaves_one_dir_per_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = transfer("train", "-m", *SMALL, "strategy=feature_extract,fine_tune", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    strategies = {json.loads((s.parent / "metrics.jsonl").read_text().splitlines()[0])["stage"] for s in summaries}
    assert strategies == {"head", "all"}


USER_MISTAKES = [
    (["backbone.name=test_resnt"], "did you mean test_resnet"),
    (["dataset=folder", "dataset.root=/nonexistent/images"], "is not a directory"),
    (["strategy=discriminative", "backbone.name=test_vit"], "layer group 'layer1' does not exist"),
    (["trainer.epochs=0"], "trainer.epochs=0: must be > 0"),
    (["strategy=fine_tuning"], "Could not find 'strategy/fine_tuning': choose one of auto"),
    (["trainer.epoch=3"], "Key 'epoch' not in 'TrainerConfig'"),
    (["trainer.epochs=abc"], "could not be converted to Integer"),
]


@pytest.mark.slow
def test_a_user_mistake_is_a_one_line_error_from_the_installed_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = transfer("train", "experiment=smoke", "backbone.name=test_resnt", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr.startswith("transfer: error: unknown timm model 'test_resnt': did you mean test_resnet")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize(("overrides", "message"), USER_MISTAKES)
@pytest.mark.slow
def test_user_and_config_mistakes_are_one_line_errors_and_leave_no_run_dir(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], overrides: list[str],
        message: str) -> None:
    """In this process (the command above shows the same from a fresh one): main()'s exit code and stderr."""
    run_dir = tmp_path / "run"
    assert main(["train", "experiment=smoke", *overrides, f"hydra.run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.parametrize(("sweep", "message"), [
    (["strategy=feature_extract,fine_tuning"], "Could not find 'strategy/fine_tuning': choose one of auto"),
    (["trainer.epochs=3,abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["trainer.seed=1,2", "trainer.epoch=1"], "Key 'epoch' not in 'TrainerConfig'"),
    (["trainer.seed=range(0,3)", "dataset=synthetic,folderz"], "Could not find 'dataset/folderz'"),
])
def test_a_sweep_with_a_bad_value_fails_before_any_job_in_one_line(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], sweep: list[str],
        message: str) -> None:
    sweep_dir = tmp_path / "sweep"
    assert main(["train", "-m", "experiment=smoke", *sweep, f"hydra.sweep.dir={sweep_dir}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not sweep_dir.exists()


def test_value_by_value_checks_each_swept_value_once() -> None:
    from transfer_cli.config.compose import value_by_value

    runs = value_by_value(["a=1,2,3", "b=x", "c=range(0,10)", "d=interval(0,1)"])
    assert runs == [["b=x", "a=1", "c=0"], ["b=x", "a=2", "c=0"], ["b=x", "a=3", "c=0"], ["b=x", "a=1", "c=9"]]


@pytest.mark.parametrize(("typed", "offered"), [("transfer train strategy=gr", "strategy=gradual"),
                                                ("transfer train trainer.ep", "trainer.epochs="),
                                                ("transfer train experiment=smoke backbone=res", "backbone=resnet18")])
def test_shell_completion_as_installed_completes_train_overrides(typed: str, offered: str) -> None:
    """`eval "$(transfer train -sc install=bash)"` installs a function that calls `transfer -sc query=bash` with
    the typed line in COMP_LINE (zsh's install wraps the same function)."""
    install = subprocess.run([sys.executable, "-m", "transfer_cli", "train", "-sc", "install=bash"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0 and "-sc query=bash" in install.stdout
    env = {**os.environ, "COMP_LINE": typed, "COMP_POINT": str(len(typed))}
    query = subprocess.run([sys.executable, "-m", "transfer_cli", "-sc", "query=bash"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert query.returncode == 0, query.stderr
    assert offered in query.stdout.split()


def installed_completion(typed: str, cwd: Path) -> list[str]:
    """What bash offers for `typed` (the word being typed last) with the function `transfer train -sc install=bash`
    installs, run as the shell runs it."""
    script = ('eval "$(transfer train -sc install=bash)"; COMP_LINE="$TYPED"; COMP_POINT=${#TYPED}; '
              'words=($TYPED); COMP_CWORD=$(( ${#words[@]} - 1 )); [[ "$TYPED" == *" " ]] && COMP_CWORD=${#words[@]}; '
              'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"')
    env = {**os.environ, "TYPED": typed, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [word for word in done.stdout.split() if word]


def test_shell_completion_completes_the_first_word_to_a_command(tmp_path: Path) -> None:
    # not a train override such as eval_splits.: the first word is a command
    assert installed_completion("transfer ev", tmp_path) == ["eval"]
    assert installed_completion("transfer e", tmp_path) == ["eval", "export", "exercise"]
    assert installed_completion("transfer lr", tmp_path) == ["lr-find"]


@pytest.mark.parametrize("command", ["resume", "eval", "predict", "export"])
def test_shell_completion_offers_run_directories_for_run_dir(tmp_path: Path, command: str) -> None:
    for run in ("outputs/runs/2026-01-02_10-00-00", "outputs/multirun/sweep/0"):
        (tmp_path / run / ".hydra").mkdir(parents=True)
    (tmp_path / "outputs" / "runs" / "not_a_run").mkdir()  # no .hydra/, no config.yaml: not offered
    assert installed_completion(f"transfer {command} ", tmp_path) == ["outputs/multirun/sweep/0",
                                                                      "outputs/runs/2026-01-02_10-00-00"]
    assert installed_completion(f"transfer {command} outputs/ru", tmp_path) == ["outputs/runs/2026-01-02_10-00-00"]
    # past RUN_DIR no run directories: the shell's own file names (here, the one in the directory)
    assert installed_completion(f"transfer {command} outputs/runs/2026-01-02_10-00-00 ", tmp_path) == ["outputs"]


def test_help_read_by_a_pipe_that_closes_early_is_no_error() -> None:
    """`transfer train --help | head -1` under `set -o pipefail`: the reader took its line, nothing went wrong."""
    done = subprocess.run(["bash", "-c", f"set -o pipefail; '{sys.executable}' -m transfer_cli train --help | head -1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("transfer train") and done.stderr == "", done.stderr


def help_dataset_keys(*overrides: str) -> list[str]:
    """The keys `transfer train --help` shows under `dataset:` in its config."""
    shown = transfer("train", "--help", *overrides)
    assert shown.returncode == 0, shown.stderr
    config = shown.stdout.split("== Config", 1)[1]
    block = config.split("\ndataset:\n", 1)[1].split("\n")
    return [line.split(":")[0].strip() for line in block[:next(i for i, line in enumerate(block)
                                                               if not line.startswith("  "))]]


@pytest.mark.parametrize(("dataset", "has", "lacks"), [
    ("flowers102", {"name", "root", "train_subset"}, {"num_classes", "train_size", "val_size", "image_size", "csv"}),
    ("synthetic", {"name", "num_classes", "train_size", "val_size", "image_size"}, {"csv"}),
    ("csv", {"csv", "root"}, {"num_classes", "train_size"}),
])
def test_train_help_shows_the_dataset_keys_its_kind_reads(dataset: str, has: set[str], lacks: set[str]) -> None:
    keys = set(help_dataset_keys(f"dataset={dataset}"))
    assert has <= keys and not lacks & keys, keys


def test_train_help_still_shows_the_whole_config_but_hydra() -> None:
    config = transfer("train", "--help").stdout.split("== Config", 1)[1]
    assert all(f"\n{group}:\n" in config for group in ("backbone", "strategy", "trainer", "dataset"))
    assert "epochs_per_stage" in config and "\nhydra:" not in config


def test_only_for_names_dataset_kinds() -> None:
    """A field marked for a kind that does not exist would vanish from every dataset's help."""
    import dataclasses

    from transfer_cli.config.schema import DATASET_NAMES, DatasetConfig

    marked = {field.name: field.metadata["only_for"] for field in dataclasses.fields(DatasetConfig)
              if "only_for" in field.metadata}
    assert set(marked) == {"csv", "num_classes", "train_size", "val_size", "image_size"}
    assert all(set(kinds) <= set(DATASET_NAMES) for kinds in marked.values())
