"""The pre-flight plan: what a run will do, checked before any training (and saved as plan.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.balance import imbalance, per_class
from transfer_cli.data.datasets import RawSplits
from transfer_cli.models.backbones import weights_location
from transfer_cli.training.optim import mean_factor


if TYPE_CHECKING:
    from transfer_cli.training.assemble import Prepared


def _check_coverage(prepared: "Prepared") -> dict[str, int]:
    """Parameters per group; every parameter must belong to exactly one group."""
    owners: dict[str, list[str]] = {}
    model = prepared.setup.model
    for group in model.groups:
        for name in group.params:
            owners.setdefault(name, []).append(group.name)
    params = dict(model.model.named_parameters())
    orphans = sorted(set(params) - set(owners))
    doubles = sorted(name for name, groups in owners.items() if len(groups) > 1)
    if orphans or doubles:
        raise TransferError(f"layer groups do not partition the parameters (in no group: {orphans[:5]}, "
                            f"in two: {doubles[:5]}): fix the backbone's group matcher")
    return {g.name: sum(params[n].numel() for n in g.params) for g in model.groups}


def _out_features(head: Any) -> int | None:
    linears = [m for m in head.modules() if hasattr(m, "out_features")]
    return linears[-1].out_features if linears else None


def build_plan(cfg: TrainConfig, prepared: "Prepared") -> dict[str, Any]:
    """Backbone and weights origin, data vs head, normalization vs the weights', and every stage."""
    sizes = _check_coverage(prepared)
    model, pre = prepared.setup.model, prepared.preprocessing
    head = model.model.get_submodule(model.head_path)
    total = sum(sizes.values())
    stages = []
    steps_per_epoch = prepared.setup.accumulation(prepared.setup.train_loader).steps
    for stage in prepared.setup.stages:
        trainable = sum(sizes[g] for g in stage.lrs)
        mean = mean_factor(cfg.scheduler, stage.epochs * steps_per_epoch)
        stages.append({"name": stage.name, "epochs": stage.epochs, "bn": stage.bn, "trainable_params": trainable,
                       "frozen_params": total - trainable, "schedule": cfg.scheduler.name, "mean_lr_factor": mean,
                       "groups": [{"name": g, "lr": lr, "mean_lr": lr * mean, "params": sizes[g]}
                                  for g, lr in stage.lrs.items()]})
    weights = model.preprocessing
    return {
        "backbone": {"source": cfg.backbone.source, "name": cfg.backbone.name,
                     "weights": weights_location(cfg.backbone, prepared.strategy.pretrained, model.model)},
        "strategy": {"name": prepared.strategy.name, "choice": prepared.strategy_choice or None},
        "data": {"dataset": cfg.dataset.name, "classes": len(prepared.splits.classes),
                 "head_outputs": _out_features(head),
                 "train_images": len(prepared.splits.train), "val_images": len(prepared.splits.val),
                 "select_images": len(prepared.splits.select) if prepared.splits.select is not None else 0,
                 **_class_counts(prepared.splits), "balance": cfg.dataset.balance},
        "normalization": {"mean": list(pre.mean), "std": list(pre.std), "weights_mean": list(weights.mean),
                          "weights_std": list(weights.std),
                          "matches_weights": pre.mean == weights.mean and pre.std == weights.std},
        "input": {"image_size": pre.image_size, "resize_size": pre.resize_size, "interpolation": pre.interpolation,
                  "crop_mode": pre.crop_mode},
        "layer_groups": sizes,
        "stages": stages,
        # dataset.split_seed picks the images (split, subsets), trainer.seed the training (init, order, augmentation)
        "seeds": {"split": cfg.dataset.split_seed, "training": cfg.trainer.seed},
        "select_fraction": cfg.dataset.select_fraction,
    }


def _class_counts(splits: RawSplits) -> dict[str, Any]:
    """Images per class of each split, and the training split's imbalance; unknown for data not downloaded yet."""
    if splits.not_downloaded:
        return {"not_downloaded": splits.not_downloaded}
    train = per_class(splits.train_labels, splits.classes)
    return {"train_per_class": train, "val_per_class": per_class(splits.val_labels, splits.classes),
            "imbalance": imbalance(train)}


