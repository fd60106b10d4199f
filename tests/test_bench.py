"""`transfer bench`: the quick workload writes a complete bench.json; the GPU part without CUDA.

No test here asserts a timing target: the machine is shared and noisy. `make bench` checks them.
The quick bench starts four Python processes that import torch (20-40 s on 2 cores): slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfer_cli.benchmarks import cpu as bench
from transfer_cli.benchmarks import gpu as bench_gpu
from transfer_cli.benchmarks.loader import table_rows

from conftest import REPO


NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """bench.json and stdout of `transfer bench --quick`, run once for the module."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "transfer_cli", "bench", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), done.stdout


@pytest.mark.slow
def test_quick_bench_writes_every_figure(quick: tuple[dict, str]) -> None:
    report, _ = quick
    figures = ("train_throughput_ratio", "ours_images_per_s", "reference_images_per_s", "feature_cache_speedup",
               "uncached_seconds", "cached_seconds", "help_seconds", "peak_rss_mb", "total_seconds")
    for key in figures:
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["quick"] is True and report["timestamp"]
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] == torch.__version__ and machine["device"] == "cpu"


@pytest.mark.slow
def test_ratios_are_the_raw_figures_divided(quick: tuple[dict, str]) -> None:
    report, _ = quick
    assert report["train_throughput_ratio"] == pytest.approx(report["ours_images_per_s"]
                                                             / report["reference_images_per_s"])
    assert report["feature_cache_speedup"] == pytest.approx(report["uncached_seconds"] / report["cached_seconds"])
    loop = report["loop"]
    assert len(loop["ours_runs"]) == len(loop["reference_runs"]) == report["workload"]["loop_rounds"]
    assert min(loop["ours_runs"]) <= report["ours_images_per_s"] <= max(loop["ours_runs"])


@pytest.mark.slow
def test_feature_cache_runs_compare_the_same_training(quick: tuple[dict, str]) -> None:
    cache = quick[0]["feature_cache"]
    epochs = quick[0]["workload"]["cache_epochs"]
    assert cache["uncached"]["epochs_run"] == epochs and cache["uncached"]["cache_files"] == 0
    for run in cache["cached"]:  # a fresh cache each: it paid for train and val features
        assert run["epochs_run"] == epochs and run["cache_files"] == 3  # train, val and the selection split
    assert quick[0]["peak_rss_mb"] == max(r["peak_rss_mb"] for r in [cache["uncached"], *cache["cached"]])


@pytest.mark.slow
def test_targets_are_recorded_and_printed(quick: tuple[dict, str]) -> None:
    report, stdout = quick
    for name, (op, threshold) in bench.TARGETS.items():
        check = report["targets"][name]
        line = next(line for line in stdout.splitlines() if line.startswith(name))
        if isinstance(report[name], str):  # a race without its inputs (none given here): skipped, not failed
            assert report[name].startswith("skipped: ") and check["skipped"] == report[name]
            assert check["met"] is None and report[name] in line and line.endswith("skipped")
            continue
        assert check["value"] == report[name]
        assert check["met"] == (report[name] >= threshold if op == ">=" else report[name] < threshold)
        assert check["target"] in line and ("pass" if check["met"] else "FAIL") in line
    assert report["all_targets_met"] == all(c["met"] is not False for c in report["targets"].values())


@pytest.mark.slow
def test_new_figures_are_recorded_per_model_and_in_one_run(quick: tuple[dict, str]) -> None:
    report, _ = quick
    assert report["feature_cache_fraction_of_bound"] == pytest.approx(
        report["feature_cache_speedup"] / report["workload"]["cache_epochs"])
    models = [model for model, _ in report["workload"]["checkpoint_models"]]
    assert sorted(report["checkpoint_bytes_per_epoch"]) == sorted(models) == ["test_resnet", "test_vit"]
    for figure in report["checkpoint_bytes_per_epoch"].values():
        assert 0 < figure["bytes_per_epoch"] < figure["full_model_bytes_per_epoch"] and figure["frozen_file_bytes"] > 0
        assert figure["reduction"] == pytest.approx(figure["full_model_bytes_per_epoch"] / figure["bytes_per_epoch"])
    per_model = report["checkpoint_bytes_per_epoch"].values()
    assert report["checkpoint_bytes_reduction"] == min(figure["reduction"] for figure in per_model)
    first = report["first_step"]["runs"][0]
    assert 0 < first["import_torch_s"] < report["time_to_first_step_s"]
    assert first["unneeded_modules_loaded"] == []  # plots, trackers, exporters: imported when used, not before


