"""`transfer exercise normalization`: the lesson's exercise 5, what wrong input normalization does.

A pretrained network is scored with its own 1000-way ImageNet head (no new head, no
training) on a small evaluation set - the val split of `dataset`, `dataset.val_subset`
images of it (100 in experiment=exercise5) - once per normalization:

- `imagenet`: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), what torchvision's
  weights (and most timm weights) were trained with;
- `none`: mean 0, std 1, i.e. the [0, 1] pixels as they come out of ToTensor;
- `half`: mean = std = 0.5, i.e. pixels in [-1, 1] (what TF-ported timm weights such as
  tf_efficientnet_lite0 were trained with);
- `weights`: whatever the backbone's pretrained config says (its own normalization).

Every other preprocessing step (resize, crop, interpolation) follows the weights, so the
normalization is the only thing that changes. Labels must be ImageNet classes: dataset
classes are mapped to ImageNet indices by index (`310`), WordNet id (`n02219486`) or name
(`ant`, also `ants` by a simple plural 's' strip, matched against the synonyms of
timm.data.ImageNetInfo's descriptions). Imagenette's classes map by name.

Writes results.md, results.csv, results.json and normalization.png (sample images as the
network receives them under each normalization) into --out.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from transfer_cli.core.files import atomic_file, write_text
from transfer_cli.core.plotting import pyplot, save_figure
from transfer_cli.core.tables import markdown
from transfer_cli.lesson.imagenet_classes import imagenet_class_name, imagenet_index
from transfer_cli.lesson.normalizations import (
    Normalization,
    NormResult,
    evaluate_normalizations,
    resolve_normalizations,
    same_values,
)
from transfer_cli.runs.runlog import write_json


DEFAULT_EXPERIMENT = "exercise5"
DEFAULT_OUT = Path("outputs/exercises/ex5")
# --------------------------------------------------------------------------- outputs


def _triple(values: list[float]) -> str:
    return "0.5" if same_values(values, [0.5] * 3) else "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _value(values: list[float], digits: int) -> str:
    """One value, or mean ± sample std over the seeds' evaluation subsets."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def role(weights_own: bool) -> str:
    """What a normalization is for the network scored: the one its weights were trained with, or not."""
    return "the weights' own normalization" if weights_own else "another one"


def markdown_table(runs: list[list[NormResult]]) -> str:
    """One row per normalization; with several seeds each number is mean ± std over their subsets."""
    header = ["for these weights", "normalization", "mean", "std", "top-1", "top-5", "top-1 among the set's classes",
              "input mean", "input std"]
    lines = []
    for column in zip(*runs):
        r = column[0]
        lines.append([role(r.weights_own), r.label, _triple(r.mean), _triple(r.std),
                      _value([c.top1 for c in column], 4), _value([c.top5 for c in column], 4),
                      _value([c.top1_among_classes for c in column], 4),
                      _value([c.input_mean for c in column], 3), _value([c.input_std for c in column], 3)])
    return markdown(header, lines)


def summarize(column: tuple[NormResult, ...]) -> dict[str, Any]:
    """results.json's entry for one normalization: the result itself for one seed, else means and stds."""
    if len(column) == 1:
        return asdict(column[0])
    first = column[0]
    entry: dict[str, Any] = {"key": first.key, "label": first.label, "mean": first.mean, "std": first.std,
                             "weights_own": first.weights_own, "images": first.images}
    for name in ("top1", "top5", "top1_among_classes", "input_mean", "input_std"):
        values = [getattr(c, name) for c in column]
        entry[name], entry[f"{name}_std"] = statistics.mean(values), statistics.stdev(values)
    return entry


