"""Typed schemas for every config node (compose.py stores them in Hydra's ConfigStore).

`conf/train.yaml` names `train_schema` first in its defaults list, so each YAML file and
override is merged onto these dataclasses: an unknown key or a wrong type fails when the
config is composed, not in epoch 3. A field's allowed range sits in its metadata
(`rule(...)`, see checks.py); building a TrainConfig checks them all, so a value out of
range fails there too. Below the CLI the code receives these dataclasses (via
`OmegaConf.to_object`), never a DictConfig.

The dataclasses hold every default: a conf/<group>/ file states only what its choice changes
(tests/test_configs.py refuses one that restates a default). A field marked MACHINERY says how a
run is carried out, not what it computes (`transfer report` never tells runs apart by it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from transfer_cli.config.checks import (
    MACHINERY,
    Items,
    Rule,
    Toggle,
    above,
    at_least,
    auto_or_count,
    between,
    check_tree,
    count_at_least,
    matches,
    one_of,
    only_for,
    ordered,
    rule,
    toggle,
    whole_number,
)


# The one spelling of each choice: composition refuses any other name in one line naming these, the registries
# that build them accept no other (core/registry.py), and conf/<group>/ names its files after them;
# tests/test_config_choices.py proves that every choice has its builder and every builder its choice.
BACKBONE_SOURCE_NAMES = ("timm", "torchvision")
HEAD_KINDS = ("linear", "mlp")
DATASET_NAMES = ("flowers102", "cifar10", "dtd", "imagenette", "folder", "synthetic", "csv")
SYNTHETIC = only_for("synthetic")  # a DatasetConfig field only dataset=synthetic reads
OPTIMIZER_NAMES = ("adam", "adamw", "sgd")
SCHEDULER_NAMES = ("onecycle", "cosine", "constant")
INTERPOLATION_NAMES = ("bilinear", "bicubic", "nearest")
CROP_MODES = ("center", "squash", "border")  # timm's, see TransformsConfig
AUGMENT_POLICIES = ("randaugment", "trivialaugment", "autoaugment")
BN_POLICIES = ("frozen_stats", "reestimate", "train")
DOMAINS = ("near", "far")
BAD_IMAGE_CHOICES = ("skip", "error")
BALANCE_CHOICES = ("none", "sampler", "loss")  # DatasetConfig.balance
# what every epoch records of validation: the selection split's (dataset.select_fraction > 0) and val's
MONITORS = ("select/loss", "select/acc1", "select/acc5", "val/loss", "val/acc1", "val/acc5")
WANDB_MODES = ("online", "offline", "disabled")

TOGGLE = rule(toggle())  # auto | true | false: a Toggle field, read by resolve_toggle (checks.py)
POSITIVE = rule(above(0))
NON_NEGATIVE = rule(at_least(0))
UNIT = between(0, 1)  # [0, 1): dropouts, betas, momentum, label smoothing, warmup share
SHARE = between(0, 1, low_open=True, high_open=False)  # (0, 1]
PROBABILITY = between(0, 1, high_open=False)  # [0, 1]
MISSING = "???"  # OmegaConf's marker for a value the config must give
# torch takes 64-bit seeds, and the sampler and the synthetic images derive theirs as seed * 1_000_003 + epoch
# (or image index): from a seed within 2**40 of 0, every derived one stays within 64 bits
SEED = rule(whole_number(-2**40, 2**40 - 1, "seeds derived from it must fit in 64 bits"))
# a network input: the backbones downsample 32x (ResNet, EfficientNet and ConvNeXt stages; ViT patches of 14 to 32
# px), so a smaller one leaves their last stage under a pixel; a side over 4096 is a typo (a batch of 32 is 6 GB)
INPUT_SIZE = rule(whole_number(32, 4096, "the backbones downsample 32x; over 4096 px a batch fills memory"))
DEVICE = rule(matches(r"auto|cpu|cuda(:\d+)?|mps", "must be one of auto, cpu, cuda, cuda:N, mps"))


@dataclass
class BackboneConfig:
    """Which network to start from and where its weights come from."""

    source: str = field(default=MISSING, metadata=rule(one_of(*BACKBONE_SOURCE_NAMES)))
    name: str = MISSING  # timm name[.tag] or torchvision model name
    weights: Optional[str] = "DEFAULT"  # torchvision weights enum member, DEFAULT or null
    pretrained: bool = True
    checkpoint: Optional[str] = None  # local state-dict file used instead of a download
    # stochastic depth while training (timm drop_path_rate, torchvision stochastic_depth_prob); null: the model's
    drop_path_rate: Optional[float] = field(default=None, metadata=rule(UNIT))
    kwargs: dict[str, Any] = field(default_factory=dict)  # more model arguments, e.g. {drop_rate: 0.2} (timm)


@dataclass
class HeadConfig:
    """The classifier that replaces the backbone's own."""

    kind: str = field(default="linear", metadata=rule(one_of(*HEAD_KINDS)))
    dropout: float = field(default=0.0, metadata=rule(UNIT))  # linear: dropout before the layer
    hidden: int = field(default=256, metadata=POSITIVE)  # mlp only
    dropouts: list[float] = field(default_factory=lambda: [0.5, 0.3],  # mlp only: before each of its two layers
                                  metadata=rule(Items(UNIT, (2,))))


