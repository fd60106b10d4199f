"""The Hydra boundary: the schema in Hydra's ConfigStore, composition, and Hydra running a train job.

Nothing outside the config package imports Hydra. A single run is composed once (`compose`:
the checked TrainConfig with its stages as they run, and the directory Hydra's settings name)
by a config loader of its own, so a caller's Hydra state (a notebook that initialised Hydra
for its own configs) is neither read nor changed. The command then runs that one composition
as a Hydra job (`run_as_hydra_job`: Hydra's logging, `.hydra/` record, env and callbacks); the
Python API calls training directly and records the same files (`record_job`). A sweep
(`-m`) and Hydra's own flags go through `hydra.main` (`run_hydra_main`), its jobs arriving
as `HydraJob`s. A composition mistake is one TransferError line, before anything is written.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.core.utils import run_job, setup_globals
from hydra.errors import HydraException
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from transfer_cli.config.help import register_help_resolver
from transfer_cli.config.loading import config_dir
from transfer_cli.config.schema import TrainConfig
from transfer_cli.config.stage_epochs import scale_epochs
from transfer_cli.core.errors import TransferError
from transfer_cli.core.extras import installed


SWEEP_FLAGS = {"-m", "--multirun"}
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
CONFIG_NAME = "train"
# a rank > 0 of a torchrun run writes neither `.hydra/` nor train.log: rank 0 keeps the record
CONSOLE_ONLY_LOGGING = {
    "version": 1,
    "formatters": {"simple": {"format": "[%(asctime)s][rank %(process)d][%(levelname)s] - %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple", "stream": "ext://sys.stderr"}},
    "root": {"level": "WARNING", "handlers": ["console"]},
    "disable_existing_loggers": False,
}


def register_configs() -> None:
    """Store the schema so `conf/train.yaml` can extend it, and resolve its help template's config."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_help_resolver()
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


def _loader() -> ConfigLoaderImpl:
    """A config loader of our own over conf/: composing with it reads and changes no Hydra global."""
    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir())))


def _mistake(error: Exception) -> TransferError:
    """Hydra's or OmegaConf's report of a composition mistake as one TransferError line."""
    return TransferError(_one_line(f"{error}\n{error.__cause__ or ''}"))


# --------------------------------------------------------------------------- a single run: composed once


@dataclass(frozen=True)
class Composed:
    """One composition of `transfer train <overrides>`: the checked config, the composed tree with Hydra's
    settings, the run's part of it with the stage epochs as they run (what config.yaml records), the directory
    Hydra's settings name, and whether a clock made its name."""
    config: TrainConfig
    tree: DictConfig
    ran: DictConfig
    run_dir: Path
    from_clock: bool

    @property
    def multirun(self) -> bool:
        """hydra.mode=MULTIRUN, set by an override or a config (hparams_search): a sweep, not a single run."""
        return self.tree.hydra.mode == RunMode.MULTIRUN


def compose(overrides: list[str]) -> Composed:
    """`transfer train <overrides>` composed and checked once, by a config loader of our own: Hydra's global
    state (GlobalHydra, HydraConfig) is neither needed nor touched. A typo'd key, option or value, or a value
    out of its range, is one TransferError line."""
    register_configs()
    setup_globals()  # Hydra's resolvers (${now:}); registering them again changes nothing
    loader = _loader()
    try:
        tree = loader.load_configuration(config_name=CONFIG_NAME, overrides=list(overrides), run_mode=RunMode.RUN)
        run_dir = str(tree.hydra.run.dir)
        if not run_dir.strip():  # Hydra would take the current directory, whatever it holds
            raise TransferError("hydra.run.dir is empty: give a directory, or leave it out (each run then gets its "
                                "own under outputs/)")
        ran = _as_run(_task(tree))
        config = OmegaConf.to_object(ran)
    except MissingMandatoryValue as error:
        raise TransferError(f"{error.full_key} has no value: give one ({error.full_key}=...)") from error
    except (HydraException, OmegaConfBaseException) as error:
        raise _mistake(error) from error
    pattern = str(OmegaConf.to_container(tree.hydra.run, resolve=False)["dir"])
    return Composed(config, tree, ran, Path(run_dir).absolute(), "${now:" in pattern)


