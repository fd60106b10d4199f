"""`transfer report`: run dirs written by hand (two strategies x two seeds, an unfinished and a
failed run), plus one end-to-end report on a real tiny sweep."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transfer_cli.cli import main
from transfer_cli.runs import report, report_runs

from conftest import REPO
from helpers import parse_markdown, write_run


FIGURES = {  # dir -> (strategy, seed, val acc per epoch, finished)
    "0": ("feature_extract", 0, [0.5, 0.6], True),
    "1": ("feature_extract", 1, [0.7, 0.65], True),
    "2": ("fine_tune", 0, [0.6, 0.8, 0.8], True),
    "3": ("fine_tune", 1, [0.9, 0.7, 0.85], True),
    "4": ("fine_tune", 2, [0.3, 0.4], False),
}
@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Six runs: 2 strategies x 2 seeds finished, one unfinished (cut-off last line), one failed."""
    root = tmp_path / "sweep"
    for name, (strategy, seed, accs, finished) in FIGURES.items():
        write_run(root / name, strategy, seed, accs, finished)
    with open(root / "4" / "metrics.jsonl", "a", encoding="utf-8") as file:
        file.write('{"epoch": 3, "stage": "al')  # the process died mid-write
    write_run(root / "5", "fine_tune", 3, None, finished=False)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def run_report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rows_show_differing_keys_grouped_seeds_and_every_status(sweep: Path, capsys) -> None:
    code, out, _ = run_report(capsys, str(sweep))
    assert code == 0
    rows = parse_markdown(out.strip())
    assert [row["run"] for row in rows] == ["0, 1", "2, 3", "4", "5"]
    # what every row shares is one line above the table; the columns are the keys that differ (strategy.lr follows
    # from the strategy choice) and each row's stages
    assert out.splitlines()[:2] == ["Shared: backbone.name=test_resnet, dataset.name=synthetic, trainer.epochs=3", ""]
    assert list(rows[0])[:4] == ["strategy.name", "trainer.seed", "stages", "n"]
    fe, ft, unfinished, failed = rows
    assert fe == {"strategy.name": "feature_extract", "trainer.seed": "0, 1", "stages": "head 2", "n": "2",
                  "val acc (best.pt)": "0.6500 ± 0.0707", "chosen on (acc)": "select: 0.6500 ± 0.0707",
                  "final val acc": "0.6250 ± 0.0354", "epochs": "2",
                  "wall time (s)": "20.5 ± 0.7", "trainable params": "100", "status": "finished", "run": "0, 1"}
    assert ft["val acc (best.pt)"] == "0.8500 ± 0.0707" and ft["final val acc"] == "0.8250 ± 0.0354"
    assert ft["trainable params"] == "5,000"  # the largest per-stage count
    assert ft["stages"] == "head 2 → all 1"
    assert unfinished == {"strategy.name": "fine_tune", "trainer.seed": "2", "stages": "head 2", "n": "1",
                          "val acc (best.pt)": "0.4000 (selected on val)", "chosen on (acc)": "val: 0.4000",
                          "final val acc": "0.4000", "epochs": "2", "wall time (s)": "-",
                          "trainable params": "-", "status": "unfinished", "run": "4"}
    assert failed["status"] == "failed" and failed["val acc (best.pt)"] == failed["epochs"] == failed["stages"] == "-"
    assert (sweep / "results.md").read_text().strip() == out.strip()


def test_csv_has_raw_means_sample_stds_and_all_differing_keys(sweep: Path, capsys) -> None:
    run_report(capsys, str(sweep))
    with open(sweep / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["status"] for row in rows] == ["finished", "finished", "unfinished", "failed"]
    ft = rows[1]
    assert ft["strategy.lr"] == "1e-05" and ft["n"] == "2" and ft["runs"] == "2, 3"
    assert float(ft["reported_val_acc"]) == pytest.approx(0.85)
    assert float(ft["reported_val_acc_std"]) == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert float(ft["wall_time_s"]) == pytest.approx(30.5)
    assert "dataset.root" not in rows[0]  # identical in every run
    assert rows[2]["reported_val_acc_std"] == "" and rows[3]["reported_val_acc"] == ""