def write_outputs(out: Path, runs: list[list[NormResult]], seeds: list[int], info: dict[str, Any]) -> str:
    """results.md (context lines and the table), results.csv (one row per seed and normalization) and
    results.json; returns the table."""
    table = markdown_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    subsets = (f"; mean ± std over {len(seeds)} evaluation subsets (dataset.split_seed={','.join(map(str, seeds))})"
               if len(seeds) > 1 else "")
    context = (f"Exercise 5: {info['backbone']} ({info['weights']}) with its own 1000-way ImageNet head on "
               f"{info['images']} {info['dataset']} images ({info['classes_mapped']}){subsets}; preprocessing from "
               f"the weights: {info['image_size']} px, crop_pct {info['crop_pct']}, {info['interpolation']}; the "
               f"weights' own normalization: mean {_triple(info['weights_mean'])}, std {_triple(info['weights_std'])}; "
               f"device {info['device']}, {info['seconds']:.1f}s.")
    write_text(out / "results.md", context + "\n\n" + table + "\n")
    with atomic_file(out / "results.csv") as file:
        writer = csv.writer(file)
        writer.writerow(["split_seed", "normalization", "key", "mean", "std", "weights_own", "top1", "top5",
                         "top1_among_classes", "input_mean", "input_std", "images"])
        for seed, results in zip(seeds, runs):
            for r in results:
                writer.writerow([seed, r.label, r.key, " ".join(map(str, r.mean)), " ".join(map(str, r.std)),
                                 r.weights_own, r.top1, r.top5, r.top1_among_classes, r.input_mean, r.input_std,
                                 r.images])
    payload = {**info, "split_seeds": seeds, "results": [summarize(column) for column in zip(*runs)],
               "per_seed": [{"split_seed": seed, "results": [asdict(r) for r in results]}
                            for seed, results in zip(seeds, runs)]}
    write_json(out / "results.json", payload)
    return table


def plot_samples(path: Path, images: torch.Tensor, truth: list[int], norms: list[Normalization],
                 predictions: dict[str, list[int]], results: list[NormResult],
                 own_mean: tuple[float, ...], own_std: tuple[float, ...]) -> None:
    """One row per normalization: each sample as the network receives it, decoded with the weights' own
    normalization (what the first layer 'sees'), with the predicted class; last column, a histogram of
    the input values against the distribution the weights expect."""
    plt = pyplot()

    own = Normalization("own", "", tuple(own_mean), tuple(own_std))
    expected = own.apply(images).flatten().numpy()
    count = len(images)
    figure, axes = plt.subplots(len(norms) + 1, count + 1, figsize=(2.3 * (count + 1), 2.4 * (len(norms) + 1)),
                                squeeze=False)
    by_key = {r.key: r for r in results}
    for column in range(count):
        axis = axes[0][column]
        axis.imshow(images[column].permute(1, 2, 0).clamp(0, 1).numpy())
        axis.set_title(f"true: {imagenet_class_name(truth[column])}"[:28], fontsize=8)
    axes[0][0].set_ylabel("the image\n(resized, cropped)", fontsize=8)
    info = axes[0][count]
    info.axis("off")
    info.text(0.0, 0.5, f"the weights expect\nmean {_triple(list(own_mean))}\nstd {_triple(list(own_std))}\n"
                        "rows below: input x decoded\nas x * std + mean", fontsize=8, va="center")
    for row, norm in enumerate(norms, start=1):
        inputs = norm.apply(images)
        seen = own.decode(inputs)
        result = by_key[norm.key]
        for column in range(count):
            axis = axes[row][column]
            axis.imshow(seen[column].permute(1, 2, 0).clamp(0, 1).numpy())
            predicted = predictions[norm.key][column]
            mark = "ok" if predicted == truth[column] else "wrong"
            axis.set_title(f"{imagenet_class_name(predicted)} ({mark})"[:28], fontsize=8,
                           color="green" if predicted == truth[column] else "red")
        axes[row][0].set_ylabel(f"{norm.label}\n({role(result.weights_own)})\ntop-1 {result.top1:.2f}", fontsize=8)
        hist = axes[row][count]
        hist.hist(expected, bins=60, range=(-3, 3), color="grey", alpha=0.5, density=True, label="expected")
        hist.hist(inputs.flatten().numpy(), bins=60, range=(-3, 3), alpha=0.6, density=True, label="received")
        hist.set_title(f"input mean {result.input_mean:.2f}, std {result.input_std:.2f}", fontsize=8)
        hist.tick_params(labelsize=7)
        hist.set_yticks([])
        if row == 1:
            hist.legend(fontsize=7)
    for row in axes:
        for axis in row[:count]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle("what the network receives under each normalization (decoded with the weights' own mean/std)",
                    fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=90)