@dataclass
class StageConfig:
    """One stage of a strategy: which layer groups train, for how long, at which lr.

    `train` holds group selectors: `head`, `last:N` (the N groups before the head, plus
    the head), `all`, or group names. `lr` is one rate for every trained group, `lrs` a
    map from selectors to rates (a group takes the rate of the first key that selects it, so
    `{head: 1e-3, "last:1": 1e-4, all: 1e-5}` keeps the head at its own rate; groups no key
    selects are frozen), and `lr_decay` multiplies the rate by this factor per group from the
    head towards the stem.
    """

    name: str = MISSING
    epochs: int = field(default=MISSING, metadata=POSITIVE)
    train: list[str] = field(default_factory=lambda: ["head"])
    lr: Optional[float] = field(default=None, metadata=POSITIVE)
    lrs: Optional[dict[str, float]] = field(default=None, metadata=rule(Items(above(0))))
    lr_decay: Optional[float] = field(default=None, metadata=rule(SHARE))
    bn: Optional[str] = field(default=None, metadata=rule(one_of(*BN_POLICIES)))  # null: the strategy's


@dataclass
class SizeRule:
    """One row of a data-size table: below `below` training images (null: any), use `strategy`."""

    below: Optional[int] = field(default=None, metadata=POSITIVE)
    strategy: str = MISSING


@dataclass
class StrategyConfig:
    name: str = MISSING
    description: str = ""
    pretrained: bool = True  # false: random init whatever the backbone says (scratch)
    lr: float = field(default=1e-3, metadata=POSITIVE)  # default rate of stages that name none
    train_bn: bool = False  # frozen groups keep BatchNorm affine params trainable (stats stay frozen)
    # BatchNorm running stats: frozen_stats (eval mode everywhere; affine params train with their group),
    # reestimate (re-estimated once on the training images before the first stage, then frozen),
    # train (batch stats and running updates in trained groups). docs/batchnorm.md has the evidence.
    # BatchNorm in trained groups; null: frozen_stats from pretrained weights, train from random init
    bn: Optional[str] = field(default=None, metadata=rule(one_of(*BN_POLICIES)))
    stages: list[StageConfig] = field(default_factory=list)
    by_train_size: Optional[list[SizeRule]] = None  # choose another strategy by data size (auto)


