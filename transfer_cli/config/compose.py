"""The Hydra boundary: the schema in Hydra's ConfigStore, composition, and `hydra.main` for a train job.

Nothing outside the config package imports Hydra: a command asks here for a composed
TrainConfig (`compose_config`), for the directory Hydra would write (`planned_dir`), for
the jobs a sweep will launch (`sweep_jobs`: checked before Hydra writes into their
directories), or for Hydra to run its job function (`run_hydra_main`), which receives a `HydraJob`.
A composition mistake is one TransferError line, before anything is written.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.core.utils import setup_globals
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from transfer_cli.config.loading import config_dir
from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.core.extras import installed


SWEEP_FLAGS = {"-m", "--multirun"}
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def register_configs() -> None:
    """Store the schema so `conf/train.yaml` can extend it."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    _stand_in_for_missing_sweeper(ConfigStore.instance())


def _stand_in_for_missing_sweeper(store: Any) -> None:
    """Without the hydra-optuna-sweeper plugin `hparams_search=optuna` still composes (`--cfg`, config tests).

    The stand-in has the plugin's keys and class name; `transfer train -m hparams_search=...`
    stops before Hydra starts with the install hint (core/extras.py), so it never runs.
    """
    if installed("hydra_plugins.hydra_optuna_sweeper"):
        return
    store.store(group="hydra/sweeper", name="optuna", provider="transfer", node={
        "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        "sampler": {}, "direction": "minimize", "storage": None, "study_name": None, "n_trials": 20, "n_jobs": 2,
        "max_failure_rate": 0.0, "search_space": None, "params": None, "custom_search_space": None,
    })


def composition_error(argv: list[str]) -> str | None:
    """Compose the config up front, so a typo'd key, option or value, or a value out of its range
    (the schema's rules), is one line before anything is written.

    A sweep is checked value by value (see `value_by_value`), not job by job. Hydra's own
    flags (--help, --cfg, ...) are left to Hydra, which reports them.
    """
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in SWEEP_FLAGS for flag in flags):
        return None


    overrides = [arg for arg in argv if not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra")]
    try:
        runs = value_by_value(overrides) if flags else [overrides]
        for run in runs:
            compose_config(run)
    except HydraException as error:  # a sweep override Hydra cannot parse
        return _one_line(f"{error}\n{error.__cause__ or ''}")
    except TransferError as error:
        return str(error)
    return None


def value_by_value(overrides: list[str]) -> list[list[str]]:
    """Single-run override lists in which every value of every swept key appears once (with the
    first value of the other swept keys): a bad value fails here, before any job starts, at the
    cost of one composition per value rather than per job. Ranges are checked at both ends;
    interval and glob sweeps (a sweeper's search space, a group's own options) are left to Hydra.
    """
    fixed, swept = [], {}
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            fixed.append(override.input_line)
        elif override.is_discrete_sweep() and override.value_type != ValueType.GLOB_CHOICE_SWEEP:
            values = list(override.sweep_string_iterator())
            swept[override.get_key_element()] = values[:1] + values[-1:] if override.is_range_sweep() else values
    first = {key: values[0] for key, values in swept.items() if values}
    runs = [fixed + [f"{key}={value}" for key, value in first.items()]]
    for key, values in swept.items():
        for value in values[1:]:
            runs.append(fixed + [f"{k}={value if k == key else v}" for k, v in first.items()])
    return runs


def compose_config(overrides: list[str]) -> Any:
    """The TrainConfig `transfer train <overrides>` would run, composed in this process without a
    Hydra job (no run dir, no logging set up), for commands that build on it; a composition
    mistake or a value out of its range is a one-line TransferError."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return OmegaConf.to_object(compose("train", overrides=overrides))
    except MissingMandatoryValue as error:
        raise TransferError(f"{error.full_key} has no value: give one ({error.full_key}=...)") from error
    except (HydraException, OmegaConfBaseException) as error:
        raise TransferError(_one_line(f"{error}\n{error.__cause__ or ''}")) from error


def _one_line(report: str) -> str:
    """Hydra's multi-line report as one line: the message, the options it lists, the key."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    if "Available options" in report:
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
        options = [line for line in lines[start:] if not line.startswith(("Config search path", "provider="))]
        options = options[: next((i for i, o in enumerate(options) if ":" in o or "/" in o), len(options))]
        return f"{lines[0]}: choose one of {', '.join(options)}"
    detail = [line for line in lines[1:] if line.startswith(("Key '", "Value '"))]
    return " ".join([lines[0].rstrip("."), "-", *detail[:1]]) if detail else lines[0]


def planned_dir(overrides: list[str], sweep: bool) -> tuple[Path, bool, bool]:
    """The directory Hydra would write (a sweep's: its dir), resolved here the way Hydra resolves it;
    whether its name comes from the clock (`${now:...}`); whether this is a sweep (-m or hydra.mode)."""
    register_configs()
    setup_globals()  # Hydra's ${now:} and ${hydra:} resolvers
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=value_by_value(overrides)[0] if sweep else overrides,
                          return_hydra_config=True)
        sweep = sweep or cfg.hydra.mode == RunMode.MULTIRUN
        node = cfg.hydra.sweep if sweep else cfg.hydra.run
        HydraConfig.instance().set_config(cfg)
        planned = Path(str(node.dir))
    except (HydraException, OmegaConfBaseException) as error:
        raise TransferError(_one_line(f"{error}\n{error.__cause__ or ''}")) from error
    pattern = str(OmegaConf.to_container(node, resolve=False)["dir"])
    return planned, "${now:" in pattern, sweep


