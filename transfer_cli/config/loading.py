"""Reading config YAML back into the schema: a run's config.yaml, a strategy file, `key=value` edits.

Each reader validates against the dataclasses (and their ranges) and turns a damaged or
foreign file into one TransferError line naming the file. OmegaConf is imported inside the
readers, so the modules that call them (the run directory, strategies) load it only when
they read a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer_cli.config.schema import StrategyConfig, TrainConfig, TrainerConfig
from transfer_cli.core.errors import TransferError, first_line


def config_dir() -> Path:
    """`conf/` inside an installed package, else at the repository root."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "conf"
    return installed if installed.is_dir() else package.parent / "conf"


def strategy_file(name: str) -> Path:
    """conf/strategy/<name>.yaml (which may not exist)."""
    return config_dir() / "strategy" / f"{name}.yaml"


def load_strategy(name: str) -> StrategyConfig:
    """A strategy from conf/strategy/<name>.yaml, validated against the schema."""
    from omegaconf import OmegaConf

    path = strategy_file(name)
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise TransferError(f"unknown strategy '{name}': use one of {', '.join(known)}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StrategyConfig), OmegaConf.load(path)))


def load_run_config(run_dir: Path) -> TrainConfig:
    """The resolved config a run was trained with, validated against the schema and its ranges;
    a damaged or foreign config.yaml is one line naming the file and what is wrong with it."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    file = run_dir / "config.yaml"
    try:
        tree = OmegaConf.load(file)
    except yaml.MarkedYAMLError as error:
        where = f" (line {error.problem_mark.line + 1})" if error.problem_mark else ""
        raise TransferError(f"{file} is not valid YAML{where}: {error.problem or error.context}") from error
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TransferError(f"{file} is unreadable: {first_line(error)}") from error
    if not isinstance(tree, DictConfig):
        raise TransferError(f"{file} is damaged: it holds a list, not a config mapping")
    _split_as_trained(tree)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), tree))
    except OmegaConfBaseException as error:
        raise TransferError(f"{file} does not fit the config schema: {first_line(error)}") from error
    except TransferError as error:
        raise TransferError(f"{file}: {error}") from error


def _split_as_trained(tree: Any) -> None:
    """A run saved before `dataset.split_seed` existed split its data (val_fraction, subsets, generated images)
    by trainer.seed: that seed, not the schema's default, gives resume and eval the run's own images."""
    from omegaconf import DictConfig, OmegaConf

    dataset = tree.get("dataset")
    if isinstance(dataset, DictConfig) and "split_seed" not in dataset:
        dataset.split_seed = OmegaConf.select(tree, "trainer.seed", default=TrainerConfig.seed)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`cfg` with dotted `key=value` overrides merged onto the schema, one at a time so an error names its override."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(cfg)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise TransferError(f"'{item}' is not a key=value override (e.g. trainer.device=cpu)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise TransferError(f"override '{item}': {str(error).splitlines()[0]}") from error
    return OmegaConf.to_object(merged)
