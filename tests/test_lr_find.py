"""`transfer lr-find`: the learning-rate range test on a run's first stage, checked against recomputations of its
own files (the ramp, the group ratios, the smoothing, the suggestion), what it must not touch (frozen groups, the
run-directory world of train, resume and report), and its one-line refusals."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from transfer_cli.cli import main
from transfer_cli.config.compose import compose
from transfer_cli.config.schema import StageConfig, StrategyConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.models.model import build_model
from transfer_cli.runs import runlock
from transfer_cli.runs.report_runs import find_run_dirs, is_run_dir
from transfer_cli.training.lr_find import LrCurve, RangeTest, find_lr, suggest
from transfer_cli.training.lr_find_job import first_stage_overrides
from transfer_cli.training.stages import choose_by_size, plan_stages

from helpers import (
    hydra_state_restored,
    one_error_line,
    params_of,
    strategy_names,
    transfer,
    tree_snapshot,
    write_run,
)


SMALL = ["experiment=smoke", "dataset.train_size=64", "dataset.val_size=16"]
# discriminative: the stem frozen, layer1..layer4 and the head at the lesson's lrs (1e-5 .. 1e-3), BatchNorm in
# train mode (a random init), no feature cache (the backbone trains)
DISCRIMINATIVE = [*SMALL, "strategy=discriminative"]
LESSON_LRS = {"layer1": 1e-5, "layer2": 5e-5, "layer3": 1e-4, "layer4": 5e-4, "head": 1e-3}  # conf/strategy file
START, END, STEPS = 1e-6, 1e-2, 24


def command(*argv: str) -> tuple[int, str, str]:
    """`transfer ARGV` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with hydra_state_restored(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "lr_find.csv", newline="", encoding="utf-8") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


@pytest.fixture(scope="module")
def discriminative(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One range test of the discriminative strategy's first stage, and what it printed."""
    run_dir = tmp_path_factory.mktemp("lr-find") / "run"
    code, out, err = command("lr-find", "--start-lr", str(START), "--end-lr", str(END), "--steps", str(STEPS),
                             *DISCRIMINATIVE, f"hydra.run.dir={run_dir}")
    assert code == 0, out + err
    return run_dir, out


def test_lrs_ramp_geometrically_from_start_to_end_keeping_the_group_ratios(discriminative: tuple[Path, str]) -> None:
    run_dir, _ = discriminative
    rows = read_curve(run_dir)
    result = json.loads((run_dir / "lr_find.json").read_text())
    assert len(rows) == STEPS == result["steps_run"]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert {key.removeprefix("lr/") for key in rows[0] if key.startswith("lr/")} == set(LESSON_LRS)  # no stem
    for i, row in enumerate(rows):  # what the optimizer held at each step, against the formula
        assert row["lr/head"] == pytest.approx(START * (END / START) ** (i / (STEPS - 1)), rel=1e-12)
        for group, lr in LESSON_LRS.items():
            assert row[f"lr/{group}"] / row["lr/head"] == pytest.approx(lr / LESSON_LRS["head"], rel=1e-12)
    assert rows[0]["lr/head"] == pytest.approx(START, rel=1e-14)
    assert rows[-1]["lr/head"] == pytest.approx(END, rel=1e-12)
    assert result["stop_reason"] == f"reached --end-lr after {STEPS} steps"


def test_the_suggestion_is_the_steepest_descent_of_the_recorded_smoothed_curve(
        discriminative: tuple[Path, str]) -> None:
    run_dir, out = discriminative
    rows = read_curve(run_dir)
    result = json.loads((run_dir / "lr_find.json").read_text())
    lrs, losses = [row["lr/head"] for row in rows], [row["loss"] for row in rows]
    average, smoothed = 0.0, []
    for n, loss in enumerate(losses, 1):  # the bias-corrected EMA, beta 0.98, recomputed from the raw losses
        average = 0.98 * average + 0.02 * loss
        smoothed.append(average / (1 - 0.98 ** n))
    assert [row["smoothed_loss"] for row in rows] == pytest.approx(smoothed, rel=1e-12)
    # central differences in log10 lr, the first n//10 (>= 1) and last n//20 (>= 1) points ignored (docs/lr-find.md)
    n = len(rows)
    head, tail = max(1, n // 10), max(1, n // 20)
    slopes = {i: (smoothed[i + 1] - smoothed[i - 1]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i - 1]))
              for i in range(head, n - tail)}
    steepest = min(slopes, key=slopes.get)
    assert slopes[steepest] < 0
    assert result["suggested_lr"] == pytest.approx(lrs[steepest], rel=1e-12)
    assert START <= result["suggested_lr"] <= END
    lowest = min(range(n), key=smoothed.__getitem__)
    assert result["min_loss_lr"] == pytest.approx(lrs[lowest], rel=1e-12)
    assert result["second_opinion_lr"] == pytest.approx(lrs[lowest] / 10, rel=1e-12)
    assert f"suggested lr {lrs[steepest]:.1e} (steepest descent); set " in out
    assert result["stage"] == "all" and result["strategy"] == "discriminative"