def _task(tree: DictConfig) -> DictConfig:
    """The run's part of a composed tree (a copy without Hydra's settings)."""
    task = copy.deepcopy(tree)
    with read_write(task), open_dict(task):
        task.pop("hydra", None)
    return task


def _as_run(task: DictConfig) -> DictConfig:
    """`task` with its strategy's stage epochs as they run (rescaled to `trainer.epochs`, or
    `trainer.epochs_per_stage` each), so the config is built (and checked) once,
    and config.yaml records the stages that ran (reading it back rescales nothing). A size-table strategy
    (`auto`) has no stages until the data picks them: plan.json and summary.json show those."""
    stages, total, per_stage = task.strategy.stages, task.trainer.epochs, task.trainer.epochs_per_stage
    counts = [stage.epochs for stage in stages]
    # else the schema names the bad key
    if counts and min(counts) >= 1 and all(n is None or n >= 1 for n in (total, per_stage)):
        epochs = scale_epochs(counts, total, per_stage)
        with read_write(task):
            for stage, count in zip(stages, epochs):
                stage.epochs = count
    return task


def compose_config(overrides: list[str]) -> TrainConfig:
    """The TrainConfig `transfer train <overrides>` would run, for commands and benchmarks that build on it."""
    return compose(overrides).config


def quoted(value: str) -> str:
    """`value` as a quoted Hydra override value: any path, spaces, commas and quotes included. In Hydra's
    quoted strings a backslash is literal except in a run before a quote or the closing quote: such runs double."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def _job_tree(composed: Composed, run_dir: Path) -> DictConfig:
    """The composed tree as its job runs: in `run_dir` (the claimed directory), mode RUN."""
    tree = copy.deepcopy(composed.tree)
    with read_write(tree.hydra), open_dict(tree.hydra):
        tree.hydra.run.dir = str(run_dir)
        tree.hydra.runtime.output_dir = str(run_dir.absolute())
        tree.hydra.mode = RunMode.RUN
    return tree


def run_as_hydra_job(composed: Composed, run_dir: Path, job: Callable[[], Any], writes_record: bool) -> Any:
    """Run `job` as Hydra runs a single run's job, on this one composition: the logging of hydra.job_logging,
    `.hydra/` (config, hydra, overrides), hydra.job.env_set, hydra.callbacks. A process that does not keep the
    record (`writes_record` False: a torchrun rank > 0) logs to its console only."""
    tree = _job_tree(composed, run_dir)
    if not writes_record:
        with read_write(tree.hydra), open_dict(tree.hydra):
            tree.hydra.output_subdir = None
            tree.hydra.job_logging = CONSOLE_ONLY_LOGGING
    loader = _loader()
    callbacks = Callbacks(tree)
    callbacks.on_run_start(config=tree, config_name=CONFIG_NAME)
    ended = run_job(task_function=lambda _: job(), config=tree, job_dir_key="hydra.run.dir", job_subdir_key=None,
                    hydra_context=HydraContext(config_loader=loader, callbacks=callbacks))
    callbacks.on_run_end(config=tree, config_name=CONFIG_NAME, job_return=ended)
    return ended.return_value  # raises what the job raised


def record_job(composed: Composed, run_dir: Path) -> None:
    """The `.hydra/` record a Hydra job leaves (its config as composed, Hydra's settings, the overrides), for a run
    started without Hydra (the Python API), so `transfer report` and resume read every run alike."""
    tree = _job_tree(composed, run_dir)
    record = run_dir / str(tree.hydra.output_subdir or ".hydra")
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(_task(tree), record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": tree.hydra}), record / "hydra.yaml")
    OmegaConf.save(tree.hydra.overrides.task, record / "overrides.yaml")


def save_config(ran: DictConfig, run_dir: Path) -> None:
    """The resolved config as it runs as `config.yaml` in the run directory: what resume, eval and a sweep
    re-run read back."""
    OmegaConf.save(ran, run_dir / "config.yaml", resolve=True)


# --------------------------------------------------------------------------- sweeps: hydra.main and its jobs


def composition_error(argv: list[str]) -> str | None:
    """Compose a sweep value by value (see `value_by_value`) up front, so a bad value is one line before any job
    starts. Hydra's own flags (--help, --cfg, ...) are left to Hydra, which reports them."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in SWEEP_FLAGS for flag in flags):
        return None
    overrides = [arg for arg in argv if not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra")]
    try:
        for run in value_by_value(overrides):
            compose(run)
    except HydraException as error:  # a sweep override Hydra cannot parse
        return str(_mistake(error))
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


def sweep_dir(overrides: list[str]) -> tuple[Path, bool]:
    """The directory a sweep writes (hydra.sweep.dir, with its first job's values), and whether its name comes
    from the clock (`${now:...}`)."""
    register_configs()
    setup_globals()
    loader = _loader()
    try:
        tree = loader.load_configuration(config_name=CONFIG_NAME, overrides=value_by_value(overrides)[0],
                                         run_mode=RunMode.MULTIRUN)
        planned = str(tree.hydra.sweep.dir)
    except (HydraException, OmegaConfBaseException) as error:
        raise _mistake(error) from error
    if not planned.strip():  # Hydra would sweep into the current directory, whatever it holds
        raise TransferError("hydra.sweep.dir is empty: give a directory, or leave it out (each sweep then gets its "
                            "own under outputs/)")
    pattern = str(OmegaConf.to_container(tree.hydra.sweep, resolve=False)["dir"])
    return Path(planned), "${now:" in pattern


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
            master = hydra_compose(CONFIG_NAME, overrides=value_by_value(overrides)[0], return_hydra_config=True)
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
        raise _mistake(error) from error


def _sweep_job(num: int, overrides: list[str]) -> HydraJob:
    """Job `num` of a sweep, as the basic launcher sets it up (job id and number, then its directory)."""
    composed = hydra_compose(CONFIG_NAME, overrides=overrides, return_hydra_config=True)
    with read_write(composed.hydra), open_dict(composed.hydra):
        composed.hydra.job.id = num
        composed.hydra.job.num = num
    run_dir = Path(str(composed.hydra.sweep.dir)) / str(composed.hydra.sweep.subdir)
    with read_write(composed), open_dict(composed):
        del composed["hydra"]
    return HydraJob(run_dir, composed)


@dataclass(frozen=True)
class HydraJob:
    """A sweep's job as Hydra started it: where it runs and its composed config."""
    run_dir: Path
    composed: DictConfig

    def config(self) -> TrainConfig:
        """The job's config as dataclasses, stages as they run (its ranges checked: a bad value raises
        TransferError here)."""
        try:
            return OmegaConf.to_object(_as_run(_task(self.composed)))
        except (HydraException, OmegaConfBaseException) as error:
            raise _mistake(error) from error

    def save_config(self) -> None:
        save_config(_as_run(_task(self.composed)), self.run_dir)


def run_hydra_main(argv: list[str], job: Callable[[HydraJob], float | None]) -> None:
    """Run `job` for each job of a sweep under `hydra.main`, with Hydra's own argument handling (overrides, -m,
    --help, --cfg); what `job` returns is a sweeper's objective."""
    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)
    def task(composed: DictConfig) -> float | None:
        return job(HydraJob(Path(HydraConfig.get().runtime.output_dir), composed))

    register_configs()
    sys.argv = ["transfer train", *argv]
    task()
