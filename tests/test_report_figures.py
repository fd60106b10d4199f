"""`transfer report`'s outputs ready to paste: val_acc.png with one colour per row (seeds as a mean and a min-max
band, stage starts ticked, the legend below the plot and inside the image), the "Shared:" line above the table and
each row's stages."""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from transfer_cli.cli import main
from transfer_cli.runs import report, report_figure, report_runs

from helpers import parse_markdown, write_run


LONG_ROOT = "/data/a/folder/with/a/rather/long/name/that/no/legend/could/hold/in/one/line"


def mixed_sweep(root: Path) -> dict[str, list[list[float]]]:
    """13 runs: three configurations with 3 seeds, four single runs whose dataset.root override makes long labels.
    Returns each row's val accuracies per seed, by the row's lr."""
    rows: dict[str, list[list[float]]] = {}
    index = 0
    for strategy, lr, seeds in (("fine_tune", 1e-5, 3), ("fine_tune", 3e-4, 3), ("feature_extract", 1e-3, 3),
                                ("feature_extract", 0.5, 1), ("fine_tune", 0.25, 1), ("feature_extract", 0.125, 1),
                                ("fine_tune", 0.0625, 1)):
        for seed in range(seeds):
            accs = [round(0.2 + 0.1 * seed + lr / 4, 4), round(0.4 + 0.05 * seed, 4), round(0.9 - 0.1 * seed, 4)]
            write_run(root / str(index), strategy, seed, accs, finished=True, lr=lr)
            if seeds == 1:
                set_config(root / str(index), "dataset", root=f"{LONG_ROOT}/{index}")
            rows.setdefault(str(lr), []).append(accs)
            index += 1
    return rows


def set_config(run_dir: Path, group: str, **values: Any) -> None:
    """Change config.yaml's `group` and record the keys as command-line overrides, as `transfer train` would."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config.setdefault(group, {}).update(values)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text())
    overrides_file.write_text(yaml.safe_dump(overrides + [f"{group}.{key}={v}" for key, v in values.items()]))


def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every figure saved from now on (saved for real, then kept for inspection)."""
    from matplotlib.figure import Figure

    saved: list[Any] = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), original(self, *a, **k))[1])
    return saved


def drawn(figure: Any) -> Any:
    """The renderer of `figure` drawn again as it was saved (Agg, at its dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def test_thirteen_mixed_runs_give_one_legend_entry_per_row_inside_the_saved_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    accs = mixed_sweep(tmp_path / "sweep")
    saved = saved_figures(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied" and any other warning fail
        table, _ = report.build_report([tmp_path / "sweep"], tmp_path / "out")
    (figure,) = saved
    legend = figure.legends[0]
    labels = [text.get_text() for text in legend.get_texts()]
    assert len(labels) == 7 == len(parse_markdown(table))  # one per row, never one per seed
    assert [label.split(", root=")[0] for label in labels] == [
        "strategy=fine_tune, lr=1e-05", "strategy=fine_tune, lr=0.0003", "strategy=feature_extract, lr=0.001",
        "strategy=feature_extract, lr=0.5", "strategy=fine_tune, lr=0.25", "strategy=feature_extract, lr=0.125",
        "strategy=fine_tune, lr=0.0625"]
    # long labels are cut, what the legend adds to them is kept whole
    assert [label.rsplit("… ", 1)[1] for label in labels] == ["(n=3)"] * 3 + ["(seed 0)"] * 4
    assert all(len(label.rsplit(" (", 1)[0]) == report_figure.LABEL_CHARS for label in labels)
    assert all(LONG_ROOT in line for line in table.splitlines()[-4:])  # the table keeps the full text

    # the legend lies below the plot and inside the image as saved
    renderer = drawn(figure)
    box = legend.get_window_extent(renderer)
    width, height = Image.open(tmp_path / "out" / "val_acc.png").size
    assert (width, height) == (round(figure.bbox.width), round(figure.bbox.height))
    assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height
    axis = figure.axes[0]
    assert box.y1 <= axis.get_tightbbox(renderer).y0 + 1, "below the plot and its axis labels, never over lines"

    # one colour per row; a 3-seed row is its mean with a min-max band of the same colour
    means = [line for line in axis.get_lines() if line.get_linestyle() == "-"]
    assert len(means) == 7 and len({line.get_color() for line in means}) == 7
    seeds = accs["1e-05"]
    assert list(means[0].get_ydata()) == pytest.approx([statistics.mean(epoch) for epoch in zip(*seeds)])
    bands = axis.collections
    assert len(bands) == 3
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(min(min(s) for s in seeds)) and max(ys) == pytest.approx(max(max(s) for s in seeds))
    assert tuple(bands[0].get_facecolor()[0][:3]) == pytest.approx(means[0].get_color()[:3])


def test_stage_starts_are_ticked_on_their_rows_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fine_tune's runs change from head to all at epoch 3 (write_run's stages): one tick there, in the row's
    colour, on its mean; feature_extract's single stage has none."""
    root = tmp_path / "sweep"
    for name, strategy, seed, accs in (("0", "feature_extract", 0, [0.5, 0.6, 0.7]),
                                       ("1", "fine_tune", 0, [0.6, 0.8, 0.8]), ("2", "fine_tune", 1, [0.7, 0.9, 0.6])):
        write_run(root / name, strategy, seed, accs, finished=True)
    saved = saved_figures(monkeypatch)
    report.build_report([root], tmp_path / "out")
    lines = saved[0].axes[0].get_lines()
    ticks = [line for line in lines if line.get_marker() == "|"]
    (tick,) = ticks
    (fine_tune,) = [line for line in lines if line.get_linestyle() == "-" and len(line.get_xdata()) == 3
                    and line.get_ydata()[0] == pytest.approx(0.65)]
    assert list(tick.get_xdata()) == [3] and list(tick.get_ydata()) == pytest.approx([0.7])
    assert tick.get_color() == fine_tune.get_color()