@pytest.mark.slow
def test_the_loader_child_times_each_workloads_loader_with_and_without_reduced_decoding(
        quick: tuple[dict, str]) -> None:
    """The loader figures come from a child process of their own: every workload's loader, timed with and without
    reduced-size decoding, its model, and the 224 px eval loader."""
    result = quick[0]["loader"]
    assert result["photos"] == bench.QUICK.loader_photos
    assert set(result["workloads"]) == {"loop", "feature_cache"}
    for name, figures in [*result["workloads"].items(), ("resize_224", result["resize_224"])]:
        assert figures["draft_images_per_s"] > 0 and figures["full_images_per_s"] > 0, name
        # 8 photos a class, a quarter of each held out for val and one more to select on: not timed
        assert figures["images"] == 10
        assert "decode=DecodePlan" in figures["transform"], name  # the timed loader was the reduced one
        assert "transforms.draft_decode" not in " ".join(figures["overrides"])  # the child sets it, both ways
    for figures in result["workloads"].values():
        assert figures["model_train_images_per_s"] > 0
    assert "image_size=224" in " ".join(result["resize_224"]["overrides"])


@pytest.mark.slow
def test_the_loader_figures_are_reported_and_printed(quick: tuple[dict, str]) -> None:
    report, stdout = quick
    assert report["draft_decode_speedup"] > 0
    rows = table_rows(report)
    assert len(rows) == 6
    for name, value in rows:  # each a line of the printed table
        assert any(line.startswith(name) and value in line for line in stdout.splitlines()), (name, value)


@pytest.mark.slow
def test_help_is_timed_and_does_not_import_torch(quick: tuple[dict, str]) -> None:
    report, _ = quick
    assert len(report["help_runs"]) == report["workload"]["help_runs"]
    assert report["help_imports_torch"] is False


@pytest.mark.slow
def test_import_probe_sees_torch_where_it_is_imported() -> None:
    assert "transfer_cli.cli" in bench.imported_modules(["-m", "transfer_cli", "--help"])
    assert "torch" in bench.imported_modules(["-c", "import torch"])


@pytest.mark.slow
@pytest.mark.skipif(not NO_CUDA, reason="CUDA is present: the GPU section measures instead")
def test_quick_bench_reports_gpu_unavailable(quick: tuple[dict, str]) -> None:
    assert quick[0]["gpu"]["available"] is False and "no CUDA" in quick[0]["gpu"]["reason"]
    assert "gpu: no CUDA device" in quick[1]


@pytest.mark.skipif(not NO_CUDA, reason="CUDA is present: the GPU benchmark would run")
def test_gpu_bench_without_cuda_says_so_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transfer_cli.cli import main

    assert main(["bench", "--gpu", "--out", str(tmp_path)]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "bench_gpu.json").exists()


@pytest.fixture
def one_thread() -> None:
    """Tiny CPU workloads: one intra-op thread (two spinning threads on a busy 2-core machine crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_gpu_code_path_runs_on_cpu(one_thread: None) -> None:
    """The CUDA benchmark's code (prepare, StepRunner, JPEG loader), on CPU with a tiny workload."""
    result = bench_gpu.gpu_figures(device="cpu", models=("mobilenet_v3_small",), image_size=32, batch=4, warmup=1,
                               steps=2, jpegs=16)
    figures = result["models"]["mobilenet_v3_small"]
    assert result["available"] and figures["synthetic_images_per_s"] > 0 and figures["jpeg_images_per_s"] > 0
    assert figures["jpeg_decode_on_device_images_per_s"] > 0  # trainer.decode_on_device=true, on the CPU here
    assert figures["amp"] is None and figures["channels_last"] is True  # CPU: fp32, channels_last
    assert figures["jpeg_train_images"] < 16  # the folder's held-out share is not trained on
    assert "mobilenet_v3_small jpeg img/s" in bench.format_table({"gpu": result})


def test_cache_workload_is_sized_by_the_measured_forward_time() -> None:
    work = bench.FULL
    slow, fast = bench.cache_split_sizes(work, 100.0), bench.cache_split_sizes(work, 5.0)
    assert slow[0] < fast[0] and all(size % work.cache_batch == 0 for size in (slow[0], fast[0]))
    assert bench.cache_split_sizes(bench.QUICK, 5.0) == (bench.QUICK.cache_train, bench.QUICK.cache_val)


@pytest.mark.slow
def test_first_step_probe_sees_a_module_the_command_imports(tmp_path: Path) -> None:
    """The probe that says 'nothing unneeded was imported' can say otherwise: hydra is imported by the command
    (not by torch, torchvision or timm), matplotlib only after training."""
    import time

    from transfer_cli.benchmarks.costs import FIRST_STEP

    spec = {"spawned": time.time(), "unneeded": ["hydra", "matplotlib"],
            "args": ["experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"]}
    out = tmp_path / "first.json"
    subprocess.run([sys.executable, "-c", FIRST_STEP, json.dumps(spec), str(out)], cwd=REPO, timeout=300, check=True)
    result = json.loads(out.read_text())
    assert result["unneeded_modules_loaded"] == ["hydra"]
    assert result["time_to_first_step_s"] > result["import_torch_s"] > 0
    assert not (tmp_path / "run" / "summary.json").exists()  # stopped at its first step
