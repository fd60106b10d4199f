"""`transfer bench`'s races against other tools, with a stand-in for timm's train.py (a tiny script that logs and
writes summary.csv as timm's does), tiny models and generated photos: parsing, skipping, the ratios and the
per-process figures, without running timm's real script. `make bench` runs the real race."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from transfer_cli.benchmarks.cpu import child_env
from transfer_cli.benchmarks.inputs import BenchInputs
from transfer_cli.benchmarks.peers import (
    LITE0_RACE,
    QUICK_RACE,
    race_timm,
    timm_command,
    timm_eval_seconds,
    timm_train_seconds,
)
from transfer_cli.benchmarks.probe import NO_SKLEARN, QUICK_PROBE, race_probe
from transfer_cli.benchmarks.process import timed_command
from transfer_cli.benchmarks.races import race_check, race_rows

from helpers import write_split_folders


# timm's train.py as far as the race reads it: progress lines whose last one per epoch carries the epoch's mean
# step time, and summary.csv in OUTPUT/EXPERIMENT with eval_top1 in percent. FAKE_* variables bend it.
FAKE_TIMM = """
import argparse, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("data")
parser.add_argument("--output")
parser.add_argument("--experiment")
parser.add_argument("--epochs", type=int)
args, _ = parser.parse_known_args()
out = os.path.join(args.output, args.experiment)
os.makedirs(out)
with open(os.path.join(out, "argv.json"), "w") as file:
    import json
    json.dump(sys.argv[1:], file)
held = bytearray(int(os.environ.get("FAKE_HOLD_MB", "0")) * 2**20)  # resident: every page written
held[::4096] = b"x" * len(held[::4096])
logged = int(os.environ.get("FAKE_LOGGED_EPOCHS", args.epochs))
with open(os.path.join(out, "summary.csv"), "w") as summary:
    summary.write("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\\n")
    for epoch in range(args.epochs):
        print(f"Train: {epoch} [   0/2 ( 50%)]  Loss: 0.7 (0.7)  Time: 0.500s,   16.00/s  (0.500s,   16.00/s)")
        if epoch < logged:
            print(f"Train: {epoch} [   1/2 (100%)]  Loss: 0.7 (0.7)  Time: 0.300s,   26.67/s  (0.400s,   20.00/s)")
        print("Test: [   0/1]  Time: 0.300 (0.300)  Loss:   0.6 ( 0.6)  Acc@1:  62.500 ( 62.500)")
        print("Test: [   1/1]  Time: 0.200 (0.250)  Loss:   0.6 ( 0.6)  Acc@1:  62.500 ( 62.500)")
        if os.environ.get("FAKE_NO_ROWS") is None:
            summary.write(f"{epoch},0.7,0.6,{os.environ.get('FAKE_TOP1', '62.5')},100.0,0.0001\\n")
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """train/ and val/ with two classes of 8 tiny images each (16 train images: two steps of 8)."""
    root = tmp_path / "photos"
    write_split_folders(root)
    return root


@pytest.fixture
def fake_timm(tmp_path: Path) -> Path:
    script = tmp_path / "train.py"
    script.write_text(FAKE_TIMM)
    return script


def _race(fake_timm: Path, photos: Path, tmp: Path, **env: str) -> dict | str:
    return race_timm(QUICK_RACE, BenchInputs(str(fake_timm), str(photos)), tmp, {**child_env(), **env})


