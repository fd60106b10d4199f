"""Typed schemas for every config node, stored in Hydra's ConfigStore.

`conf/train.yaml` names `train_schema` first in its defaults list, so each YAML file and
override is merged onto these dataclasses: an unknown key or a wrong type fails when the
config is composed, not in epoch 3. Below the CLI the code receives these dataclasses
(via `OmegaConf.to_object`), never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class BackboneConfig:
    """Which network to start from and where its weights come from."""

    source: str = MISSING  # timm | torchvision
    name: str = MISSING  # timm name[.tag] or torchvision model name
    weights: Optional[str] = "DEFAULT"  # torchvision weights enum member, DEFAULT or null
    pretrained: bool = True
    checkpoint: Optional[str] = None  # local state-dict file used instead of a download


@dataclass
class HeadConfig:
    """The classifier that replaces the backbone's own."""

    kind: str = "linear"  # linear | mlp
    dropout: float = 0.0  # linear: dropout before the layer
    hidden: int = 256  # mlp only
    dropouts: list[float] = field(default_factory=lambda: [0.5, 0.3])  # mlp only


@dataclass
class StageConfig:
    """One stage of a strategy: which layer groups train, for how long, at which lr.

    `train` holds group selectors: `head`, `last:N` (the N groups before the head, plus
    the head), `all`, or group names. `lr` is one rate for every trained group, `lrs` a
    per-group map (groups it leaves out are frozen), and `lr_decay` multiplies the rate by
    this factor per group from the head towards the stem.
    """

    name: str = MISSING
    epochs: int = MISSING
    train: list[str] = field(default_factory=lambda: ["head"])
    lr: Optional[float] = None
    lrs: Optional[dict[str, float]] = None
    lr_decay: Optional[float] = None


@dataclass
class SizeRule:
    """One row of a data-size table: below `below` training images (null: any), use `strategy`."""

    below: Optional[int] = None
    strategy: str = MISSING


@dataclass
class StrategyConfig:
    name: str = MISSING
    description: str = ""
    pretrained: bool = True  # false: random init whatever the backbone says (scratch)
    lr: float = 1e-3  # default rate of stages that name none
    train_bn: bool = False  # frozen groups keep BatchNorm affine params trainable (stats stay frozen)
    stages: list[StageConfig] = field(default_factory=list)
    by_train_size: Optional[list[SizeRule]] = None  # choose another strategy by data size (auto)


@dataclass
class DatasetConfig:
    """Where images come from. Fields a dataset kind does not use are ignored by it."""

    name: str = MISSING  # flowers102 | cifar10 | dtd | imagenette | folder | synthetic
    root: Optional[str] = None  # folder: the image folder; torchvision sets: cache dir
    download: bool = True
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.2  # folder without train/ and val/: share held out, stratified
    on_bad_image: str = "skip"  # skip (warn, count in summary.json) | error
    train_subset: Optional[int] = None  # stratified, seeded subset of the training split
    val_subset: Optional[int] = None
    cache_images: str = "auto"  # keep decoded, resized images in memory: auto (if within budget) | true | false
    cache_budget_mb: float = 2048.0
    domain: str = "near"  # near | far from ImageNet; far moves `strategy=auto` one step toward fine-tuning
    # synthetic only
    num_classes: int = 4
    train_size: int = 256
    val_size: int = 128
    image_size: int = 64


@dataclass
class TransformsConfig:
    """Preprocessing; null fields follow the backbone's pretrained config."""

    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None  # bilinear | bicubic | nearest
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None


@dataclass
class AugmentConfig:
    """Training-time augmentation, as data; `none` leaves train = eval preprocessing."""

    name: str = MISSING
    random_resized_crop: Optional[list[float]] = None  # scale range, e.g. [0.08, 1.0]
    hflip: float = 0.0
    rotation: float = 0.0
    color_jitter: Optional[list[float]] = None  # brightness, contrast, saturation, hue
    translate: Optional[list[float]] = None
    mixup_alpha: float = 0.0  # > 0: MixUp on training batches (torchvision transforms.v2.MixUp)
    cutmix_alpha: float = 0.0  # > 0: CutMix; with both, each batch picks one at random


@dataclass
class OptimizerConfig:
    name: str = MISSING  # adam | adamw | sgd
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scale: float = 1.0  # multiplies every stage lr (quick runs on random-init models)


@dataclass
class SchedulerConfig:
    name: str = MISSING  # onecycle | cosine | constant
    warmup_pct: float = 0.1


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None  # epochs without improvement before stopping; null: never stop early
    monitor: str = "val/acc1"  # any val/* metric; loss-like metrics are minimized, the rest maximized
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    epochs: Optional[int] = None  # null: the strategy's stage epochs; N: stages scaled to N
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # auto (on for CUDA) | true | false
    channels_last: str = "auto"  # auto (on for CUDA and CPU) | true | false
    seed: int = 42
    num_workers: int = 4
    grad_clip: Optional[float] = None  # max global grad norm
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None  # e.g. 0.999: evaluate and checkpoint an EMA of the weights
    compile: bool = False  # torch.compile the model
    checkpoint_every_steps: Optional[int] = None  # also checkpoint mid-epoch (long epochs)
    log_every: int = 50  # steps between host syncs that check the loss is finite (every step on CPU)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    cache_features: str = "auto"  # auto (where exact) | true (one centre view even with augmentation) | false
    cache_dir: Optional[str] = None  # feature cache; default ~/.cache/transfer/features (TRANSFER_CACHE)


@dataclass
class TensorBoardLoggerConfig:
    log_dir: Optional[str] = None  # null: <run dir>/tensorboard


@dataclass
class MLflowLoggerConfig:
    tracking_uri: Optional[str] = None  # null: a local file store, outputs/mlruns (MLFLOW_TRACKING_URI wins)
    experiment: str = "transfer"
    run_name: Optional[str] = None  # null: the run directory's path


@dataclass
class LoggerConfig:
    """Extra metric sinks (metrics.jsonl and summary.json are always written): `logger=tensorboard`, `logger=mlflow`."""

    tensorboard: Optional[TensorBoardLoggerConfig] = None
    mlflow: Optional[MLflowLoggerConfig] = None


@dataclass
class TrainConfig:
    backbone: BackboneConfig = MISSING
    head: HeadConfig = field(default_factory=HeadConfig)
    strategy: StrategyConfig = MISSING
    dataset: DatasetConfig = MISSING
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    augment: AugmentConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dry_run: bool = False  # validate everything and print the plan without training


def register_configs() -> None:
    """Store the schema so `conf/train.yaml` can extend it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    _stand_in_for_missing_sweeper(ConfigStore.instance())


def _stand_in_for_missing_sweeper(store: Any) -> None:
    """Without the hydra-optuna-sweeper plugin `hparams_search=optuna` still composes (`--cfg`, config tests).

    The stand-in has the plugin's keys and class name; `transfer train -m hparams_search=...`
    stops before Hydra starts with the install hint (hydra_app), so it never runs.
    """
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
        return
    store.store(group="hydra/sweeper", name="optuna", provider="transfer", node={
        "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        "sampler": {}, "direction": "minimize", "storage": None, "study_name": None, "n_trials": 20, "n_jobs": 2,
        "max_failure_rate": 0.0, "search_space": None, "params": None, "custom_search_space": None,
    })


def to_plain(cfg: Any) -> Any:
    """A dataclass config as plain dicts and lists (for JSON and checkpoints)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