def test_a_row_draws_only_the_epochs_every_seed_reached() -> None:
    """A seed stopped early: the mean and band cover the epochs all seeds have, never a mean over fewer seeds."""
    runs = []
    for accs in ([0.5, 0.6, 0.7], [0.7, 0.8]):
        records = [{"epoch": e, "stage": "head", "val/acc1": acc} for e, acc in enumerate(accs, start=1)]
        runs.append(report_runs.Run(Path("x"), {}, [], records, "finished", report_runs.Figures()))
    curve = report_figure.curve(runs, "label")
    assert curve.epochs == [1, 2] and curve.mean == pytest.approx([0.6, 0.7])
    assert curve.band == (pytest.approx([0.5, 0.6]), pytest.approx([0.7, 0.8])) and curve.stage_starts == []
    assert report_figure.curve(runs[:1], "one run").band is None


def test_the_legend_is_capped_and_says_where_the_rest_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "sweep"
    for index in range(20):
        write_run(root / str(index), "fine_tune", 0, [0.5, 0.6, 0.7], finished=True, lr=(index + 1) / 1000)
    saved = saved_figures(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.build_report([root], tmp_path / "out")
    (figure,) = saved
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert len(labels) == report_figure.LEGEND_MAX
    assert labels[-1] == f"and {20 - report_figure.LEGEND_MAX + 1} more rows: see results.md"
    box = figure.legends[0].get_window_extent(drawn(figure))
    assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1 and figure.bbox.y0 <= box.y0


# --------------------------------------------------------------------------- the table: shared line, stages


HEADLINE = {"backbone.name": ("backbone", "name", "test_resnet", "test_vit"),
            "dataset.name": ("dataset", "name", "synthetic", "folder"),
            "trainer.epochs": ("trainer", "epochs", 3, 5),
            "transforms.image_size": ("transforms", "image_size", 32, 64)}


@pytest.mark.parametrize("key", list(HEADLINE))
@pytest.mark.parametrize("differs", [False, True])
def test_a_key_every_row_shares_is_on_the_shared_line_and_one_that_differs_a_column(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, differs: bool) -> None:
    group, leaf, first, second = HEADLINE[key]
    root = tmp_path / "sweep"
    for name, strategy in (("0", "feature_extract"), ("1", "fine_tune")):
        write_run(root / name, strategy, 0, [0.5, 0.6], finished=True)
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        config.setdefault(group, {})[leaf] = second if differs and name == "1" else first
        (root / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    shared, blank = out.splitlines()[:2]
    columns = list(parse_markdown(out)[0])
    assert shared.startswith("Shared: ") and blank == ""
    assert (f"{key}={first}" in shared) is not differs
    assert (key in columns) is differs
    assert "strategy.name" in columns and "strategy.name" not in shared
    assert "trainer.device" not in shared  # machinery: how a run ran, never what it is
    assert "dataset.root" not in shared  # the same everywhere, but neither a choice nor an override
    assert (root / "results.md").read_text().startswith(shared + "\n\n| ")


def test_overridden_keys_every_row_shares_are_named_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "sweep"
    for name, seed in (("0", 0), ("1", 1)):
        write_run(root / name, "fine_tune", seed, [0.5, 0.6, 0.7], finished=True, lr=0.01)
        set_config(root / name, "optimizer", lr_scale=2.0)
    assert main(["report", str(root)]) == 0
    shared = capsys.readouterr().out.splitlines()[0]
    assert shared == ("Shared: backbone.name=test_resnet, strategy.name=fine_tune, strategy.lr=0.01, "
                      "dataset.name=synthetic, trainer.epochs=3, optimizer.lr_scale=2.0, stages=head 2 → all 1")


def relabel(run_dir: Path, stages: list[str]) -> None:
    """Give the run's epochs these stage names, as if its strategy had them."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    records = [{**records[i % len(records)], "epoch": i + 1, "stage": stage} for i, stage in enumerate(stages)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_each_row_names_its_stages_with_their_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stage names and epochs come from each run's metrics.jsonl (relabelled here), seeds that ran the same plan
    share one; where every row ran the same stages the column leaves for the shared line."""
    root = tmp_path / "sweep"
    for name, strategy, seed in (("0", "feature_extract", 0), ("1", "fine_tune", 0), ("2", "fine_tune", 1)):
        write_run(root / name, strategy, seed, [0.5, 0.6, 0.7], finished=True)
    relabel(root / "0", ["head"] * 3)
    for name in ("1", "2"):
        relabel(root / name, ["head", "top", "top", "all", "all", "all", "all", "all"])
    assert main(["report", str(root)]) == 0
    rows = parse_markdown(capsys.readouterr().out)
    assert [(row["strategy.name"], row["stages"]) for row in rows] == [
        ("feature_extract", "head 3"), ("fine_tune", "head 1 → top 2 → all 5")]

    relabel(root / "0", ["head", "all", "head"])  # a stage that comes back is named again
    relabel(root / "2", ["head", "top", "all"])  # a seed that ran otherwise (early stopping): both are named
    assert main(["report", str(root)]) == 0
    rows = parse_markdown(capsys.readouterr().out)
    assert [row["stages"] for row in rows] == ["head 1 → all 1 → head 1",
                                               "head 1 → top 2 → all 5, head 1 → top 1 → all 1"]

    for name in ("0", "1", "2"):
        relabel(root / name, ["head", "head", "all"])
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(", stages=head 2 → all 1")
    assert "stages" not in parse_markdown(out)[0]
