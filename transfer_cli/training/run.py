"""Training one run: assemble it, fit it, write its plan, metrics, summary and curves."""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from transfer_cli.config.schema import TrainConfig, to_plain
from transfer_cli.core.errors import Interrupted, TransferError
from transfer_cli.data.balance import per_class
from transfer_cli.data.datasets import check_classes, check_same_splits
from transfer_cli.inference.evaluate import check_split, count_predictions, evaluate_run, plot_confusion
from transfer_cli.parallel import distributed
from transfer_cli.runs import loggers, runlog
from transfer_cli.training.assemble import Prepared, RunnerAdapter, prepare
from transfer_cli.training.fit import Callback, fit
from transfer_cli.training.freezing import Stage
from transfer_cli.training.interrupts import sigterm_stops
from transfer_cli.training.plan import build_plan, format_plan
from transfer_cli.training.state import FitResult, Progress, check_history


log = logging.getLogger(__name__)


def train(cfg: TrainConfig, run_dir: Path, resume: dict[str, Any] | None = None, *,
          callbacks: Sequence[Callback] = (), adapt_runner: RunnerAdapter | None = None) -> dict[str, Any]:
    """Run one experiment into `run_dir` (continuing from checkpoint `resume`) and return its summary.

    `callbacks` see the run as it goes (fit.Callback: each epoch's start, each optimizer step, each epoch's
    record; one that raises stops the run); `adapt_runner` turns the step runner built from the config into
    the one to train with (assemble.prepare). Under torchrun every rank calls this with the same `run_dir`;
    rank 0 writes the files.
    """
    started = time.perf_counter()
    distributed.init_from_env()
    distributed.quiet_logging()
    main = distributed.is_main()
    loggers.check_available(cfg.logger)
    for split in cfg.eval_splits:  # a split that does not exist fails now, not after hours of training
        check_split(replace(cfg.dataset, val_split=split), cfg.dataset)
    run_dir.mkdir(parents=True, exist_ok=True)
    with sigterm_stops("before training started"):
        prepared = prepare(cfg, run_dir, adapt_runner, resuming=resume is not None)
    prepared.setup.started = started
    if resume is not None:
        check_classes(prepared.splits.classes, resume["classes"],
                      "restore the dataset's class folders as they were, or train a new run")
        check_same_splits(prepared.splits.identity, resume.get("splits"))
    plan = build_plan(cfg, prepared)
    if resume is not None:
        plan["backbone"]["weights"] = _started_from(run_dir, plan["backbone"]["weights"])
    if cfg.dry_run:
        print(format_plan(plan))
        return {"dry_run": True, "plan": plan}
    if main:
        runlog.write_json(run_dir / "plan.json", plan)
    splits, preprocessing = prepared.splits, prepared.preprocessing
    log.info("%s (%s) -> %d classes; %d train / %d val images; input %dpx mean=%s std=%s",
             cfg.backbone.name, prepared.setup.model.weights_source, len(splits.classes), len(splits.train),
             len(splits.val), preprocessing.image_size, preprocessing.mean, preprocessing.std)
    if distributed.active():
        log.info("data parallel: %d processes, %d images per process per step (global batch %d)",
                 distributed.world_size(), prepared.setup.train_loader.batch_size, cfg.trainer.batch_size)
    if cfg.trainer.accumulate_steps > 1:
        log.info("gradient accumulation: %d batches of %d images per optimizer step (effective batch %d)",
                 cfg.trainer.accumulate_steps, cfg.trainer.batch_size,
                 cfg.trainer.accumulate_steps * cfg.trainer.batch_size)
    done = resume["progress"]["epoch"] if resume is not None else 0
    history = [record for record in runlog.read_metrics(run_dir, complete=True) if record["epoch"] <= done]
    check_history(run_dir, history, done)
    if main:
        runlog.write_metrics(run_dir, history)  # drops epochs logged after the checkpoint
    sinks = loggers.build(cfg.logger, run_dir) if main else loggers.Loggers([])  # TensorBoard, MLflow: rank 0
    sinks.log_params(to_plain(cfg))
    try:
        result = fit(prepared.setup, resume, history, logger=sinks, callbacks=callbacks)
    except BaseException as error:
        sinks.close("KILLED" if isinstance(error, (Interrupted, KeyboardInterrupt)) else "FAILED")
        raise
    with sigterm_stops("while the run's results were written"):  # not a silent kill between the files
        return _finish(result, prepared, cfg, run_dir, sinks, started)