@dataclass
class DatasetConfig:
    """Where images come from. Fields a dataset kind does not use are ignored by it."""

    name: str = field(default=MISSING, metadata=rule(one_of(*DATASET_NAMES)))
    root: Optional[str] = None  # folder: the image folder; torchvision sets: cache dir
    # the labels file (path,label[,split]), paths relative to root
    csv: Optional[str] = field(default=None, metadata=only_for("csv"))
    download: bool = field(default=True, metadata=MACHINERY)
    train_split: str = "train"
    val_split: str = "val"
    # folder without train/ and val/: share held out, stratified
    val_fraction: float = field(default=0.2, metadata=rule(between(0, 1, low_open=True)))
    # skip (warn, count in summary.json) | error
    on_bad_image: str = field(default="skip", metadata=rule(one_of(*BAD_IMAGE_CHOICES)))
    # unequal classes: none | sampler (draw each class equally often) | loss (weight each class's loss)
    balance: str = field(default="none", metadata=rule(one_of(*BALANCE_CHOICES)))
    # seeds which images the val_fraction split holds out, the subsets and the synthetic images; fixed apart
    # from trainer.seed, so a seed sweep varies training alone
    split_seed: int = field(default=42, metadata=SEED)
    # share of each class of train held out to choose the best epoch (best.pt, early stopping) on, so val
    # reports a checkpoint it did not choose; 0: choose on val (that number is then optimistic)
    select_fraction: float = field(default=0.1, metadata=rule(between(0, 1, high_open=True)))
    # stratified, seeded subset of the training split (the selection split is carved from it)
    train_subset: Optional[int] = field(default=None, metadata=POSITIVE)
    val_subset: Optional[int] = field(default=None, metadata=POSITIVE)
    # keep decoded, resized images in memory: auto (if within budget) | true | false
    cache_images: Toggle = field(default="auto", metadata=TOGGLE | MACHINERY)
    cache_budget_mb: float = field(default=2048.0, metadata=NON_NEGATIVE | MACHINERY)
    # near | far from ImageNet; far moves `strategy=auto` one step toward fine-tuning
    domain: str = field(default="near", metadata=rule(one_of(*DOMAINS)))
    # the generated images of `synthetic`
    num_classes: int = field(default=4, metadata=rule(at_least(2)) | SYNTHETIC)
    train_size: int = field(default=256, metadata=POSITIVE | SYNTHETIC)
    val_size: int = field(default=128, metadata=POSITIVE | SYNTHETIC)
    image_size: int = field(default=64, metadata=rule(whole_number(1, 4096, "a side in pixels")) | SYNTHETIC)


@dataclass
class TransformsConfig:
    """Preprocessing; null fields follow the backbone's pretrained config. mean and std take one
    value per RGB channel, or one for all three. crop_mode is timm's: center (short side to
    image_size/crop_pct, centre crop), squash (both sides, aspect not kept) or border (long
    side, padded with the mean colour); crop_pct > 1 leaves a border (timm's volo_*_448: 1.15),
    and below 1.5 the image still fills two thirds of each side."""

    image_size: Optional[int] = field(default=None, metadata=INPUT_SIZE)  # square; null: the weights' (maybe not)
    crop_pct: Optional[float] = field(default=None, metadata=rule(between(0, 1.5, low_open=True)))
    crop_mode: Optional[str] = field(default=None, metadata=rule(one_of(*CROP_MODES)))
    interpolation: Optional[str] = field(default=None, metadata=rule(one_of(*INTERPOLATION_NAMES)))
    mean: Optional[list[float]] = field(
        default=None, metadata=rule(Items(Rule(math.isfinite, "must be a finite number"), (3, 1))))
    std: Optional[list[float]] = field(default=None, metadata=rule(Items(above(0), (3, 1))))
    # decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) where the first resize or random crop keeps
    # >= 2 decoded pixels per output pixel each way (data/decode.py); false: always decode in full
    draft_decode: bool = True


