"""trainer.compile=true: one compile per stage, no recompiles from stage boundaries, validation or a ragged
last val batch, and each stage saying what torch.compile did (training/compiled.py).

Compiled with the eager backend, as .ci/gpu-check.sh's CPU dry run does: dynamo's guards and recompiles
are the same as under inductor, without its code generation."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from transfer_cli.models.runtime import Precision
from transfer_cli.training import compiled as compiled_module
from transfer_cli.training import fit as trainer_module
from transfer_cli.training import stages as stages_module
from transfer_cli.training.compiled import compile_for_stage
from transfer_cli.training.loop import StepRunner
from transfer_cli.training.run import train

from conftest import FAST, compose_train
from helpers import assert_same_metrics


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def dynamo_log() -> Iterator[Records]:
    """What dynamo itself logs (TORCH_LOGS=recompiles, as check.sh counts it): one 'Recompiling function' per
    recompile, a 'hit config.recompile_limit' warning per refused one. torch's loggers do not propagate to root."""
    records = Records()
    logger = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        torch._logging.set_logs()


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """torch.compile with backend="eager"; returns the modules compiled, in order."""
    compiled: list[nn.Module] = []
    real = torch.compile

    def compile_(model: nn.Module, **kwargs: Any) -> nn.Module:
        compiled.append(model)
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    return compiled


# gradual over 4 epochs: head | last_block | all (x2); 45 val images in batches of 16: a ragged last batch of 13;
# no feature cache, so every stage runs (and compiles) the whole network
GRADUAL = [*FAST, "strategy=gradual", "trainer.epochs=4", "dataset.val_size=45", "trainer.cache_features=false"]


@pytest.mark.slow
def test_a_gradual_run_compiles_once_per_stage_and_never_recompiles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        dynamo_log: Records, eager_compile: list[nn.Module]) -> None:
    validated: list[nn.Module] = []
    real_evaluate = trainer_module.evaluate

    def evaluate(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, float]:
        validated.append(model)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    stage_runners: list[Any] = []
    real_stage_run = stages_module.stage_run

    def stage_run(setup: Any, index: int, scheduler: Any) -> Any:
        run = real_stage_run(setup, index, scheduler)
        trainable = {name for name, p in setup.model.model.named_parameters() if p.requires_grad}
        stage_runners.append((run, trainable))
        return run

    monkeypatch.setattr(stages_module, "stage_run", stage_run)
    caplog.set_level(logging.INFO, logger=compiled_module.__name__)

    train(compose_train([*GRADUAL, "trainer.compile=true"]), tmp_path / "compiled")

    recompiles = [m for m in dynamo_log.messages if "Recompiling function" in m]
    limit_hits = [m for m in dynamo_log.messages if "recompile_limit" in m]
    assert limit_hits == [], limit_hits
    assert recompiles == [], recompiles  # before: 8 recompiles and a recompile_limit hit on this run's data
    # one fresh compile per stage, of the plain network, whose stage froze its layers before it
    assert len(eager_compile) == len(stage_runners) == 3
    assert all(model is eager_compile[0] for model in eager_compile)
    forwards = [run.runner.model for run, _ in stage_runners]
    assert len({id(f) for f in forwards}) == 3 and all(hasattr(f, "_orig_mod") for f in forwards)
    assert [len(trainable) for _, trainable in stage_runners] == sorted({len(t) for _, t in stage_runners})
    # validation runs the network itself, never the compiled forward
    assert len(validated) == 4 and all(model is eager_compile[0] for model in validated)
    # each stage says what it compiled: one graph, no recompile
    lines = [r.getMessage() for r in caplog.records if "torch.compile compiled" in r.getMessage()]
    assert lines == [f"stage '{name}': torch.compile compiled 1 graph(s), 0 recompile(s)"
                     for name in ("head", "last_block", "all")]

    # the compiled run trains as the uncompiled one (eager backend: the same kernels)
    train(compose_train([*GRADUAL, "trainer.compile=false"]), tmp_path / "plain")
    assert_same_metrics(tmp_path / "compiled", tmp_path / "plain")


@pytest.fixture
def low_recompile_limit() -> Iterator[None]:
    """dynamo's recompile_limit at 2 and no automatic dynamic shapes: a new batch size is a recompile."""
    from torch._dynamo import config

    with config.patch(recompile_limit=2, automatic_dynamic_shapes=False):
        yield


def test_the_watch_counts_recompiles_and_warns_at_the_recompile_limit(
        caplog: pytest.LogCaptureFixture, eager_compile: list[nn.Module], low_recompile_limit: None) -> None:
    """What the per-stage line reports is dynamo's own count: a requires_grad flip and a new batch size
    recompile, and past the limit the warning says the forward now runs eager."""
    caplog.set_level(logging.INFO, logger=compiled_module.__name__)
    layer = nn.Linear(4, 2)
    forward, watch = compile_for_stage(layer, "head")
    forward(torch.randn(3, 4))
    assert watch.report() == (1, 0, 0, True)
    layer.weight.requires_grad_(False)
    forward(torch.randn(3, 4))  # recompile 1
    counts = watch.report()
    assert (counts.compiles, counts.recompiles, counts.limit_hits) == (2, 1, 0)
    assert "requires_grad" in caplog.records[-1].getMessage() and caplog.records[-1].levelno == logging.WARNING
    forward(torch.randn(5, 4))  # a third graph: past recompile_limit=2
    counts = watch.report()
    assert counts.limit_hits == 1
    assert caplog.records[-1].levelno == logging.WARNING and "EAGER" in caplog.records[-1].getMessage()
    assert watch.report() == counts and caplog.records[-1].getMessage().count("EAGER") == 1  # said once

    # the next stage starts afresh: dynamo's caches and its records are cleared
    _, fresh = compile_for_stage(layer, "all")
    assert fresh.report() == (0, 0, 0, True)


def test_the_watch_counts_what_dynamo_itself_logs(
        dynamo_log: Records, eager_compile: list[nn.Module], low_recompile_limit: None) -> None:
    """The watch's counts agree with TORCH_LOGS=recompiles (the lines check.sh counts)."""
    forward, watch = compile_for_stage(nn.Linear(4, 2), "head")
    for batch in (1, 2, 3, 4, 5):
        forward(torch.randn(batch, 4))
    counts = watch.report()
    assert counts.recompiles == sum("Recompiling function" in m for m in dynamo_log.messages) - counts.limit_hits
    assert counts.limit_hits == sum("hit config.recompile_limit" in m for m in dynamo_log.messages) >= 1


def test_compile_for_stage_compiles_the_module_it_is_given(eager_compile: list[nn.Module]) -> None:
    layer = nn.Linear(2, 2)
    forward, _ = compile_for_stage(layer, "head")
    assert eager_compile == [layer] and forward._orig_mod is layer
    assert torch.equal(forward(torch.ones(1, 2)), layer(torch.ones(1, 2)))


def test_validation_runs_the_network_not_its_compiled_forward(eager_compile: list[nn.Module]) -> None:
    """A stage's runner validates the network itself: torch.compile's wrapper stripped (DDP's too: test_distributed)."""
    layer = nn.Linear(2, 2)
    forward, _ = compile_for_stage(layer, "head")
    runner = StepRunner(forward, torch.optim.SGD(layer.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                        Precision(torch.device("cpu")))
    assert runner.eval_network() is layer