@pytest.mark.slow
def test_the_race_reports_both_sides_from_their_own_files(fake_timm: Path, photos: Path, tmp_path: Path) -> None:
    """Both processes really ran: timm's figures are what its files say, ours what our run directory says, and the
    ratio is the two wall times divided; each side's peak RSS is its own (the stand-in holds 300 MB)."""
    race = _race(fake_timm, photos, tmp_path / "race", FAKE_TOP1="62.5", FAKE_HOLD_MB="300")
    timm, ours = race["timm"], race["transfer"]
    assert timm["val_acc1"] == 0.625
    assert timm["train_images_per_s"] == pytest.approx(16 / (2 * 0.400))  # 2 steps of 8 in 2 x 0.4 s
    assert timm["val_seconds"] == pytest.approx([2 * 0.250])  # 2 batches, 0.25 s each on average
    run_dir = tmp_path / "race" / "transfer-run"
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert ours["val_acc1"] == summary["final_val_acc"] == records[-1]["val/acc1"]
    assert ours["train_images_per_s"] == pytest.approx(records[-1]["train/images_per_s"])
    assert ours["train_seconds"] == [records[-1]["train/seconds"]]
    assert ours["val_seconds"] == [records[-1]["val/seconds"]]
    assert race["ratio"] == pytest.approx(ours["seconds"] / timm["seconds"])
    assert race["accuracy_diff"] == pytest.approx(ours["val_acc1"] - 0.625)
    assert timm["peak_rss_mb"] >= 300 > 0 < ours["peak_rss_mb"]
    argv = json.loads((tmp_path / "race" / "timm" / "peer" / "argv.json").read_text())
    for flag in (["--lr", "0.0001"], ["--weight-decay", "0.01"], ["--sched-on-updates"], ["--warmup-epochs", "0"],
                 ["--scale", "0.08", "1"], ["--train-interpolation", "bicubic"], ["--seed", "42"]):
        assert any(argv[i:i + len(flag)] == flag for i in range(len(argv))), flag
    assert "--pretrained" not in argv  # QUICK's model has no weights; LITE0_RACE's does
    assert "--pretrained" in timm_command(LITE0_RACE, str(fake_timm), str(photos), tmp_path)
    for override in ("scheduler.warmup_pct=0", "trainer.epochs=1", "optimizer.weight_decay=0.01"):
        assert override in ours["overrides"]


@pytest.mark.parametrize(("env", "message"), [({"FAKE_EXIT": "3"}, r"timm train.py failed \(exit 3\)"),
                                              ({"FAKE_LOGGED_EPOCHS": "0"}, "shows 0 finished epochs"),
                                              ({"FAKE_NO_ROWS": "1"}, "no eval_top1 row")])
def test_a_peer_that_fails_or_leaves_torn_output_is_an_error_not_a_figure(
        fake_timm: Path, photos: Path, tmp_path: Path, env: dict[str, str], message: str) -> None:
    """Each is caught before our side runs: no run directory of ours."""
    with pytest.raises(RuntimeError, match=message):
        _race(fake_timm, photos, tmp_path / "race", **env)
    assert not (tmp_path / "race" / "transfer-run").exists()


