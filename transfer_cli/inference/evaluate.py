"""Scoring a run's checkpoint on one split, class by class (`transfer eval`).

The per-epoch top-1 in metrics.jsonl says how often a model is right; per-class accuracy, balanced accuracy,
macro-F1 and the confusion matrix say which classes it mixes up; predictions.csv and the top-losses galleries say
which images. Results are written to RUN_DIR/eval/<split>/<checkpoint>/ so each split and checkpoint keeps its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from transfer_cli.config.loading import apply_overrides, load_run_config
from transfer_cli.config.schema import DatasetConfig, TrainConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import refuse_links_below
from transfer_cli.core.plotting import pyplot, save_figure
from transfer_cli.core.tables import aligned
from transfer_cli.data.datasets import check_classes, load_splits
from transfer_cli.data.folder import folder_layout
from transfer_cli.data.loaders import TransformedDataset, eval_loader
from transfer_cli.data.transforms import eval_transform
from transfer_cli.inference.gallery import MAX_SHOWN, top_losses, write_galleries
from transfer_cli.inference.load import load_trained_model, preprocessing_of
from transfer_cli.inference.predictions import (
    Counts,
    SplitScores,
    balanced_accuracy,
    dataset_root,
    item_files,
    row_names,
    score_split,
    write_predictions,
)
from transfer_cli.inference.topk import topk_for, topk_hits
from transfer_cli.inference.tta import TTA_CHOICES, check_tta, tta_scores, tta_transform
from transfer_cli.models.runtime import Precision, configure_cuda_math, resolve_device, resolve_precision
from transfer_cli.runs import runlog
from transfer_cli.runs.rundir import require_run_dir


# Only these groups change what eval does; the network itself comes from the checkpoint.
EVAL_GROUPS = ("dataset", "transforms", "trainer")
TTA_FIGURES = ("acc1", "acc5", "balanced_accuracy", "macro_f1", "loss")  # metrics.json's `tta` block
SHOWN_CLASSES = 10  # longer class lists print only the worst ones (all are in metrics.json)


@torch.inference_mode()
def count_predictions(model: nn.Module, loader: DataLoader, precision: Precision, num_classes: int) -> Counts:
    """Confusion matrix, top-k hits and summed cross-entropy over `loader`, in eval mode.

    Top-1 is the first of the top-k indices, as in loop.evaluate, so ties break alike. The counts add up on
    the device; the host reads them once, at the end.
    """
    model.eval()
    topk = topk_for(num_classes)
    device = precision.device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    hits = torch.zeros(len(topk), dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=None):
        images, labels = precision.to_device(images, labels)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        loss += F.cross_entropy(logits, labels, reduction="sum").double()
        batch_hits, predicted = topk_hits(logits, labels, topk)
        hits += batch_hits
        # into the fixed-size matrix on the device: bincount sizes its output from the data, a host sync per batch
        confusion.index_add_(0, labels * num_classes + predicted, torch.ones_like(predicted))
    return Counts(confusion.view(num_classes, num_classes).tolist(), dict(zip(topk, hits.tolist())), loss.item())


def summarize(counts: Counts, classes: list[str]) -> dict[str, Any]:
    """Top-k, balanced accuracy, mean cross-entropy (no label smoothing), per-class accuracy (recall), precision and
    F1, and macro-F1.

    Macro-F1 averages F1 over the classes that occur as a label or a prediction (as
    scikit-learn does); a class with no support has accuracy None.
    """
    confusion = counts.confusion
    total = sum(map(sum, confusion))
    if total == 0:
        raise TransferError("the split holds no images")
    per_class: dict[str, dict[str, Any]] = {}
    f1s = []
    for i, name in enumerate(classes):
        hit, support, predicted = confusion[i][i], sum(confusion[i]), sum(row[i] for row in confusion)
        f1 = 2 * hit / (support + predicted) if support + predicted else None
        if f1 is not None:
            f1s.append(f1)
        per_class[name] = {"support": support, "accuracy": hit / support if support else None,
                           "precision": hit / predicted if predicted else None, "f1": f1}
    return {
        "images": total,
        "num_classes": len(classes),
        **{f"acc{k}": hits / total for k, hits in counts.topk_hits.items()},
        "balanced_accuracy": balanced_accuracy(confusion),
        "macro_f1": sum(f1s) / len(f1s),
        "loss": counts.loss_sum / total,
        "per_class": per_class,
    }


@dataclass(frozen=True)
class EvalOptions:
    """What eval itself takes besides config keys: `checkpoint=`, `top_losses=`, `tta=`."""

    checkpoint: str = "best"
    top_losses: int = 16
    tta: str = "none"


def evaluate_run(run_dir: Path, overrides: list[str]) -> tuple[dict[str, Any], Path]:
    """Evaluate a run's checkpoint on the split its (overridden) config names; write eval/<split>/<checkpoint>/
    (best.pt's and last.pt's results kept apart): metrics.json, predictions.csv, the confusion matrix, the
    top-losses galleries."""
    run_dir = require_run_dir(run_dir)
    options, cfg, config_overrides = _eval_config(run_dir, overrides)
    _, model, classes = load_trained_model(run_dir, options.checkpoint)
    device = resolve_device(cfg.trainer.device)
    precision, _ = resolve_precision(cfg.trainer, device)
    configure_cuda_math(device, deterministic=cfg.trainer.deterministic)
    model.model.to(device, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
    preprocessing, draft, pin_memory = preprocessing_of(cfg, model), cfg.transforms.draft_decode, device.type == "cuda"
    images = _split_images(cfg, classes)
    inputs = TransformedDataset(images, eval_transform(preprocessing, draft=draft))
    scores = score_split(model.model, eval_loader(inputs, cfg.trainer, pin_memory), precision)
    files = item_files(images)
    names = row_names(files, dataset_root(cfg.dataset), len(images))
    _refuse_non_finite(scores, names)
    split = cfg.dataset.val_split
    metrics = {"split": split, "checkpoint": options.checkpoint, "device": str(device),
               "overrides": config_overrides, **summarize(scores.counts, classes)}
    if options.tta != "none":
        loader = eval_loader(TransformedDataset(images, tta_transform(options.tta, preprocessing, draft=draft)),
                             cfg.trainer, pin_memory)
        augmented = summarize(tta_scores(model.model, loader, precision, options.tta).counts, classes)
        metrics["tta"] = {"name": options.tta, **{key: augmented[key] for key in TTA_FIGURES if key in augmented}}
    chosen = top_losses(scores.losses.tolist(), options.top_losses)
    metrics["top_losses"] = [names[index] for index in chosen]
    out = run_dir / "eval" / re.sub(r"[^\w.-]", "_", split) / options.checkpoint
    refuse_links_below(run_dir, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(out / "predictions.csv", scores, classes, names)
        metrics["grad_cam"] = write_galleries(out, chosen, model=model.model, scores=scores, inputs=inputs,
                                              files=files, classes=classes, pre=preprocessing, precision=precision,
                                              model_name=cfg.backbone.name)
        write_results(out, metrics, scores.counts.confusion, classes)
    except OSError as error:
        raise TransferError(f"cannot write the results into {out}: {error.strerror or error}") from error
    return metrics, out


def _eval_config(run_dir: Path, overrides: list[str]) -> tuple[EvalOptions, TrainConfig, list[str]]:
    """Eval's own options, the run's config with the other overrides applied (checked before any model is built),
    and those overrides."""
    options = EvalOptions()
    config_overrides = []
    for item in overrides:
        key, has_value, value = item.partition("=")
        if not has_value:
            raise TransferError(f"'{item}' is not a key=value override (e.g. checkpoint=last)")
        if key == "checkpoint":
            options = replace(options, checkpoint=value)
        elif key == "top_losses":
            options = replace(options, top_losses=_gallery_size(value))
        elif key == "tta":
            options = replace(options, tta=check_tta(value))
        elif key.split(".")[0] not in EVAL_GROUPS:
            raise TransferError(f"override '{item}': eval takes checkpoint=best|last, top_losses=N, "
                                f"tta={'|'.join(TTA_CHOICES)} and {', '.join(g + '.*' for g in EVAL_GROUPS)} keys; "
                                "the model comes from the run")
        else:
            config_overrides.append(item)
    trained = load_run_config(run_dir)
    cfg = apply_overrides(trained, config_overrides)
    check_split(cfg.dataset, trained.dataset)
    return options, cfg, config_overrides


def _gallery_size(value: str) -> int:
    if not value.isdigit() or int(value) > MAX_SHOWN:
        raise TransferError(f"top_losses={value}: give the number of highest-loss images to show, 0 to {MAX_SHOWN} "
                            "(0: no gallery)")
    return int(value)


def _refuse_non_finite(scores: SplitScores, names: list[str]) -> None:
    """NaN or inf logits would make every figure and row a silent wrong number."""
    bad = (~torch.isfinite(scores.logits).all(dim=1)).nonzero()
    if len(bad):
        raise TransferError(f"the run's model gives non-finite outputs (NaN or inf) for {len(bad)} image(s) of the "
                            f"split, the first {names[int(bad[0])]}: its checkpoint holds damaged weights; evaluate "
                            "another checkpoint")


def check_split(dataset: DatasetConfig, trained: DatasetConfig) -> None:
    """A changed dataset.val_split must name a split that exists, not silently fall back to the trained one."""
    if dataset.val_split == trained.val_split:
        return
    if dataset.name == "synthetic":
        raise TransferError("dataset=synthetic has a single held-out split: dataset.val_split does not apply")
    if dataset.name == "folder":
        layout = folder_layout(Path(dataset.root or ".").expanduser(), dataset.train_split, dataset.val_split)
        if layout.val is None:
            raise TransferError(f"dataset.val_split={dataset.val_split}: {dataset.root} needs both "
                                f"{dataset.train_split}/ and {dataset.val_split}/ class folders")


def _split_images(cfg: TrainConfig, classes: list[str]) -> Dataset:
    """The untransformed images of the split named by dataset.val_split, with the run's classes."""
    try:
        splits = load_splits(cfg.dataset)
    except ValueError as error:  # torchvision's answer to a split name it does not know
        raise TransferError(f"dataset.val_split={cfg.dataset.val_split}: {error}") from error
    check_classes(splits.classes, classes, "evaluate on data with the same class folders")
    return splits.val