def test_epochs_md_gives_each_rows_val_acc_per_epoch_with_every_seed(sweep: Path, capsys) -> None:
    run_report(capsys, str(sweep))
    lines = parse_markdown((sweep / "epochs.md").read_text())
    by_row: dict[str, list[dict[str, str]]] = {}
    for line in lines:
        by_row.setdefault(line["row"], []).append(line)
    fe, ft = by_row["strategy=feature_extract (n=2)"], by_row["strategy=fine_tune (n=2)"]
    assert [(line["epoch"], line["stage"], line["val acc (mean ± std)"], line["each run"]) for line in fe] == [
        ("1", "head", f"0.6000 ± {statistics.stdev([0.5, 0.7]):.4f}", "0.500 / 0.700"),
        ("2", "head", f"0.6250 ± {statistics.stdev([0.6, 0.65]):.4f}", "0.600 / 0.650")]
    assert [line["stage"] for line in ft] == ["head", "head", "all"]
    assert ft[2]["each run"] == "0.800 / 0.850" and ft[2]["val acc (mean ± std)"] == "0.8250 ± 0.0354"
    # the unfinished run has a row of its own (its torn last line not read); the failed one has no epochs
    unfinished = by_row["strategy=fine_tune (seed 2, unfinished)"]
    assert [(line["epoch"], line["each run"]) for line in unfinished] == [("1", "0.300"), ("2", "0.400")]
    assert set(by_row) == {"strategy=feature_extract (n=2)", "strategy=fine_tune (n=2)",
                           "strategy=fine_tune (seed 2, unfinished)"}