def _data_lines(d: dict[str, Any]) -> list[str]:
    """Where the images are (or would be downloaded), how many per class, and a warning for unequal classes."""
    if "not_downloaded" in d:
        return [f"dataset   {d['dataset']}: {d['not_downloaded']}"]
    lines = [f"per class train {_counts(d['train_per_class'])}; val {_counts(d['val_per_class'])}"]
    skew = d["imbalance"]
    if skew is not None:
        counts = d["train_per_class"]
        fix = (f"dataset.balance={d['balance']} evens them out" if d["balance"] != "none"
               else "dataset.balance=sampler draws every class equally often")
        largest, smallest = skew["largest"], skew["smallest"]
        if skew["ratio"] is None:
            lines.append(f"warning   class {smallest!r} has no train images ({largest!r} has {counts[largest]}): "
                         "add some, or drop the class")
        else:
            lines.append(f"warning   imbalanced classes: {largest!r} has {skew['ratio']:.1f}x the train images of "
                         f"{smallest!r} ({counts[largest]} vs {counts[smallest]}): {fix}")
    return lines


def _selection(d: dict[str, Any], fraction: float) -> str:
    """Which split chooses best.pt (runs/selection.py)."""
    if not fraction:
        return "best.pt chosen on val (dataset.select_fraction=0): the val number it reports is optimistic"
    held = f"{d['select_images']} images" if d["select_images"] else f"{fraction:g} of each class"
    return f"best.pt chosen on {held} held out of train (dataset.select_fraction); val only reports it"


def _counts(counts: dict[str, int], listed: int = 12) -> str:
    """Each class's count, or for many classes their range and the classes at its ends."""
    if len(counts) <= listed:
        return ", ".join(f"{name} {count}" for name, count in counts.items())
    fewest, most = min(counts, key=counts.__getitem__), max(counts, key=counts.__getitem__)
    return f"{counts[fewest]} ({fewest}) to {counts[most]} ({most}) images over {len(counts)} classes"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the few lines a person reads before a long run."""
    w, d, n = plan["backbone"]["weights"], plan["data"], plan["normalization"]
    where = w["from"] + (f" (cache {w['cache']}: {'present' if w.get('present') else 'missing'}"
                         f"{', offline' if w.get('offline') else ''})" if "cache" in w else "")
    verdict = ("matches the weights" if n["matches_weights"]
               else f"DIFFERS from the weights: {n['weights_mean']} / {n['weights_std']}")
    lines = [
        f"strategy  {plan['strategy']['name']}"
        + (f" ({plan['strategy']['choice']})" if plan["strategy"]["choice"] else ""),
        f"backbone  {plan['backbone']['source']} {plan['backbone']['name']}; weights: {where}",
        f"data      {d['dataset']}: {d['classes']} classes, head outputs {d['head_outputs']}; "
        f"{d['train_images']} train / {d['val_images']} val images",
        *_data_lines(d),
        "select    " + _selection(d, plan["select_fraction"]),
        f"input     {_pixels(plan['input']['image_size'])} ({plan['input']['crop_mode']}, resize "
        f"{_pixels(plan['input']['resize_size'])}, {plan['input']['interpolation']}); "
        f"mean {n['mean']} std {n['std']} ({verdict})",
        f"seeds     split {plan['seeds']['split']} (dataset.split_seed), training {plan['seeds']['training']} "
        "(trainer.seed)",
        "groups    " + ", ".join(f"{g} {p:,}" for g, p in plan["layer_groups"].items()),
    ]
    for i, stage in enumerate(plan["stages"], 1):
        groups = ", ".join(f"{g['name']}@{g['lr']:g}" for g in stage["groups"])
        lines.append(f"stage {i}   {stage['name']}: {stage['epochs']} epochs, trains {groups} (peak lr; "
                     f"{stage['schedule']}: mean {stage['mean_lr_factor']:.2f}x peak); "
                     f"{stage['trainable_params']:,} trainable / {stage['frozen_params']:,} frozen params; bn "
                     f"{stage['bn']}")
    return "\n".join(lines)


def _pixels(size: int | list[int] | tuple[int, int]) -> str:
    """224px, or 1024x768px where the weights' input is not square (height x width)."""
    return f"{size}px" if isinstance(size, int) else f"{size[0]}x{size[1]}px"
