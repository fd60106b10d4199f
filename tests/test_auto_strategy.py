"""`strategy=auto`: the lesson's data-size table picks the strategy, and the run records why."""

from __future__ import annotations

from pathlib import Path

import pytest

from transfer_cli.config.loading import load_strategy
from transfer_cli.core.errors import TransferError
from transfer_cli.training.run import train
from transfer_cli.training.stages import choose_by_size

from conftest import FAST, compose_train


@pytest.mark.parametrize(
    ("size", "domain", "expected"),
    [(500, "near", "feature_extract"), (999, "near", "feature_extract"), (1000, "near", "gradual"),
     (9999, "near", "gradual"), (10000, "near", "fine_tune"), (500, "far", "gradual"),
     (5000, "far", "fine_tune"), (50000, "far", "fine_tune")],
)
def test_the_lessons_table(size: int, domain: str, expected: str) -> None:
    chosen, reason = choose_by_size(load_strategy("auto"), size, domain)
    assert chosen.name == expected
    assert f"auto chose {expected}" in reason and str(size) in reason
    assert ("far" in reason) == (domain == "far" and size < 10000)


def test_other_strategies_pass_through() -> None:
    gradual = load_strategy("gradual")
    assert choose_by_size(gradual, 10, "near") == (gradual, "")


def test_a_run_records_the_choice(tmp_path: Path) -> None:
    summary = train(compose_train(FAST + ["strategy=auto"]), tmp_path)
    assert summary["strategy"] == "feature_extract"
    assert "96 training images" in summary["strategy_choice"]
    assert [s["name"] for s in summary["stages"]] == ["head"]


def test_the_users_strategy_settings_survive_the_choice() -> None:
    table = compose_train(FAST + ["strategy=auto", "strategy.train_bn=true", "strategy.lr=0.05"]).strategy
    chosen, reason = choose_by_size(table, 500, "near")
    assert (chosen.name, chosen.train_bn, chosen.lr) == ("feature_extract", True, 0.05)
    assert "keeping strategy.lr=0.05, strategy.train_bn=True" in reason
    chosen, reason = choose_by_size(compose_train(FAST + ["strategy=auto"]).strategy, 500, "near")
    assert chosen == load_strategy("feature_extract") and "keeping" not in reason


def test_stages_given_to_a_size_table_are_refused() -> None:
    table = compose_train(FAST + ["strategy=auto", "strategy.stages=[{name: s, epochs: 1}]"]).strategy
    with pytest.raises(TransferError, match="picks its stages by data size"):
        choose_by_size(table, 500, "near")