@dataclass
class AugmentConfig:
    """Training-time augmentation, as data; `none` leaves train = eval preprocessing."""

    name: str = MISSING
    random_resized_crop: Optional[list[float]] = field(  # scale range, e.g. [0.08, 1.0]
        default=None, metadata=rule(Items(SHARE, (2,), Rule(ordered, "must be [smallest, largest] scale"))))
    hflip: float = field(default=0.0, metadata=rule(PROBABILITY))
    rotation: float = field(default=0.0, metadata=rule(between(0, 180, high_open=False)))  # degrees
    color_jitter: Optional[list[float]] = field(  # brightness, contrast, saturation (>= 0), hue (<= 0.5)
        default=None, metadata=rule(Items(at_least(0), (1, 2, 3, 4),
                                          Rule(lambda v: len(v) < 4 or v[3] <= 0.5, "its hue (4th) must be <= 0.5"))))
    translate: Optional[list[float]] = field(  # largest shift as a share of width, height
        default=None, metadata=rule(Items(PROBABILITY, (2,))))
    # an automatic policy from torchvision transforms.v2, after the crop and flip
    policy: Optional[str] = field(default=None, metadata=rule(one_of(*AUGMENT_POLICIES)))
    # > 0: MixUp on training batches (torchvision transforms.v2.MixUp)
    mixup_alpha: float = field(default=0.0, metadata=NON_NEGATIVE)
    # > 0: CutMix; with both, each batch picks one at random
    cutmix_alpha: float = field(default=0.0, metadata=NON_NEGATIVE)


@dataclass
class OptimizerConfig:
    name: str = field(default=MISSING, metadata=rule(one_of(*OPTIMIZER_NAMES)))
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    momentum: float = field(default=0.9, metadata=rule(UNIT))  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=rule(Items(UNIT, (2,))))
    # multiplies every stage lr (quick runs on random-init models)
    lr_scale: float = field(default=1.0, metadata=POSITIVE)


@dataclass
class SchedulerConfig:
    name: str = field(default=MISSING, metadata=rule(one_of(*SCHEDULER_NAMES)))
    warmup_pct: float = field(default=0.1, metadata=rule(UNIT))


@dataclass
class EarlyStoppingConfig:
    # epochs without improvement before stopping; null: never stop early
    patience: Optional[int] = field(default=None, metadata=POSITIVE)
    # <split>/loss (minimized), <split>/acc1 or <split>/acc5 (maximized; top-5 needs more than 5 classes, checked
    # once the data is known); null: the split best.pt is chosen on (select/acc1, or val/acc1 without one)
    monitor: Optional[str] = field(default=None, metadata=rule(one_of(*MONITORS)))
    min_delta: float = field(default=0.0, metadata=NON_NEGATIVE)