def test_the_printed_override_sets_that_lr_when_transfer_train_takes_it(
        discriminative: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, out = discriminative
    suggested = json.loads((run_dir / "lr_find.json").read_text())["suggested_lr"]
    line = next(line for line in out.splitlines() if line.startswith("suggested lr"))
    printed = shlex.split(line.split("; set ", 1)[1].split(" (x ", 1)[0])  # as a shell passes them on
    assert len(printed) == 1 and printed[0].startswith("strategy.stages.0.lrs={")
    code, plan, err = command("train", *DISCRIMINATIVE, *printed, "dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}")
    assert code == 0, plan + err
    stage = next(line for line in plan.splitlines() if line.startswith("stage 1"))
    planned = {group: float(lr) for group, lr in re.findall(r"(\w+)@([0-9.e+-]+)", stage)}
    assert set(planned) == set(LESSON_LRS)
    for group, lr in LESSON_LRS.items():  # printed with 2 significant digits: within 5%
        assert planned[group] == pytest.approx(suggested * lr / LESSON_LRS["head"], rel=0.05)


@pytest.mark.parametrize("name", strategy_names())
def test_the_override_scales_the_first_stage_of_every_strategy_when_added_to_the_same_overrides(name: str) -> None:
    """Whatever form a strategy's first stage states its lrs in (a strategy lr, a stage lr, lr_decay, a per-group
    map, a stage picked by auto), the printed overrides appended to the user's make each of its lrs 3x."""
    overrides = [*SMALL, f"strategy={name}"]

    def first_stage(cfg):
        strategy, choice = choose_by_size(cfg.strategy, cfg.dataset.train_size, cfg.dataset.domain)
        model = build_model(cfg.backbone, cfg.head, 3, pretrained=False)
        return strategy, choice, plan_stages(strategy, model, cfg.trainer.epochs, cfg.optimizer.lr_scale)[0].lrs

    strategy, choice, before = first_stage(compose(overrides).config)
    printed = first_stage_overrides(strategy, bool(choice), 3.0)
    assert bool(choice) == (name == "auto") == printed[0].startswith("strategy=")
    _, _, after = first_stage(compose([*overrides, *printed]).config)
    assert after == pytest.approx({group: 3.0 * lr for group, lr in before.items()}, rel=0.05)


def test_the_printed_map_keeps_selector_and_dotted_keys_whole() -> None:
    """`last:1` and `blocks.6` survive Hydra's override grammar (a per-key override would split them)."""
    stage = StageConfig(name="s", epochs=1, lrs={"head": 1e-3, "last:1": 1e-4, "blocks.6": 2e-5})
    (printed,) = first_stage_overrides(StrategyConfig(name="custom", stages=[stage]), False, 3.0)
    (passed,) = shlex.split(shlex.join([printed]))
    override = OverridesParser.create().parse_override(passed)
    assert override.key_or_group == "strategy.stages.0.lrs"
    assert override.value() == pytest.approx({"head": 3e-3, "last:1": 3e-4, "blocks.6": 6e-5}, rel=0.05)


def test_the_directory_holds_no_run_for_report_resume_or_train(
        discriminative: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = discriminative
    assert {path.name for path in run_dir.iterdir()} == {".lock", "config.yaml", "lr_find.csv", "lr_find.json",
                                                          "lr_find.png"}
    assert (run_dir / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    assert not is_run_dir(run_dir)
    with pytest.raises(TransferError, match="no run directories"):
        find_run_dirs([run_dir])
    write_run(tmp_path / "trained", "feature_extract", 0, [0.5, 0.6], finished=True)
    (tmp_path / "found").symlink_to(run_dir)
    assert find_run_dirs([tmp_path]) == [tmp_path / "trained"]  # report passes the range test by
    before = tree_snapshot(run_dir)
    for argv in (["resume", str(run_dir)], ["eval", str(run_dir)], ["train", *SMALL, f"hydra.run.dir={run_dir}"]):
        code, out, err = command(*argv)
        assert "lr range test" in one_error_line(code, err, out=out)
    assert tree_snapshot(run_dir) == before


def test_frozen_groups_and_their_batchnorm_statistics_stay_as_they_were(tmp_path: Path) -> None:
    seen = {}

    def capture(runner):
        seen["model"] = runner.model
        seen["params"] = {name: p.detach().clone() for name, p in runner.model.named_parameters()}
        seen["buffers"] = {name: b.detach().clone() for name, b in runner.model.named_buffers()}
        return runner

    cfg = compose(DISCRIMINATIVE).config
    curve = find_lr(cfg, tmp_path, RangeTest(1e-4, 1e-1, 12), adapt_runner=capture)
    assert len(curve.losses) == 12
    model = seen["model"]
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    stem = params_of(build_model(cfg.backbone, cfg.head, 3, pretrained=False), "stem")  # the frozen group
    assert stem and all(torch.equal(params[name], seen["params"][name]) for name in stem)
    stem_stats = [name for name in buffers if name.rsplit(".", 1)[0] in {p.rsplit(".", 1)[0] for p in stem}]
    assert stem_stats and all(torch.equal(buffers[name], seen["buffers"][name]) for name in stem_stats)
    # the trained groups did move, BatchNorm statistics included: the checks above could fail
    assert not torch.equal(params["fc.weight"], seen["params"]["fc.weight"])
    layer1_stats = [name for name in buffers if name.startswith("layer1.") and name.endswith("running_mean")]
    assert any(not torch.equal(buffers[name], seen["buffers"][name]) for name in layer1_stats)


def test_a_huge_end_lr_stops_the_test_on_divergence(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out, err = command("lr-find", "--start-lr", "1e-3", "--end-lr", "1e8", "--steps", "60", *SMALL,
                             f"hydra.run.dir={run_dir}")
    assert code == 0, out + err
    result = json.loads((run_dir / "lr_find.json").read_text())
    rows = read_curve(run_dir)
    assert 10 <= result["steps_run"] == len(rows) < 60
    assert "4x its best" in result["stop_reason"] or "non-finite" in result["stop_reason"]
    if "4x" in result["stop_reason"]:
        assert rows[-1]["smoothed_loss"] > 4 * min(row["smoothed_loss"] for row in rows[:-1])
    assert rows[-1]["lr/head"] < 1e8


def test_divergence_before_ten_points_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out, err = command("lr-find", "--start-lr", "1e4", "--end-lr", "1e9", "--steps", "10", *SMALL,
                             f"hydra.run.dir={run_dir}")
    line = one_error_line(code, err, "too few points", out=out)
    assert "lower --start-lr" in line
    assert not run_dir.exists()


def test_a_loss_that_never_falls_suggests_nothing() -> None:
    test = RangeTest(1e-5, 1e-1, 30)
    curve = LrCurve("head", {"head": 1e-3}, test, compose(SMALL).config.strategy)
    for step in range(test.steps):
        curve.record({"head": test.lr_at(step)}, 1.0 + 0.01 * step)
    with pytest.raises(TransferError, match="never falls"):
        suggest(curve)
    falling = LrCurve("head", {"head": 1e-3}, test, curve.strategy)
    for step in range(test.steps):  # the raw loss drops fastest at step 20: its smoothed curve, a little later
        falling.record({"head": test.lr_at(step)}, 2.0 - math.tanh(step - 20))
    found = suggest(falling)
    assert 20 < found.index <= 28 and found.lr == pytest.approx(test.lr_at(found.index), rel=1e-12)


def test_the_python_api_runs_the_command_and_returns_its_result(tmp_path: Path) -> None:
    import transfer_cli

    result = transfer_cli.lr_find(SMALL, run_dir=tmp_path / "api", start_lr=1e-4, end_lr=1.0, steps=10)
    assert result["run_dir"] == str(tmp_path / "api")
    written = json.loads((tmp_path / "api" / "lr_find.json").read_text())
    assert {key: result[key] for key in written} == written
    assert result["line"].startswith(f"suggested lr {written['suggested_lr']:.1e} (steepest descent); set ")
    with pytest.raises(TransferError, match="drop -m"):
        transfer_cli.lr_find(["-m", *SMALL], run_dir=tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args, says", [
    (["--start-lr", "1e-2", "--end-lr", "1e-2"], "must be above --start-lr"),
    (["--start-lr", "1", "--end-lr", "0.1"], "must be above --start-lr"),
    (["--start-lr", "0"], "positive, finite"),
    (["--steps", "9"], "at least 10"),
    (["-m", "strategy=gradual,lp_ft"], "drop -m"),
    (["hydra.mode=MULTIRUN"], "drop -m"),
    (["--steps", "ten"], "invalid int value"),
])
def test_bad_options_are_one_line_errors_that_write_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    code, out, err = command("lr-find", *args, *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    one_error_line(code, err, says, out=out)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_installed_command_refuses_a_sweep_in_one_line(tmp_path: Path) -> None:
    done = transfer("lr-find", "-m", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    one_error_line(done.returncode, done.stderr, "drop -m", out=done.stdout)


def test_a_second_process_on_the_directory_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with runlock.acquire(run_dir, "another lr-find"):
        before = tree_snapshot(run_dir)
        code, out, err = command("lr-find", "--steps", "10", *SMALL, f"hydra.run.dir={run_dir}")
        one_error_line(code, err, "is being written by `another lr-find`", out=out)
        assert tree_snapshot(run_dir) == before


@pytest.mark.slow
def test_the_same_seed_gives_the_same_curve_and_another_seed_another(tmp_path: Path) -> None:
    curves = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        code, out, err = command("lr-find", "--steps", "12", *SMALL, f"trainer.seed={seed}",
                                 f"hydra.run.dir={tmp_path / name}")
        assert code == 0, out + err
        curves[name] = read_curve(tmp_path / name)
    assert curves["a"] == curves["b"]
    assert [row["loss"] for row in curves["a"]] != [row["loss"] for row in curves["c"]]
