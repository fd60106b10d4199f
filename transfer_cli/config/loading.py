"""Reading config YAML back into the schema: a run's config.yaml, a strategy file, `key=value` edits.

Each reader validates against the dataclasses (and their ranges) and turns a damaged or
foreign file into one TransferError line naming the file. OmegaConf is imported inside the
readers, so the modules that call them (the run directory, strategies) load it only when
they read a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer_cli.config.schema import StrategyConfig, TrainConfig
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
        check_bounded_yaml(file)
        tree = OmegaConf.load(file)
    except yaml.MarkedYAMLError as error:
        where = f" (line {error.problem_mark.line + 1})" if error.problem_mark else ""
        raise TransferError(f"{file} is not valid YAML{where}: {error.problem or error.context}") from error
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TransferError(f"{file} is unreadable: {first_line(error)}") from error
    except RecursionError as error:
        raise TransferError(f"{file} is nested too deeply to be a run's config: {DAMAGED}") from error
    if not isinstance(tree, DictConfig):
        raise TransferError(f"{file} is damaged: it holds a list, not a config mapping")
    _require_split_keys(tree, file)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), tree))
    except OmegaConfBaseException as error:
        raise TransferError(f"{file} does not fit the config schema: {first_line(error)}") from error
    except TransferError as error:
        raise TransferError(f"{file}: {error}") from error


# a run's config.yaml is some 10 KB and a few hundred YAML nodes; a file far past these is not one, and aliases
# that expand exponentially (a "billion laughs" file) would keep OmegaConf busy for ever
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_NODES = 100_000
DAMAGED = "restore the run's own file or train a new run"


def check_bounded_yaml(file: Path) -> None:
    """Refuse a run's YAML file that is too large, or whose aliases expand past MAX_CONFIG_NODES, before a
    loader expands them."""
    import yaml

    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise TransferError(f"{file} is {file.stat().st_size:,} bytes, over the {MAX_CONFIG_BYTES:,} a run's config "
                            f"can be: {DAMAGED}")
    root = yaml.compose(file.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)  # aliases stay shared nodes
    if root is not None and _expanded_size(root, {}, set()) > MAX_CONFIG_NODES:
        raise TransferError(f"{file} expands to over {MAX_CONFIG_NODES:,} YAML nodes through its aliases, far more "
                            f"than a run's config: {DAMAGED}")


def _expanded_size(node: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in `node` with every alias expanded, each shared node sized once (capped just past the limit)."""
    import yaml

    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:  # an alias inside its own anchor: endless
        return MAX_CONFIG_NODES + 1
    open_.add(key)
    children = (node.value if isinstance(node, yaml.SequenceNode) else
                [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else [])
    sizes[key] = min(1 + sum(_expanded_size(child, sizes, open_) for child in children), MAX_CONFIG_NODES + 1)
    open_.discard(key)
    return sizes[key]


# what a saved config must name for its splits to be told: the schema's default in its place would evaluate or
# resume the run on other images, a silent wrong number
SPLIT_KEYS = {"split_seed": "the seed it split with (dataset.split_seed: N)",
              "select_fraction": "the share it held out to select on (dataset.select_fraction: F, 0 for none)"}


def _require_split_keys(tree: Any, file: Path) -> None:
    """A saved config names how its data was split (SPLIT_KEYS)."""
    from omegaconf import DictConfig

    dataset = tree.get("dataset")
    for key, what in SPLIT_KEYS.items():
        if isinstance(dataset, DictConfig) and key not in dataset:
            raise TransferError(f"{file} names no dataset.{key}, so the images the run held out cannot be told: "
                                f"add {what}, or train a new run")


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
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:  # an interpolation (${...}) that does not resolve
        key = getattr(error, "full_key", None) or "?"
        item = next((item for item in reversed(overrides) if item.partition("=")[0].strip() == key), key)
        raise TransferError(f"override '{item}': {first_line(error)}: give a plain value or an interpolation "
                            "that resolves (e.g. ${trainer.seed})") from error