# --------------------------------------------------------------------------- the command


def with_experiment(overrides: list[str]) -> list[str]:
    """`overrides` on experiment=exercise5, unless they name another experiment."""
    if any(o.lstrip("+~").split("=", 1)[0] == "experiment" for o in overrides):
        return overrides
    return [f"experiment={DEFAULT_EXPERIMENT}", *overrides]


def sample_indices(labels: list[int], count: int) -> list[int]:
    """Up to `count` indices, one class after another (the first image of each class first)."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < count and any(depth < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(chosen) < count:
                chosen.append(by_class[label][depth])
        depth += 1
    return chosen


def run_normalization(overrides: list[str], out: Path, norm_keys: list[str], samples: int,
                      seeds: list[int] | None = None) -> str:
    """Exercise 5 end to end; returns the markdown table. `seeds`: one evaluation subset per
    dataset.split_seed (default: the config's own), the table then shows mean ± std over them."""
    from transfer_cli.config.compose import compose_config
    from transfer_cli.data.datasets import load_splits
    from transfer_cli.data.loaders import TransformedDataset, eval_loader
    from transfer_cli.data.transforms import eval_transform, resolve_preprocessing
    from transfer_cli.models.backbones import build_raw_backbone
    from transfer_cli.models.runtime import resolve_device, resolve_precision

    started = time.perf_counter()
    cfg = compose_config(with_experiment(overrides))
    seeds = seeds or [cfg.dataset.split_seed]
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)  # a random-init backbone (backbone.pretrained=false) repeats
    raw = build_raw_backbone(cfg.backbone, pretrained=True)
    own = raw.preprocessing
    pretrained = cfg.backbone.pretrained or cfg.backbone.checkpoint is not None
    pre = resolve_preprocessing(own, replace(cfg.transforms, mean=None, std=None), pretrained)
    pre = replace(pre, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # [0, 1] pixels; each norm applied per batch
    norms = resolve_normalizations(norm_keys, own.mean, own.std)
    # fp32 whatever trainer.amp says; trainer.channels_last (auto: on) picks the memory layout
    channels_last = resolve_precision(cfg.trainer, device)[0].channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = raw.model.to(device, memory_format=memory_format)
    subsets = [load_splits(replace(cfg.dataset, split_seed=seed)) for seed in seeds]  # same classes, other images
    splits = subsets[0]  # the context lines and the figure show the first
    targets = [imagenet_index(name) for name in splits.classes]
    datasets = [TransformedDataset(subset.val, eval_transform(pre)) for subset in subsets]
    runs = [evaluate_normalizations(model, eval_loader(dataset, cfg.trainer, pin_memory=False), targets, norms,
                                    own.mean, own.std, device, memory_format) for dataset in datasets]
    mapped = ", ".join(f"{name} -> {index} {imagenet_class_name(index)}"
                       for name, index in zip(splits.classes, targets))
    info = {
        "backbone": cfg.backbone.name, "source": cfg.backbone.source, "weights": raw.weights_source,
        "dataset": cfg.dataset.name if cfg.dataset.name != "folder" else f"folder {cfg.dataset.root}",
        "split": cfg.dataset.val_split, "images": runs[0][0].images, "classes": splits.classes,
        "targets": targets, "classes_mapped": mapped, "image_size": pre.image_size, "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation, "weights_mean": list(own.mean), "weights_std": list(own.std),
        "device": str(device), "seed": cfg.trainer.seed, "torch_threads": torch.get_num_threads(),
    }
    picked = sample_indices(list(splits.val_labels), samples)
    info["samples"] = picked
    info["seconds"] = time.perf_counter() - started
    table = write_outputs(out, runs, seeds, info)
    if picked:
        images = torch.stack([datasets[0][i][0] for i in picked])
        truth = [targets[splits.val_labels[i]] for i in picked]
        with torch.no_grad():
            model.eval()
            predictions = {n.key: model(n.apply(images).to(device).contiguous(memory_format=memory_format))
                           .argmax(dim=1).tolist() for n in norms}
        plot_samples(out / "normalization.png", images, truth, norms, predictions, runs[0], own.mean, own.std)
    return table


