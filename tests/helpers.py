"""Shared helpers for the tests: tiny offline models, configs from conf/, a fit setup, run dirs written by
hand, and running `transfer` commands (in this process, or in one of their own) the way a user does.

Everything here builds random-init networks (no downloads) and synthetic data, so the
tests run offline on a CPU in seconds. Test files share code through this module (and
conftest.py's fixtures), never by importing each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from transfer_cli.config.schema import (
    BackboneConfig,
    HeadConfig,
    OptimizerConfig,
    SchedulerConfig,
    StrategyConfig,
)
from transfer_cli.models.model import TransferModel, build_model
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import fit
from transfer_cli.training.freezing import Stage


ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

RESNET_GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


# --------------------------------------------------------------------------- configs


def load_conf(group: str, name: str, schema: type) -> Any:
    """conf/<group>/<name>.yaml merged onto its dataclass schema, as that dataclass."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def load_strategy(name: str) -> StrategyConfig:
    return load_conf("strategy", name, StrategyConfig)


def strategy_names() -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / "strategy").glob("*.yaml"))


def load_optimizer(name: str, **overrides: Any) -> OptimizerConfig:
    cfg = load_conf("optimizer", name, OptimizerConfig)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def load_scheduler(name: str) -> SchedulerConfig:
    return load_conf("scheduler", name, SchedulerConfig)


# --------------------------------------------------------------------------- models


def timm_backbone(name: str = "test_resnet", **kwargs: Any) -> BackboneConfig:
    kwargs.setdefault("pretrained", False)
    return BackboneConfig(source="timm", name=name, **kwargs)


def tv_backbone(name: str = "resnet18", **kwargs: Any) -> BackboneConfig:
    kwargs.setdefault("pretrained", False)
    return BackboneConfig(source="torchvision", name=name, **kwargs)


def build(backbone: BackboneConfig | None = None, num_classes: int = 3, head: HeadConfig | None = None,
          pretrained: bool = True, seed: int = 0) -> TransferModel:
    """A TransferModel (random init unless the backbone config loads a checkpoint)."""
    torch.manual_seed(seed)
    return build_model(backbone or timm_backbone(), head or HeadConfig(), num_classes, pretrained=pretrained)


def tiny_resnet(num_classes: int = 3, head: HeadConfig | None = None, seed: int = 0) -> TransferModel:
    return build(timm_backbone("test_resnet"), num_classes, head, seed=seed)


def group_names(model: TransferModel) -> list[str]:
    return [group.name for group in model.groups]


def params_of(model: TransferModel, *groups: str) -> list[str]:
    """Parameter names of the named layer groups (all groups when none are named)."""
    wanted = set(groups) if groups else {g.name for g in model.groups}
    return [name for g in model.groups if g.name in wanted for name in g.params]


def stage(name: str, lrs: dict[str, float], epochs: int = 1) -> Stage:
    return Stage(name, epochs, dict(lrs))