def sweep_jobs(overrides: list[str]) -> list[HydraJob] | None:
    """Each job Hydra's basic sweeper will launch for `transfer train -m <overrides>`, in its order: the job's
    directory (hydra.sweep.dir / hydra.sweep.subdir with its job number) and config, composed as its launcher
    composes them, so a re-run can be checked before Hydra writes anything; None for another sweeper (Optuna
    picks its jobs as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    register_configs()
    setup_globals()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            master = compose("train", overrides=value_by_value(overrides)[0], return_hydra_config=True)
            if master.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
                return None
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            parsed = parser.parse_overrides(overrides)
            params = [f"{key}={value}" for key, value in (master.hydra.sweeper.params or {}).items()]
            task = parser.parse_overrides(params) + [o for o in parsed if not o.is_hydra_override()]
            on_hydra = [o.input_line for o in parsed if o.is_hydra_override()]
            batches = BasicSweeper.split_arguments(task, None)
            return [_sweep_job(num, [*on_hydra, *job]) for num, job in enumerate(batches[0])]
    except (HydraException, OmegaConfBaseException) as error:
        raise TransferError(_one_line(f"{error}\n{error.__cause__ or ''}")) from error


def _sweep_job(num: int, overrides: list[str]) -> HydraJob:
    """Job `num` of a sweep, as the basic launcher sets it up (job id and number, then its directory)."""
    composed = compose("train", overrides=overrides, return_hydra_config=True)
    with read_write(composed.hydra), open_dict(composed.hydra):
        composed.hydra.job.id = num
        composed.hydra.job.num = num
    run_dir = Path(str(composed.hydra.sweep.dir)) / str(composed.hydra.sweep.subdir)
    with read_write(composed), open_dict(composed):
        del composed["hydra"]
    return HydraJob(run_dir, True, composed)


@dataclass(frozen=True)
class HydraJob:
    """One job as Hydra started it: where it runs, whether it is a sweep's, and its composed config."""
    run_dir: Path
    sweep_job: bool
    composed: DictConfig

    def config(self) -> TrainConfig:
        """The job's config as dataclasses (its ranges checked: a bad value raises TransferError here)."""
        return OmegaConf.to_object(self.composed)

    def save_config(self, stage_epochs: list[int] | None = None) -> None:
        """The resolved config as `config.yaml` in the run directory (what resume and eval read back), with
        `stage_epochs` as its strategy's stage epochs: the stages as they run, after `trainer.epochs` rescaled
        them (they then sum to trainer.epochs, so reading the file back rescales nothing)."""
        composed = self.composed
        if stage_epochs is not None:
            composed = copy.deepcopy(composed)
            for stage, epochs in zip(composed.strategy.stages, stage_epochs, strict=True):
                stage.epochs = epochs
        OmegaConf.save(composed, self.run_dir / "config.yaml", resolve=True)


def run_hydra_main(argv: list[str], job: Callable[[HydraJob], float | None]) -> None:
    """Run `job` under `hydra.main` with Hydra's own argument handling (overrides, -m, --help, --cfg);
    what `job` returns is a sweeper's objective."""
    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
    def task(composed: DictConfig) -> float | None:
        hydra_cfg = HydraConfig.get()
        return job(HydraJob(Path(hydra_cfg.runtime.output_dir), hydra_cfg.mode == RunMode.MULTIRUN, composed))

    sys.argv = ["transfer train", *argv]
    task()


@contextmanager
def callers_hydra_set_aside() -> Iterator[None]:
    """Hydra's process-wide state as a caller left it (a notebook that ran `hydra.initialize(...)` for its own
    configs), set aside while `transfer_cli.train` composes and runs ours, and given back afterwards."""
    theirs = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        state = GlobalHydra.instance()  # Hydra's run may have swapped its singletons: ask again
        state.clear()
        if theirs is not None:
            state.initialize(theirs)