def _started_from(run_dir: Path, now: dict[str, Any]) -> dict[str, Any]:
    """The weights origin plan.json gave when the run started (whether they were cached then, from which hub
    cache): a resumed run reads no weights, so where they are now says nothing about it. `now` where that
    plan.json is missing or unreadable (it is a record, rewritten here, never an input)."""
    try:
        earlier = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))["backbone"]["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return now
    return earlier if isinstance(earlier, dict) else now


def _finish(result: FitResult, prepared: Prepared, cfg: TrainConfig, run_dir: Path, sinks: loggers.Loggers,
            started: float) -> dict[str, Any]:
    """After the last epoch: the final confusion matrices, `eval_splits`, summary.json, curves.png, the loggers."""
    main = distributed.is_main()
    summary = _summary(result, prepared, cfg)
    # every rank: under DDP each counts its val shard
    confusions = [_final_val_confusion(prepared, summary)] if loggers.chosen(cfg.logger) and not result.error else []
    if main and cfg.eval_splits and not result.error:
        summary["eval"], held_out = _held_out(run_dir, cfg.eval_splits)
        confusions += held_out
    # a resumed run's earlier processes up to their last checkpoint, and this one
    summary["wall_time_s"] = result.progress.elapsed_s + time.perf_counter() - started
    if main:
        runlog.write_json(run_dir / "summary.json", summary)
        if result.records:
            runlog.plot_curves(result.records, run_dir / "curves.png",
                               title=f"{cfg.backbone.name} / {prepared.strategy.name} / {cfg.dataset.name}")
    sinks.log_metrics({f"summary/{key}": summary[key] for key in ("reported_val_acc", "selected_acc", "final_val_acc")
                       if summary[key] is not None},
                      summary["epochs_run"])
    with tempfile.TemporaryDirectory() as scratch:
        for confusion in confusions if main else []:
            if confusion.figure is None:  # the val matrix: drawn as `transfer eval` draws its own
                figure = Path(scratch) / confusion.name / "confusion_matrix.png"
                figure.parent.mkdir()
                plot_confusion(confusion.matrix, confusion.classes, figure, confusion.title)
                confusion = replace(confusion, figure=figure)
            sinks.log_confusion(confusion)
    if (run_dir / "curves.png").is_file():
        sinks.log_image("curves", run_dir / "curves.png")
    sinks.close("FAILED" if result.error else "FINISHED")
    if result.error:
        raise TransferError(result.error)
    return summary


def _held_out(run_dir: Path, splits: list[str]) -> tuple[dict[str, dict[str, Any]], list[loggers.Confusion]]:
    """best.pt scored on each of `eval_splits` as `transfer eval` scores it (eval/<split>/best/ written too),
    and the confusion matrix of each."""
    scores, confusions = {}, []
    for split in splits:
        metrics, out = evaluate_run(run_dir, [f"dataset.val_split={split}"])
        scores[split] = {key: metrics[key] for key in ("images", "acc1", "acc5", "macro_f1", "loss") if key in metrics}
        log.info("eval_splits: %s split, best.pt: top-1 %.4f", split, metrics["acc1"])
        written = json.loads((out / "confusion_matrix.json").read_text(encoding="utf-8"))
        confusions.append(loggers.Confusion(split, written["classes"], written["matrix"],
                                            f"{split} split, best.pt: top-1 {metrics['acc1']:.3f}",
                                            out / "confusion_matrix.png"))
    return scores, confusions


def _final_val_confusion(prepared: Prepared, summary: dict[str, Any]) -> loggers.Confusion:
    """The confusion matrix of the network validated last (the EMA where there is one) over the whole val split,
    as its last epoch left it. Under DDP every rank counts its shard (every rank must call this) and the counts
    are summed."""
    setup = prepared.setup
    network = setup.runner.ema.module if setup.runner.ema is not None else setup.model.model
    counts = count_predictions(network, setup.val_loader, setup.runner.precision, setup.num_classes)
    matrix = counts.confusion
    if distributed.active():
        matrix = distributed.all_reduce_sum(torch.tensor(matrix, device=setup.runner.precision.device)).tolist()
    total = max(sum(map(sum, matrix)), 1)
    top1 = sum(matrix[i][i] for i in range(len(matrix))) / total
    # named apart from an eval_splits split `val`, which is best.pt's
    return loggers.Confusion("val_last_epoch", list(prepared.splits.classes), matrix,
                             f"val split, epoch {summary['epochs_run']} (the last): top-1 {top1:.3f}")


def _summary(result: FitResult, prepared: Prepared, cfg: TrainConfig) -> dict[str, Any]:
    """summary.json: the figures to compare runs by, what produced them, and why it stopped."""
    splits, setup, preprocessing = prepared.splits, prepared.setup, prepared.preprocessing
    model, precision = setup.model, setup.runner.precision
    final = result.records[-1] if result.records else {}
    progress = result.progress
    best = next((record for record in result.records if record["epoch"] == progress.best_epoch), {})
    return {
        "status": "failed" if result.error else "finished",
        "stop_reason": result.error or progress.stop_reason or "completed all stages",
        # best.pt's val top-1: the headline; the epoch was chosen on `selected_on`, where it scored `selected_acc`
        "reported_val_acc": best.get("val/acc1"),
        "selected_on": "select" if splits.select is not None else "val",
        "selected_acc": progress.best_acc if best else None,
        "best_epoch": progress.best_epoch,
        "final_val_acc": final.get("val/acc1"),
        "epochs_run": len(result.records),
        "num_classes": len(splits.classes),
        "classes": splits.classes,
        "train_images": len(splits.train),
        "select_images": len(splits.select) if splits.select is not None else 0,
        "val_images": len(splits.val),
        # trainer.limit_val_batches (debug=fast) where it cut val short: the val figures come from these first
        # batches only; null: from all of val
        "limited_val_batches": _limited(cfg.trainer.limit_val_batches, len(setup.val_loader)),
        "params_total": sum(p.numel() for p in model.model.parameters()),
        "params_trainable": progress.params_trainable,
        "skipped_images": len(splits.skipped_images),
        "unsupported_files": splits.unsupported_files,  # folder files left out by their extension
        "balance": cfg.dataset.balance,
        "train_per_class": per_class(splits.train_labels, splits.classes),
        "strategy": prepared.strategy.name,
        "strategy_choice": prepared.strategy_choice or None,
        # lrs: each group's stated (peak) rate; peak_lrs and mean_lrs: what its steps ran at, highest and on average
        "stages": [{"name": s.name, "epochs": s.epochs, "lrs": s.lrs, "peak_lrs": _peak_lrs(progress, i, s),
                    "mean_lrs": _mean_lrs(progress, i, s)} for i, s in enumerate(setup.stages)],
        "layer_groups": [g.name for g in model.groups],
        "weights": model.weights_source,
        "preprocessing": {**vars(preprocessing), "resize_size": preprocessing.resize_size},
        "device": str(precision.device),
        "amp": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else None,
        "ema": setup.runner.ema is not None,
        "train_images_per_s": _mean([r["train/images_per_s"] for r in result.records]),
        **{k: v for k, v in final.items() if k.startswith("val/")},
        "seed": cfg.trainer.seed,
        "split_seed": cfg.dataset.split_seed,
        "world_size": distributed.world_size(),
        "versions": _versions(),
    }


def _limited(limit: int | None, batches: int) -> int | None:
    """The val batches the figures come from where `limit` left some out, else None."""
    return limit if limit is not None and limit < batches else None


def _peak_lrs(progress: Progress, index: int, stage: Stage) -> dict[str, float] | None:
    """The highest lr each group of stage `index` ran at (a OneCycle stage's max_lr where a step lands on it);
    None for a stage never run."""
    peak = progress.peak_lrs[index] if index < len(progress.peak_lrs) else None
    return {group: peak.get(group, 0.0) for group in stage.lrs} if peak else None


def _mean_lrs(progress: Progress, index: int, stage: Stage) -> dict[str, float] | None:
    """Each group's lr over the steps stage `index` ran, averaged (None for a stage never run)."""
    mean = progress.mean_lrs(index)
    return {group: mean.get(group, 0.0) for group in stage.lrs} if mean is not None else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _versions() -> dict[str, str]:
    """The versions a run used (read from the installed packages: importing Hydra here would load it)."""
    from importlib.metadata import version

    import timm
    import torchvision

    from transfer_cli import __version__
    return {"transfer": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "hydra": version("hydra-core")}