def test_out_option_and_nested_or_repeated_dirs(sweep: Path, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "report"
    code, out, _ = run_report(capsys, str(sweep), str(sweep / "2"), "--out", str(out_dir))
    assert code == 0
    assert len(parse_markdown(out.strip())) == 4  # sweep/2 is not counted twice
    assert {p.name for p in out_dir.iterdir()} == {"results.md", "results.csv", "epochs.md", "val_acc.png"}
    assert not (sweep / "results.md").exists()


def test_single_run_is_named_by_its_dir(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "runs" / "2024-01-01_10-00-00", "fine_tune", 0, [0.5], True)
    code, out, _ = run_report(capsys, str(tmp_path / "runs"))
    (row,) = parse_markdown(out.strip())
    assert code == 0 and row["run"] == "2024-01-01_10-00-00" and row["val acc (best.pt)"] == "0.5000"


def test_runs_are_found_in_natural_order_and_overridden_subkeys_are_shown(tmp_path: Path) -> None:
    write_run(tmp_path / "10", "feature_extract", 0, [0.5], True, lr=0.5)
    write_run(tmp_path / "9", "feature_extract", 0, [0.5], True, lr=0.1)
    write_run(tmp_path / "2", "fine_tune", 0, [0.5], True)
    found = report_runs.find_run_dirs([tmp_path])
    assert [p.name for p in found] == ["2", "9", "10"]
    runs = [report_runs.load_run(p) for p in found]
    assert report.shown_keys(runs, report.differing_keys(runs)) == ["strategy.name", "strategy.lr"]


ERRORS = {"missing": "does not exist", "empty": "no run directories under", "file": "is not a directory",
          "bad_json": "summary.json is not valid JSON", "out_is_file": "cannot write the report into"}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_mistakes_are_one_line_errors(tmp_path: Path, capsys, case: str) -> None:
    path, args = tmp_path / case, []
    if case == "empty":
        (path / "not_a_run").mkdir(parents=True)
        (path / "not_a_run" / "config.yaml").write_text("a: 1\n")  # no results, no .hydra/
    elif case == "file":
        path.write_text("x")
    elif case in ("bad_json", "out_is_file"):
        write_run(path / "0", "fine_tune", 0, [0.5], True)
        (tmp_path / "taken").write_text("x")
        args = ["--out", str(tmp_path / "taken")] if case == "out_is_file" else []
        if case == "bad_json":
            (path / "0" / "summary.json").write_text('{"reported_val_acc": 0.')
    code, out, err = run_report(capsys, str(path), *args)
    assert code == 2 and out == ""
    assert err.startswith("transfer: error: ") and ERRORS[case] in err
    assert len(err.strip().splitlines()) == 1


def test_config_falls_back_to_the_composed_hydra_config(tmp_path: Path) -> None:
    write_run(tmp_path / "0", "fine_tune", 0, [0.5], True)
    write_run(tmp_path / "1", "feature_extract", 0, [0.5], True)
    (tmp_path / "1" / "config.yaml").rename(tmp_path / "1" / ".hydra" / "config.yaml")
    runs = [report_runs.load_run(p) for p in report_runs.find_run_dirs([tmp_path])]
    assert runs[1].config["strategy.name"] == "feature_extract"
    assert report.differing_keys(runs) == ["strategy.name", "strategy.lr"]


@pytest.mark.parametrize(("args", "loaded"), [(["--help"], "False False"), ([], "False True")])
def test_report_never_imports_torch_and_matplotlib_only_to_plot(sweep: Path, args: list[str], loaded: str) -> None:
    code = (f"import contextlib, sys\nfrom transfer_cli.cli import main\n"
            f"with contextlib.suppress(SystemExit):\n    main(['report', {str(sweep)!r}, *{args!r}])\n"
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(loaded)
    assert ("usage: transfer report" in result.stdout) == bool(args)


def test_top_level_help_lists_report(capsys) -> None:
    assert main(["--help"]) == 0
    assert "report" in capsys.readouterr().out


@pytest.mark.slow
def test_report_on_a_real_sweep(tmp_path: Path, hydra_in_process: None) -> None:
    """A sweep trained in this process, reported by the installed command."""
    sweep = tmp_path / "sweep"
    overrides = ["experiment=smoke", "dataset.train_size=32", "dataset.val_size=16", "trainer.epochs=2",
                 "strategy=feature_extract,fine_tune", "trainer.seed=1,2", f"hydra.sweep.dir={sweep}"]
    assert main(["train", "-m", *overrides]) == 0
    result = subprocess.run([sys.executable, "-m", "transfer_cli", "report", str(sweep)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = parse_markdown(result.stdout.strip())
    # seeds of one strategy differ in nothing else, so they share a row
    assert [(r["strategy.name"], r["trainer.seed"], r["n"], r["status"]) for r in rows] == [
        ("feature_extract", "1, 2", "2", "finished"), ("fine_tune", "1, 2", "2", "finished")]
    summaries = [json.loads((sweep / job / "summary.json").read_text()) for job in ("0", "1")]
    mean = statistics.mean(s["reported_val_acc"] for s in summaries)
    assert rows[0]["val acc (best.pt)"].split(" ± ")[0] == f"{mean:.4f}"
    assert all((sweep / name).is_file() for name in ("results.md", "results.csv", "epochs.md", "val_acc.png"))


def test_machinery_is_not_a_difference_between_experiments(tmp_path: Path, capsys) -> None:
    """Runs that differ only in how they ran (workers, device, loggers, cache dirs) are one experiment: their seeds
    share a row, and no such key becomes a column."""
    root = tmp_path / "sweep"
    for name, seed, workers, device in (("0", 0, 0, "cpu"), ("1", 1, 4, "cuda")):
        write_run(root / name, "fine_tune", seed, [0.5, 0.6, 0.7], finished=True)
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        config["trainer"].update(num_workers=workers, device=device, cache_dir=f"/cache/{name}")
        config["logger"] = {"mlflow": {"tracking_uri": f"sqlite:///{name}.db"}} if workers else {}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    code, out, _ = run_report(capsys, str(root))
    rows = parse_markdown(out)
    assert code == 0 and len(rows) == 1 and rows[0]["n"] == "2"
    assert not [key for key in rows[0] if key.startswith(("trainer.num_workers", "trainer.device", "logger",
                                                           "trainer.cache_dir"))]


def test_curves_label_each_stage_span_and_tick_whole_epochs(tmp_path: Path, monkeypatch) -> None:
    from transfer_cli.runs import runlog

    records = [{"epoch": e, "stage": s, "train/loss": 1 / e, "val/loss": 1 / e, "train/acc1": 0.5, "val/acc1": 0.5}
               for e, s in zip(range(1, 6), ["head", "head", "last_block", "all", "all"])]
    assert runlog.stage_spans(records) == [("head", 1.5), ("last_block", 3.0), ("all", 4.5)]
    drawn = []
    monkeypatch.setattr(runlog, "save_figure", lambda figure, path: drawn.append(figure))
    runlog.plot_curves(records, tmp_path / "curves.png")
    for axis in drawn[0].axes:
        figure_text = [text.get_text() for text in axis.texts]
        assert figure_text == ["head", "last_block", "all"]
        ticks = [tick for tick in axis.get_xticks() if 1 <= tick <= 5]
        assert ticks and all(float(tick).is_integer() for tick in ticks)


def test_machinery_is_what_the_schema_marks() -> None:
    """The report hides the fields config/schema.py marks MACHINERY, and only those: a key added there is hidden
    without a list here to keep in step."""
    from transfer_cli.config.checks import MACHINERY
    from transfer_cli.config.schema import DatasetConfig, TrainConfig, TrainerConfig

    marked = {f"{prefix}.{spec.name}" for prefix, cls in (("trainer", TrainerConfig), ("dataset", DatasetConfig))
              for spec in dataclasses.fields(cls) if spec.metadata.get("machinery")}
    marked |= {spec.name for spec in dataclasses.fields(TrainConfig) if spec.metadata == MACHINERY}
    assert set(report.MACHINERY) == marked
    assert {"trainer.decode_on_device", "trainer.normalize_on_device", "trainer.num_workers", "logger"} <= marked
    assert report.is_machinery("logger.mlflow.experiment") and report.is_machinery("trainer.decode_on_device")
    assert not report.is_machinery("trainer.seed") and not report.is_machinery("trainer.devices")


def test_runs_that_differ_only_in_device_decoding_share_a_row(tmp_path: Path, capsys) -> None:
    root = tmp_path / "sweep"
    for name, seed, decode in (("0", 0, False), ("1", 1, True)):
        write_run(root / name, "fine_tune", seed, [0.5, 0.6, 0.7], finished=True)
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        config["trainer"].update(decode_on_device=decode, normalize_on_device="auto" if decode else "false")
        (root / name / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    code, out, _ = run_report(capsys, str(root))
    rows = parse_markdown(out)
    assert code == 0 and len(rows) == 1 and rows[0]["n"] == "2"
    assert not [key for key in rows[0] if "on_device" in key]


def test_each_row_states_its_stage_rates_as_they_ran_peak_and_mean(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "fine_tune", 0, [0.5, 0.6, 0.7], True)
    write_run(tmp_path / "b", "feature_extract", 0, [0.5, 0.6, 0.7], True)
    stages = {"a": [{"name": "head", "peak_lrs": {"head": 1e-3}, "mean_lrs": {"head": 4.8e-4}},
                    {"name": "all", "peak_lrs": {"stem": 1e-5, "head": 1e-3},
                     "mean_lrs": {"stem": 4.9e-6, "head": 4.9e-4}},
                    {"name": "never", "peak_lrs": None, "mean_lrs": None}],
              "b": [{"name": "head", "peak_lrs": {"head": "fast"}, "mean_lrs": {"head": 1e-3}}]}
    for name, listed in stages.items():
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        (tmp_path / name / "summary.json").write_text(json.dumps(summary | {"stages": listed}))
    table, _ = report.build_report([tmp_path], tmp_path / "out")
    rows = {row["strategy.name"]: row for row in parse_markdown(table.split("\n\n", 1)[1])}
    assert rows["fine_tune"]["lr peak / mean"] == "1.0e-03 / 4.8e-04 → 1.0e-05–1.0e-03 / 4.9e-06–4.9e-04"
    assert rows["feature_extract"]["lr peak / mean"] == "- / 1.0e-03"  # a rate that is no number is not shown
    with (tmp_path / "out" / "results.csv").open() as file:
        assert {row["strategy.name"]: row["lr_peak_mean"] for row in csv.DictReader(file)}["fine_tune"] == \
            rows["fine_tune"]["lr peak / mean"]