def write_results(out: Path, metrics: dict[str, Any], confusion: list[list[int]], classes: list[str]) -> None:
    """metrics.json, confusion_matrix.json and confusion_matrix.png, each written atomically (OSError where one
    cannot be). The matrix has its own file because it grows with the square of the class count.
    """
    runlog.write_json(out / "metrics.json", metrics)
    runlog.write_json(out / "confusion_matrix.json",
                      {"classes": classes, "rows": "true class", "columns": "predicted class", "matrix": confusion})
    plot_confusion(confusion, classes, out / "confusion_matrix.png",
                   title=f"{metrics['split']} split, {metrics['checkpoint']}.pt: top-1 {metrics['acc1']:.3f}")


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """Counts coloured by share of their true class, so rare classes show as clearly as common ones."""
    plt = pyplot()

    n = len(classes)
    shares = torch.tensor(confusion, dtype=torch.float64)
    shares = (shares / shares.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    side = min(max(4.0, 0.3 * n + 2.5), 40.0)
    figure, axis = plt.subplots(figsize=(side + 1, side))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    font = 9 if n <= 20 else 7  # cells are about 0.3 inch whatever n is
    axis.set_xticks(range(n), classes, rotation=90, fontsize=font)
    axis.set_yticks(range(n), classes, fontsize=font)
    cells = [(row, column) for row in range(n) for column in range(n) if confusion[row][column]] if n <= 20 else []
    for row, column in cells:
        axis.text(column, row, str(confusion[row][column]), ha="center", va="center", fontsize=font,
                  color="white" if shares[row, column] > 0.5 else "black")
    axis.set(xlabel="predicted class", ylabel="true class", title=title)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    save_figure(figure, path)


def format_table(metrics: dict[str, Any]) -> str:
    """Overall figures (under them, test-time augmentation's), then per-class rows (the worst SHOWN_CLASSES when
    there are more)."""
    head = f"{metrics['split']} split, {metrics['images']} images, {metrics['checkpoint']}.pt"
    lines = [f"{head}: {_figures(metrics)}"]
    if "tta" in metrics:
        lines.append(f"{'tta=' + metrics['tta']['name']:>{len(head)}}: {_figures(metrics['tta'])}")
    rows = list(metrics["per_class"].items())
    if len(rows) > SHOWN_CLASSES:
        rows = sorted(rows, key=lambda row: -1.0 if row[1]["accuracy"] is None else row[1]["accuracy"])[:SHOWN_CLASSES]
        lines.append(f"the {SHOWN_CLASSES} classes with the lowest recall "
                     f"(all {len(metrics['per_class'])} in metrics.json):")
    cells = [[name, str(row["support"]), _fmt(row["accuracy"]), _fmt(row["precision"]), _fmt(row["f1"])]
             for name, row in rows]
    lines.append(aligned([["class", "support", "recall", "precision", "F1"], *cells], right=(1, 2, 3, 4),
                         min_widths={4: 6}))
    return "\n".join(lines)


def _figures(figures: dict[str, Any]) -> str:
    top5 = f"  top-5 {figures['acc5']:.4f}" if "acc5" in figures else ""
    return (f"top-1 {figures['acc1']:.4f}{top5}  balanced {figures['balanced_accuracy']:.4f}  "
            f"macro-F1 {figures['macro_f1']:.4f}  loss {figures['loss']:.4f}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


