"""Golden tests: what the `transfer` commands write and print, pinned so a refactor can prove it changed nothing.

Everything goes through the public CLI (`transfer_cli.cli.main`, in this process) and the files a run leaves
behind, never through internal modules, whose paths are free to change. Outputs are compared with the files in
tests/golden/ after removing what depends on the clock, the host or the temp dir (timings, versions, paths).

Exactness: torch runs on one thread here (results depend on the thread count, and that differs with the
number of pytest-xdist workers). On the machine that recorded the files (tests/golden/machine.json: torch
version, CPU capability, architecture) every output must be identical, every float to its last bit. On another
machine kernels may round differently, so floats are compared with rel=1e-4, abs=1e-6, and numbers printed in
text within one unit of their last printed digit as well.

Re-record (after an intended change of behaviour only):
    TRANSFER_RECORD_GOLDEN=1 .venv/bin/pytest -q -n 0 tests/test_golden.py
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from transfer_cli.cli import main

from helpers import hydra_state_restored


pytestmark = pytest.mark.slow  # every test here trains or reads recorded runs: `make test` runs them


GOLDEN = Path(__file__).resolve().parent / "golden"
RECORDING = os.environ.get("TRANSFER_RECORD_GOLDEN") == "1"
REL, ABS = 1e-4, 1e-6

SMALL = ["experiment=smoke", "dataset.train_size=64", "dataset.val_size=32", "trainer.epochs=3",
         "trainer.device=cpu"]
# conf/strategy/*.yaml but `auto`, which only picks one of these. Sweep job N trains STRATEGIES[N].
STRATEGIES = ["feature_extract", "fine_tune", "fine_tune_low_lr", "gradual", "discriminative",
              "discriminative_decay", "scratch", "lp_ft"]
# The resumed run: gradual (a feature-cached head stage, then two fine-tuning stages), 4 steps an epoch.
RESUMED = [*SMALL, "strategy=gradual", "trainer.checkpoint_every_steps=2"]
INTERRUPT_AT_STEP = 7  # Ctrl-C in step 3 of epoch 2: between two periodic checkpoints, inside a stage
CLOCK_OR_HOST = ("seconds", "per_s", "wall_time", "versions")


# --------------------------------------------------------------------------- recording and comparing


def machine() -> dict[str, str]:
    """What decides the floats' last bits, beyond the (fixed) thread count."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "arch": platform.machine()}


def recorded_on_this_machine() -> bool:
    return json.loads((GOLDEN / "machine.json").read_text()) == machine()


def as_text(name: str, fresh: Any) -> str:
    """JSON goldens hold the data with indent 2 (floats as their repr, which reads back bit for bit)."""
    return json.dumps(fresh, indent=2, allow_nan=False) + "\n" if name.endswith(".json") else fresh


def check(name: str, fresh: Any) -> None:
    """Compare `fresh` (data for a .json golden, text otherwise) with tests/golden/<name>, or record it."""
    path = GOLDEN / name
    text = as_text(name, fresh)
    if RECORDING:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    recorded = path.read_text(encoding="utf-8")
    if recorded_on_this_machine():
        assert text == recorded, f"{name} differs from its golden file"
    elif name.endswith(".json"):
        assert json.loads(text) == within_tolerance(json.loads(recorded)), f"{name} differs beyond rel={REL}"
    else:
        assert split_numbers(text) == split_numbers(recorded, tolerant=True), f"{name} differs beyond rel={REL}"


def within_tolerance(value: Any) -> Any:
    """`value` with every float replaced by pytest.approx (for another machine's rounding)."""
    if isinstance(value, float):
        return pytest.approx(value, rel=REL, abs=ABS)
    if isinstance(value, dict):
        return {key: within_tolerance(item) for key, item in value.items()}
    if isinstance(value, list):
        return [within_tolerance(item) for item in value]
    return value


DECIMAL = re.compile(r"-?\d+\.(\d+)(?:e[-+]?\d+)?")


def split_numbers(text: str, tolerant: bool = False) -> list[Any]:
    """Text as [words, (decimals, number), words, ...]; tolerant: each number within one unit of its last
    printed digit (the words and how many decimals are printed stay exact)."""
    parts, end = [], 0
    for match in DECIMAL.finditer(text):
        decimals, number = len(match.group(1)), float(match.group())
        parts += [text[end:match.start()],
                  (decimals, pytest.approx(number, rel=REL, abs=max(ABS, 10.0 ** -decimals)) if tolerant else number)]
        end = match.end()
    return [*parts, text[end:]]