@dataclass
class TrainerConfig:
    # null: the strategy's stage epochs; N: stages scaled to N
    epochs: Optional[int] = field(default=None, metadata=POSITIVE)
    # N: every stage runs N epochs, whatever the strategy's stage count (debug=fast: 1); null: as `epochs` says
    epochs_per_stage: Optional[int] = field(default=None, metadata=POSITIVE)
    batch_size: int = field(default=32, metadata=POSITIVE)
    eval_batch_size: Optional[int] = field(default=None, metadata=POSITIVE | MACHINERY)
    device: str = field(default="auto", metadata=DEVICE | MACHINERY)
    # auto: on for CUDA (bf16 where the GPU has it natively, else fp16 with a grad scaler)
    amp: Toggle = field(default="auto", metadata=TOGGLE)
    # auto: on for CUDA and CPU (faster convolutions); false: contiguous
    channels_last: Toggle = field(default="auto", metadata=TOGGLE | MACHINERY)
    seed: int = field(default=42, metadata=SEED)
    # DataLoader worker processes: auto is min(8, CPU count), as `transfer bench --gpu` measures; or a count
    num_workers: Any = field(default="auto", metadata=rule(auto_or_count(0)) | MACHINERY)
    # uint8 batches cross to the device, which converts and normalizes them (4x fewer bytes than float32):
    # auto (on CUDA) | true | false (the loader normalizes)
    normalize_on_device: Toggle = field(default="auto", metadata=TOGGLE | MACHINERY)
    # JPEG batches decoded on the device (torchvision.io.decode_jpeg: nvjpeg on CUDA) and augmented there with
    # transforms.v2 on tensors; workers only read files (data/device_decode.py). For data beyond the image cache
    decode_on_device: bool = field(default=False, metadata=MACHINERY)
    grad_clip: Optional[float] = field(default=None, metadata=POSITIVE)  # max global grad norm
    # batches whose mean gradient makes one optimizer step (effective batch: batch_size x this); schedules and the
    # EMA count optimizer steps; progress lines, log_every, limit_train_batches and checkpoint_every_steps batches
    accumulate_steps: int = field(default=1, metadata=rule(count_at_least(1)))
    label_smoothing: float = field(default=0.0, metadata=rule(UNIT))
    # e.g. 0.999: evaluate and checkpoint an EMA of the weights
    ema_decay: Optional[float] = field(default=None, metadata=rule(between(0, 1, low_open=True)))
    compile: bool = field(default=False, metadata=MACHINERY)  # torch.compile the model
    # CUDA: no cuDNN autotuning, no TF32 (repeatable numbers over speed)
    deterministic: bool = field(default=False, metadata=MACHINERY)
    # also checkpoint mid-epoch (long epochs)
    checkpoint_every_steps: Optional[int] = field(default=None, metadata=POSITIVE | MACHINERY)
    # steps between host syncs that check the loss is finite (every step on CPU)
    log_every: int = field(default=50, metadata=POSITIVE | MACHINERY)
    limit_train_batches: Optional[int] = field(default=None, metadata=POSITIVE)  # debug: steps per epoch at most
    limit_val_batches: Optional[int] = field(default=None, metadata=POSITIVE)  # debug: val batches at most
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # train head-only stages on backbone features computed once: auto (where exact) | true (one centre view even
    # with augmentation) | false
    cache_features: Toggle = field(default="auto", metadata=TOGGLE | MACHINERY)
    # feature cache; null: ~/.cache/transfer/features (TRANSFER_CACHE)
    cache_dir: Optional[str] = field(default=None, metadata=MACHINERY)


@dataclass
class TensorBoardLoggerConfig:
    log_dir: Optional[str] = None  # null: <run dir>/tensorboard


@dataclass
class MLflowLoggerConfig:
    tracking_uri: Optional[str] = None  # null: sqlite database outputs/mlflow.db (MLFLOW_TRACKING_URI wins)
    experiment: str = "transfer"
    run_name: Optional[str] = None  # null: the run directory's path


@dataclass
class WandbLoggerConfig:
    project: str = "transfer"
    entity: Optional[str] = None  # null: the account's default entity
    name: Optional[str] = None  # null: the run directory's name
    # null: WANDB_MODE, else online; offline keeps the run in <run dir>/wandb for `wandb sync`
    mode: Optional[str] = field(default=None, metadata=rule(one_of(*WANDB_MODES)))


@dataclass
class LoggerConfig:
    """Extra metric sinks (metrics.jsonl and summary.json are always written): `logger=tensorboard|mlflow|wandb`."""

    tensorboard: Optional[TensorBoardLoggerConfig] = None
    mlflow: Optional[MLflowLoggerConfig] = None
    wandb: Optional[WandbLoggerConfig] = None


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
    logger: LoggerConfig = field(default_factory=LoggerConfig, metadata=MACHINERY)
    dry_run: bool = False  # validate everything and print the plan without training
    eval_splits: list[str] = field(default_factory=list)  # e.g. [test]: best.pt scored on each when training ends

    def __post_init__(self) -> None:
        """Every value in its range, checked whenever a config is built (composition, `OmegaConf.to_object`,
        a run dir's config.yaml, `transfer eval` overrides): a bad one is one line naming the key."""
        check_tree(self)


def to_plain(cfg: Any) -> Any:
    """A dataclass config as plain dicts and lists (for JSON and checkpoints)."""
    if is_dataclass(cfg):
        return {spec.name: to_plain(getattr(cfg, spec.name)) for spec in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(value) for value in cfg]
    if isinstance(cfg, dict):
        return {key: to_plain(value) for key, value in cfg.items()}
    return cfg