def snapshot_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def snapshot_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def batchnorms(module: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


# --------------------------------------------------------------------------- training


def make_fit_setup(model: TransferModel, stages: list[Stage], run_dir: Path, *, train_bn: bool = False,
                   optimizer: OptimizerConfig | None = None, scheduler: SchedulerConfig | None = None,
                   num_classes: int = 3, image_size: int = 32, train_size: int = 48, val_size: int = 24,
                   batch_size: int = 16, seed: int = 0):
    """A FitSetup built the way training/assemble.py builds one, on synthetic data, on CPU."""
    from transfer_cli.config.schema import AugmentConfig, TransformsConfig
    from transfer_cli.data.loaders import TransformedDataset, make_loader
    from transfer_cli.data.synthetic import SyntheticImages
    from transfer_cli.data.transforms import eval_transform, resolve_preprocessing, train_transform
    from transfer_cli.models.runtime import Precision
    from transfer_cli.training.stages import FitSetup, StagedOptimizer

    preprocessing = resolve_preprocessing(model.preprocessing, TransformsConfig(image_size=image_size, crop_pct=1.0),
                                          model.pretrained)
    train = SyntheticImages(num_classes, train_size, image_size, seed)
    val = SyntheticImages(num_classes, val_size, image_size, seed + 1)
    train_loader = make_loader(TransformedDataset(train, train_transform(preprocessing, AugmentConfig(name="none"))),
                               batch_size, train=True, num_workers=0, seed=seed, pin_memory=False)
    val_loader = make_loader(TransformedDataset(val, eval_transform(preprocessing)), batch_size, train=False,
                             num_workers=0, seed=seed, pin_memory=False)
    optimizer = optimizer or OptimizerConfig(name="adamw", weight_decay=0.01)
    staged = StagedOptimizer(model, optimizer, stages[0], train_bn)
    loss_fn, precision = nn.CrossEntropyLoss(), Precision(torch.device("cpu"))
    common = dict(
        model=model, stages=stages, optimizer=staged,
        scheduler_cfg=scheduler or SchedulerConfig(name="constant", warmup_pct=0.0),
        train_loader=train_loader, val_loader=val_loader, num_classes=num_classes, run_dir=Path(run_dir),
        train_bn=train_bn,
    )
    fields = {f.name for f in dataclasses.fields(FitSetup)}
    if "runner" in fields:  # the loop steps through a StepRunner (as train.py builds it)
        from transfer_cli.training.loop import StepRunner

        common["runner"] = StepRunner(model.model, staged.optimizer, loss_fn, precision)
    else:
        common.update(loss_fn=loss_fn, precision=precision)
    return FitSetup(**common)


def setup_loss_and_precision(setup) -> tuple[nn.Module, Any]:
    """The loss function and Precision a FitSetup evaluates with (wherever it keeps them)."""
    holder = getattr(setup, "runner", setup)
    return holder.loss_fn, holder.precision


def params_trainable(result) -> dict[str, int]:
    """Trainable-parameter counts per stage from a FitResult."""
    holder = getattr(result, "progress", result)
    return holder.params_trainable


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metric records without their timing keys, which differ between any two runs."""
    return [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in records]


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, comparable."""
    return comparable(read_metrics(run_dir))


def assert_same_metrics(a: Path, b: Path) -> None:
    """Two runs logged the same epochs with the same metrics (floats within float32 reduction noise)."""
    first, second = run_metrics(a), run_metrics(b)
    assert len(first) == len(second) > 0
    for one, other in zip(first, second):
        assert one.keys() == other.keys()
        for key, value in one.items():
            expected = pytest.approx(other[key], rel=1e-5, abs=1e-7) if isinstance(value, float) else other[key]
            assert value == expected, key


def write_split_folders(root: Path, per_class: int = 8) -> None:
    """train/, val/ and test/ with two classes of flat colours plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for index, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class_{index}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def tree_snapshot(folder: Path) -> dict[str, Any]:
    """Every entry under `folder`: a file's bytes, a link's target, "dir" for a folder (to prove nothing changed)."""
    def entry(path: Path) -> Any:
        if path.is_symlink():
            return ("link", str(path.readlink()))
        return path.read_bytes() if path.is_file() else "dir"
    return {str(p.relative_to(folder)): entry(p) for p in sorted(folder.rglob("*"))}


def one_error_line(code: int, err: str, *names: object, out: str = "") -> str:
    """The single `transfer: error:` line of a command that exited 2 (no traceback anywhere), naming each of `names`."""
    assert code == 2, out + err
    assert "Traceback" not in out + err, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("transfer: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- run dirs written by hand (for report)

STRATEGY_LR = {"feature_extract": 1e-3, "fine_tune": 1e-5}
STAGES = {"feature_extract": ["head"] * 3, "fine_tune": ["head", "head", "all"]}
TRAINABLE = {"feature_extract": {"head": 100}, "fine_tune": {"head": 100, "all": 5000}}


def write_run(run_dir: Path, strategy: str, seed: int, accs: list[float] | None, finished: bool,
              lr: float | None = None) -> None:
    """A run dir laid out as `transfer train` writes one (`lr`: a `strategy.lr=` override): config.yaml, Hydra's
    overrides.yaml, a metrics line per val accuracy in `accs`, and summary.json where `finished`."""
    (run_dir / ".hydra").mkdir(parents=True)
    config = {"backbone": {"source": "timm", "name": "test_resnet"},
              "strategy": {"name": strategy, "lr": lr or STRATEGY_LR[strategy],
                           "stages": [{"name": "x", "epochs": 10}]},
              "dataset": {"name": "synthetic", "root": "/data/same/for/all"},
              "trainer": {"epochs": 3, "seed": seed, "device": "cpu"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    overrides = [f"strategy={strategy}", f"trainer.seed={seed}", *([f"strategy.lr={lr}"] if lr else [])]
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    records = [{"epoch": i + 1, "stage": STAGES[strategy][i], "val/acc1": acc, "val/loss": 1.0, "seconds": 2.0}
               for i, acc in enumerate(accs or [])]
    if records:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if finished:
        summary = {"status": "finished", "reported_val_acc": max(accs), "selected_on": "select",
                   "selected_acc": max(accs), "final_val_acc": accs[-1], "best_epoch": accs.index(max(accs)) + 1,
                   "epochs_run": len(accs), "wall_time_s": 10.0 * len(accs) + seed,
                   "params_total": 9000, "params_trainable": TRAINABLE[strategy], "seed": seed}
        (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


def parse_markdown(table: str) -> list[dict[str, str]]:
    """The rows of a markdown table (`transfer report`'s output), keyed by its header; lines around the table
    (the report's "Shared:" line) are not rows."""
    header, _, *lines = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()
                         if line.startswith("|")]
    return [dict(zip(header, line)) for line in lines]


# --------------------------------------------------------------------------- `transfer` in this process


@contextlib.contextmanager
def hydra_state_restored() -> Iterator[None]:
    """Undo what a `transfer` command run in this process leaves behind: Hydra sets sys.argv and adds a
    train.log handler to the root logger per job (resume adds its own) and may change the root level."""
    argv = sys.argv
    saved_argv, root = list(argv), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        argv[:] = saved_argv
        sys.argv = argv
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


class Crash(Exception):
    """Stands for the process dying right after a mid-epoch checkpoint."""


def crash_after(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> None:
    """Make training raise Crash right after step `step` of epoch `epoch` (after its on_step checkpoint)."""
    real = fit.train_one_epoch

    def crashing(*args: Any, on_step: Any, description: str, **kwargs: Any) -> Any:
        def step_then_crash(done: int) -> None:
            on_step(done)
            if description == f"epoch {epoch}" and done == step:
                raise Crash(f"{description} step {done}")

        return real(*args, on_step=step_then_crash, description=description, **kwargs)

    monkeypatch.setattr(fit, "train_one_epoch", crashing)


# --------------------------------------------------------------------------- run directories for tests


def trained_in_process(run_dir: Path, cfg: Any) -> Path:
    """`cfg` trained into the new `run_dir` in this process, its config.yaml saved first as `transfer train`
    saves it (what an interrupted training left is there too: the exception goes on up)."""
    from transfer_cli.training.run import train

    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    train(cfg, run_dir)
    return run_dir


def fresh_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A test's own copy of a module's run directory: what the test damages, no other test sees."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


# --------------------------------------------------------------------------- `transfer` in a process of its own


def transfer_env() -> dict[str, str]:
    """The environment of a `transfer` subprocess: this one's (conftest's feature cache included), Hydra's
    errors as one line."""
    return {**os.environ, "HYDRA_FULL_ERROR": "0"}


def transfer(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """`transfer ARGS` in a process of its own, its output captured as text; a hang past `timeout` fails the test
    (TimeoutExpired)."""
    return subprocess.run([sys.executable, "-m", "transfer_cli", *args], cwd=cwd, env=transfer_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_train(tmp_path: Path, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """`transfer train` in the background; its stdout and stderr go to files in `tmp_path` (a full pipe would
    stall it)."""
    out, err = open(tmp_path / "train.stdout", "w"), open(tmp_path / "train.stderr", "w")
    with out, err:
        return subprocess.Popen([sys.executable, "-m", "transfer_cli", "train", *overrides, f"hydra.run.dir={run_dir}"],
                                cwd=ROOT, env=transfer_env(), stdout=out, stderr=err)


def finish(process: subprocess.Popen, tmp_path: Path, timeout: float = 120) -> tuple[str, str]:
    """Wait for a start_train process; its stdout and stderr."""
    process.wait(timeout=timeout)
    return (tmp_path / "train.stdout").read_text(), (tmp_path / "train.stderr").read_text()


def wait_for_lines(process: subprocess.Popen, tmp_path: Path, metrics: Path, lines: int, timeout: float = 240) -> None:
    """Poll metrics.jsonl until it has `lines` epochs (fails if the start_train run ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            return
        if process.poll() is not None:
            log = tmp_path / "train.stderr"
            pytest.fail(f"training ended (rc {process.returncode}) before {lines} epochs: "
                        f"{log.read_text()[-2000:] if log.is_file() else ''}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"metrics.jsonl did not reach {lines} lines in {timeout}s")