def without_clock(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if not any(word in key for word in CLOCK_OR_HOST)}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def run_outputs(run_dir: Path) -> dict[str, Any]:
    """A run's metrics.jsonl, summary.json and plan.json, without timings and versions."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {"metrics": [without_clock(json.loads(line)) for line in lines],
            "summary": without_clock(read_json(run_dir / "summary.json")),
            "plan": read_json(run_dir / "plan.json")}


def drop_markdown_column(table: str, title: str) -> str:
    """The table without the column `title`; lines around it (the "Shared:" line) as they are."""
    lines = [line.split(" | ") if line.startswith("|") else line for line in table.splitlines()]
    column = next(cells for cells in lines if isinstance(cells, list)).index(title)
    return "\n".join(" | ".join(cells[:column] + cells[column + 1:]) if isinstance(cells, list) else cells
                     for cells in lines) + "\n"


def drop_csv_columns(text: str, prefix: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    kept = [index for index, title in enumerate(rows[0]) if not title.startswith(prefix)]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([[row[index] for index in kept] for row in rows])
    return out.getvalue()


# --------------------------------------------------------------------------- running the CLI


def transfer(*args: str) -> int:
    with hydra_state_restored():
        return main(list(args))


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_a_private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One torch thread makes the floats independent of the core and worker counts. The module's runs get a
    feature cache of their own: features another test cached (on more threads) could differ in the last bits."""
    if RECORDING:
        GOLDEN.mkdir(exist_ok=True)
        (GOLDEN / "machine.json").write_text(json.dumps(machine(), indent=2) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFER_CACHE", str(tmp_path_factory.mktemp("golden-feature-cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def strategy_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `transfer train -m` sweep over every strategy: its jobs are the strategy runs and the report's input."""
    sweep_dir = tmp_path_factory.mktemp("golden") / "strategies"
    assert transfer("train", "-m", *SMALL, f"strategy={','.join(STRATEGIES)}", f"hydra.sweep.dir={sweep_dir}") == 0
    return sweep_dir


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A run stopped by Ctrl-C at a fixed step, then continued with `transfer resume`.

    The Ctrl-C is raised from inside the chosen step's backward pass (counted through torch, not our code), so
    the run stops at the same place every time: a killed process would stop wherever the clock says.
    Returns the run dir and what the interruption and the resume reported (the run dir written as RUN_DIR).
    """
    run_dir = tmp_path_factory.mktemp("golden") / "resumed"
    backward, steps = torch.Tensor.backward, [0]

    def backward_then_ctrl_c(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        backward(self, *args, **kwargs)
        steps[0] += 1
        if steps[0] == INTERRUPT_AT_STEP:
            signal.raise_signal(signal.SIGINT)

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(torch.Tensor, "backward", backward_then_ctrl_c)
        interrupted_exit = transfer("train", *RESUMED, f"hydra.run.dir={run_dir}")
    epochs_logged = len((run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
    assert transfer("resume", str(run_dir)) == 0
    resumed_from = re.findall(r"resuming .* from (.*)", (run_dir / "train.log").read_text(encoding="utf-8"))
    return run_dir, {"interrupted_exit": interrupted_exit,
                     "interrupted_stderr": stderr.getvalue().replace(str(run_dir), "RUN_DIR"),
                     "epochs_logged_when_interrupted": epochs_logged, "resumed_from": resumed_from}


# --------------------------------------------------------------------------- the pinned outputs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_as_recorded(strategy_sweep: Path, strategy: str) -> None:
    check(f"train/{strategy}.json", run_outputs(strategy_sweep / str(STRATEGIES.index(strategy))))


def test_feature_extraction_on_cached_features_trains_as_recorded(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """In an empty feature cache, so the features are computed, stored and read back by this run."""
    run_dir, cache = tmp_path / "cached", tmp_path / "feature-cache"
    monkeypatch.setenv("TRANSFER_CACHE", str(cache))
    assert transfer("train", *SMALL, "strategy=feature_extract", "trainer.cache_features=true",
                    f"hydra.run.dir={run_dir}") == 0
    assert any(cache.iterdir()), "trainer.cache_features=true cached nothing"
    check("train/feature_extract_cached.json", run_outputs(run_dir))


def test_a_run_interrupted_and_resumed_ends_as_recorded(resumed_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, reported = resumed_run
    check("resume/gradual.json", {**reported, **run_outputs(run_dir)})


def test_eval_prints_and_writes_as_recorded(resumed_run: tuple[Path, dict[str, Any]],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = resumed_run[0]
    capsys.readouterr()
    assert transfer("eval", str(run_dir)) == 0
    check("eval/stdout.txt", capsys.readouterr().out)
    check("eval/metrics.json", read_json(run_dir / "eval" / "val" / "best" / "metrics.json"))
    check("eval/confusion_matrix.json", read_json(run_dir / "eval" / "val" / "best" / "confusion_matrix.json"))


def write_images(folder: Path) -> None:
    """Four small images from a seeded generator: RGB of two sizes, greyscale, and RGBA in a subfolder."""
    rng = np.random.default_rng(0)
    images = {"a_noise.png": ((32, 32, 3), "RGB"), "b_wide.png": ((40, 56, 3), "RGB"),
              "c_grey.png": ((36, 36), "L"), "nested/d_alpha.png": ((32, 32, 4), "RGBA")}
    for name, (shape, mode) in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / name)


def test_predict_prints_and_writes_as_recorded(resumed_run: tuple[Path, dict[str, Any]], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Images given by a relative path, so the paths printed and written are the same in every temp dir."""
    write_images(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for out in ("predictions.json", "predictions.csv"):
        assert transfer("predict", str(resumed_run[0]), "images", "--out", out) == 0
        check("predict/stdout.txt", capsys.readouterr().out)
    check("predict/predictions.json", read_json(tmp_path / "predictions.json"))
    check("predict/predictions.csv", (tmp_path / "predictions.csv").read_text(encoding="utf-8"))


def test_report_over_the_strategy_sweep_is_as_recorded(strategy_sweep: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Without the wall-time columns."""
    capsys.readouterr()
    assert transfer("report", str(strategy_sweep)) == 0
    check("report/stdout.md", drop_markdown_column(capsys.readouterr().out.rstrip("\n"), "wall time (s)"))
    results = (strategy_sweep / "results.md").read_text(encoding="utf-8").rstrip("\n")
    check("report/results.md", drop_markdown_column(results, "wall time (s)"))
    check("report/results.csv", drop_csv_columns((strategy_sweep / "results.csv").read_text(encoding="utf-8"),
                                                 "wall_time_s"))