def test_missing_inputs_skip_the_race_saying_why(fake_timm: Path, photos: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRANSFER_PEER_TIMM", raising=False)
    env = child_env()
    no_peer = race_timm(QUICK_RACE, BenchInputs(None, str(photos)), tmp_path, env)
    assert no_peer.startswith("skipped: no peer script") and "--peer-timm" in no_peer
    gone = race_timm(QUICK_RACE, BenchInputs(str(tmp_path / "nowhere.py"), str(photos)), tmp_path, env)
    assert gone == f"skipped: peer script {tmp_path / 'nowhere.py'} not found"
    (tmp_path / "empty" / "train").mkdir(parents=True)
    no_photos = race_timm(QUICK_RACE, BenchInputs(str(fake_timm), str(tmp_path / "empty")), tmp_path, env)
    assert no_photos.startswith("skipped: no images in") and "train" in no_photos
    no_weights = race_timm(LITE0_RACE, BenchInputs(str(fake_timm), str(photos), str(tmp_path / "hf")), tmp_path, env)
    assert no_weights.startswith("skipped: no tf_efficientnet_lite0.in1k weights")
    assert str(tmp_path / "hf") in no_weights
    assert not (tmp_path / "timm.log").exists()  # nothing ran
    check = race_check(no_peer, "<=", 1.0)
    assert check["met"] is None and check["skipped"] == no_peer
    assert ("peer_timm_fine_tune", no_peer) in race_rows({"peer_timm_fine_tune": no_peer})


def test_the_inputs_come_from_options_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFER_PEER_TIMM", "/env/train.py")
    monkeypatch.setenv("TRANSFER_BENCH_PHOTOS", "/env/photos")
    monkeypatch.setenv("HF_HOME", "/env/hf")
    assert BenchInputs.resolve(None, None, None) == BenchInputs("/env/train.py", "/env/photos", "/env/hf")
    assert BenchInputs.resolve("a.py", "b", "c") == BenchInputs("a.py", "b", "c")
    assert BenchInputs.resolve(None, None, None).env({})["HF_HUB_OFFLINE"] == "1"


def test_a_race_counts_only_at_the_same_accuracy() -> None:
    fast_but_worse = {"ratio": 0.8, "accuracy_met": False, "accuracy_rule": "|transfer - timm| <= 0.02",
                      "accuracy_diff": -0.05}
    assert race_check(fast_but_worse, "<=", 1.0)["met"] is False
    assert race_check({**fast_but_worse, "accuracy_met": True}, "<=", 1.0)["met"] is True
    assert race_check({**fast_but_worse, "accuracy_met": True, "ratio": 1.01}, "<=", 1.0)["met"] is False


def test_timm_training_and_eval_time_are_read_from_their_last_lines() -> None:
    log = ("Train: 0 [   0/7 ( 14%)]  Loss: 3.60 (3.60)  Time: 32.772s,    0.98/s  (32.772s,    0.98/s)  LR: 1e-04\n"
           "Train: 0 [   6/7 (100%)]  Loss: 0.967 (2.81)  Time: 1.092s,   29.3/s  (4.827s,    6.63/s)  LR: 8e-05\n"
           "Test: [   4/4]  Time: 17.951 (19.364)  Loss:   0.052 ( 1.962)  Acc@1: 100.000 ( 67.974)\n"
           "Train: 1 [   6/7 (100%)]  Loss: 0.5 (0.6)  Time: 1.000s,   32.0/s  (1.500s,   21.3/s)  LR: 5e-05\n")
    assert timm_train_seconds(log) == pytest.approx([7 * 4.827, 7 * 1.5])
    assert timm_eval_seconds(log) == pytest.approx([5 * 19.364])  # the last of batches 0..4


def test_each_command_reports_its_own_peak_memory(tmp_path: Path) -> None:
    """A small process after a large one reports its own peak, not the largest child's so far (RUSAGE_CHILDREN)."""
    hold = "b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096])"
    big = timed_command([sys.executable, "-c", hold.format(mb=400)], tmp_path / "big.log")
    small = timed_command([sys.executable, "-c", hold.format(mb=10)], tmp_path / "small.log")
    assert big.peak_rss_mb >= 400 > 200 > small.peak_rss_mb and big.returncode == small.returncode == 0
    failed = timed_command([sys.executable, "-c", "import sys; print('why'); sys.exit(5)"], tmp_path / "failed.log")
    assert failed.returncode == 5 and failed.tail(tmp_path / "failed.log") == "why"


def test_without_scikit_learn_the_probe_race_is_skipped(photos: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sklearn" else real(name, *args))
    assert race_probe(QUICK_PROBE, BenchInputs(None, str(photos)), tmp_path, child_env()) == NO_SKLEARN
    assert NO_SKLEARN == 'skipped: scikit-learn not installed (pip install -e ".[bench]")'


@pytest.mark.slow
def test_the_probe_race_times_the_probe_and_our_cold_and_warm_runs(photos: Path, tmp_path: Path) -> None:
    """Cold computes the features, warm reads them back; the same features and seed give the same accuracy."""
    pytest.importorskip("sklearn", reason='scikit-learn is the bench extra: pip install -e ".[bench]"')
    race = race_probe(QUICK_PROBE, BenchInputs(None, str(photos)), tmp_path, child_env())
    probe, cold, warm = race["probe"], race["transfer_cold"], race["transfer_warm"]
    assert probe["train_images"] == probe["val_images"] == 16 and probe["features"] > 0
    assert (probe["val_acc1"] * 16).is_integer() and 0 <= probe["val_acc1"] <= 1
    assert cold["cache_hit"] is False and warm["cache_hit"] is True
    assert cold["val_acc1"] == warm["val_acc1"]
    assert race["ratio"] == pytest.approx(warm["seconds"] / probe["seconds"])
    assert race["cold_ratio"] == pytest.approx(cold["seconds"] / probe["seconds"])
    assert race["accuracy_diff"] == pytest.approx(warm["val_acc1"] - probe["val_acc1"])
    assert all(side["peak_rss_mb"] > 0 for side in (probe, cold, warm))
