"""The fixed costs of a run, each measured in a child process of its own (benchmarks/children.py):

- checkpoint_bytes (a child of benchmarks/children.py): bytes a feature-extraction run writes into
  checkpoints/ per epoch, against what the same saves would weigh if every one held the whole network and the
  optimizer (last.pt and best.pt without runs/frozen.py's store); the frozen file, written once per run, is
  reported beside them.
- FIRST_STEP (a `python -c` script of its own, so the command runs as a user starts it): seconds from starting
  `transfer train experiment=smoke` to its first optimizer step, imports and all, with the share of the three big
  imports (torch, torchvision, timm) measured in the same process.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any


def checkpoint_bytes(spec: dict[str, Any]) -> dict[str, Any]:
    """Train `spec['overrides']` in `spec['run_dir']`, counting the bytes of every checkpoint saved."""
    import torch

    from transfer_cli.config.compose import compose_config
    from transfer_cli.runs import checkpoint
    from transfer_cli.runs.frozen import FROZEN
    from transfer_cli.training.run import train

    saves: list[tuple[str, int]] = []
    real = checkpoint.save_atomic

    def counted(payload: dict[str, Any], path: Path) -> None:
        real(payload, path)
        saves.append((path.name, path.stat().st_size))

    checkpoint.save_atomic = counted
    try:
        summary = train(compose_config(spec["overrides"]), Path(spec["run_dir"]))
    finally:
        checkpoint.save_atomic = real
    folder = Path(spec["run_dir"]) / "checkpoints"
    whole = {key: value for key, value in checkpoint.load(folder / "last.pt").items() if key != FROZEN}
    buffer = io.BytesIO()
    torch.save(whole, buffer)  # one whole checkpoint, as without the frozen store: the network, the optimizer, the rest
    epochs = summary["epochs_run"]
    before = len(saves) * buffer.tell() / epochs
    after = sum(size for _, size in saves) / epochs
    return {"epochs": epochs, "saves": len(saves), "bytes_per_epoch": after, "full_model_bytes_per_epoch": before,
            "reduction": before / after,
            "frozen_file_bytes": sum(path.stat().st_size for path in folder.glob("frozen-*.pt")),
            "parameters": sum(value.numel() for value in whole["model"].values() if value.is_floating_point())}


# `python -c FIRST_STEP SPEC OUT`: `python -m transfer_cli train ARGS` as a user starts it, stopped at its first
# optimizer step, which writes the clocks to OUT. Only the optimizer hook and the three big imports' clocks are
# added before the command's own code runs.
FIRST_STEP = """
import json, os, runpy, sys, time
spec, out = json.loads(sys.argv[1]), sys.argv[2]
clocks = {"started": time.time() - spec["spawned"]}
for name in ("torch", "torchvision", "timm"):
    start = time.perf_counter()
    __import__(name)
    clocks[f"import_{name}_s"] = time.perf_counter() - start
libraries = set(sys.modules)

def first(optimizer, args, kwargs):
    clocks["time_to_first_step_s"] = time.time() - spec["spawned"]
    clocks["unneeded_modules_loaded"] = sorted(
        name for name in spec["unneeded"] if name in sys.modules and name not in libraries)
    with open(out, "w") as file:
        json.dump(clocks, file)
    os._exit(0)

from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(first)
sys.argv = ["transfer", "train", *spec["args"]]
runpy.run_module("transfer_cli", run_name="__main__")
"""


# what a plain run does not use before it trains, so must not import by then (beyond what the three
# libraries import themselves): plots come at the end, the rest with their option (logger=..., export, launchers)
UNNEEDED_BEFORE_FIRST_STEP = ("matplotlib", "mlflow", "tensorboard", "torch.utils.tensorboard", "wandb", "onnx",
                              "onnxruntime", "safetensors", "joblib", "optuna", "pandas", "sklearn", "scipy")


def measure_first_step(run_dir: Path, env: dict[str, str], runs: int = 3) -> dict[str, Any]:
    """time_to_first_step_s of experiment=smoke, the median over `runs` fresh processes."""
    import json
    import statistics
    import subprocess

    results = []
    for index in range(runs):
        out = run_dir / f"first-step-{index}.json"
        spec = {"spawned": time.time(), "unneeded": UNNEEDED_BEFORE_FIRST_STEP,
                "args": ["experiment=smoke", f"hydra.run.dir={run_dir / f'first-{index}'}", "trainer.num_workers=0"]}
        done = subprocess.run([sys.executable, "-c", FIRST_STEP, json.dumps(spec), str(out)], capture_output=True,
                              text=True, timeout=300, env=env)
        if not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-10:])
            raise RuntimeError(f"transfer train experiment=smoke never reached a training step (exit "
                               f"{done.returncode}):\n{tail}")
        results.append(json.loads(out.read_text()))
    median = statistics.median(result["time_to_first_step_s"] for result in results)
    return {"time_to_first_step_s": median, "first_step": {"runs": results, "cpu_count": os.cpu_count()}}
