"""`transfer export`: a trained run's network as an inference model, with model.json beside it.

The exported model takes the normalized image tensor (float32, [batch, 3, H, W]; model.json
describes the preprocessing) and returns logits over the run's classes. Every format is
built and checked against the run's own network in memory first, then written through temp
files and renames, model.json last: a failed export writes nothing, a finished one whole files.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_cli.config.schema import TrainConfig
from transfer_cli.core.errors import TransferError, first_line
from transfer_cli.core.extras import install_hint, installed
from transfer_cli.core.files import atomic_file, refuse_links_below
from transfer_cli.data.decode import MARGIN
from transfer_cli.data.transforms import Preprocessing
from transfer_cli.inference import preprocess_script
from transfer_cli.inference.load import load_trained_model, preprocessing_of
from transfer_cli.runs.rundir import read_summary, require_run_dir
from transfer_cli.runs.runlog import write_json


PREPROCESS_FILE = "preprocess.py"  # the reference preprocessing, PIL and numpy only
FORMATS = ("torchscript", "onnx", "safetensors")
FILES = {"torchscript": "model.pt", "onnx": "model.onnx", "safetensors": "model.safetensors"}
ONNX_PACKAGES = ("onnx", "onnxruntime")
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# the largest |exported - eager| logit difference accepted, per unit of the logits' scale
TOLERANCE = {"torchscript": 1e-5, "onnx": 1e-4, "safetensors": 1e-5}
SUMMARY_KEYS = ("reported_val_acc", "selected_on", "selected_acc", "best_epoch", "final_val_acc", "epochs_run",
                "status", "stop_reason")


@dataclass(frozen=True)
class Exported:
    model_file: Path
    metadata_file: Path
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _Built:
    payload: bytes  # the model file's bytes
    check: Callable[[torch.Tensor], torch.Tensor]  # logits of the model read back from `payload`
    extra: dict[str, Any]  # what model.json adds for this format


def check_format(fmt: str) -> None:
    """A one-line error for an unknown format, or for ONNX without the `export` extra."""
    if fmt not in FORMATS:
        raise TransferError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    missing = [name for name in ONNX_PACKAGES if not installed(name)]
    if fmt == "onnx" and missing:
        raise TransferError(f"--format onnx needs the {' and '.join(missing)} package(s): {install_hint('export')}")


def export_run(run_dir: str | Path, fmt: str = "torchscript", checkpoint: str = "best",
               out: Path | None = None) -> Exported:
    """Write `out`/model.<ext> and `out`/model.json (default out: RUN_DIR/export/<format>/)."""
    check_format(fmt)
    path = require_run_dir(run_dir)
    if out is None:
        out = path / "export" / fmt
        refuse_links_below(path, out)  # the run directory's own folder; an --out folder is the user's choice
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise TransferError(f"--out {out} is a file: give a directory")
    cfg, model, classes = load_trained_model(path, checkpoint)
    network = model.model.float().eval()
    pre = preprocessing_of(cfg, model)
    metadata = describe(cfg, path, classes, pre, fmt, checkpoint, _run_summary(path), model.weights_source)
    example = _inputs(pre, 2, seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit and the ONNX exporter announce their successors
        warnings.simplefilter("ignore", DeprecationWarning)
        built = BUILDERS[fmt](network, example, cfg, metadata)
        metadata.update(built.extra)
        difference = _verify(fmt, network, built.check, _inputs(pre, 3, seed=1))
    metadata["verified"] = {"max_abs_diff": difference, "batch_size": 3, "tolerance": TOLERANCE[fmt]}
    return _write(out, fmt, built.payload, metadata)


def describe(cfg: TrainConfig, run_dir: Path, classes: list[str], pre: Preprocessing, fmt: str, checkpoint: str,
             summary: dict[str, Any], weights: str) -> dict[str, Any]:
    """model.json's description of the model: what goes in, what comes out, where it came from."""
    height, width = pre.size
    return {
        "format": fmt,
        "file": FILES[fmt],
        "checkpoint": checkpoint,
        "run_dir": str(run_dir.resolve()),
        "classes": list(classes),
        "num_classes": len(classes),
        "input_size": [3, height, width],
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "crop_pct": pre.crop_pct,
        "crop_mode": pre.crop_mode,
        "resize_size": pre.resize_size,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, height, width], "dtype": "float32",
                  "meaning": "RGB scaled to 0-1, resized and centre-cropped as crop_mode says, "
                             "then (x - mean) / std per channel"},
        "resize": _resize_rule(pre),
        "decode": _decode_rule(cfg.transforms.draft_decode),
        "preprocess": PREPROCESS_FILE,
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "meaning": "logits, in the order of classes"},
        "backbone": {"source": cfg.backbone.source, "name": cfg.backbone.name,
                     "weights": summary.get("weights") or _weights_origin(cfg, weights),
                     "head": {"kind": cfg.head.kind, "dropout": cfg.head.dropout} if cfg.head.kind == "linear"
                     else {"kind": cfg.head.kind, "hidden": cfg.head.hidden, "dropouts": list(cfg.head.dropouts)}},
        "metrics": {key: _finite_or_none(summary.get(key)) for key in SUMMARY_KEYS},
        "torch": torch.__version__.split("+")[0],
    }


def _resize_rule(pre: Preprocessing) -> dict[str, Any]:
    """The resize and crop in words exact enough to reimplement (preprocess.py does): sizes in pixels,
    H x W the decoded image's height and width."""
    if pre.crop_mode == "squash":
        rule = "resize to resize_size (height, width), ignoring the aspect ratio"
    elif pre.crop_mode == "center" and isinstance(pre.resize_size, int):
        rule = ("torchvision's short-side resize: the short side becomes resize_size, the long side "
                "int(resize_size * long / short), truncated (not rounded)")
    else:
        side = "longer" if pre.crop_mode == "border" else "shorter"
        rule = (f"one scale for both sides, fitting the {side} side: ratio = "
                f"{'max' if side == 'longer' else 'min'}(H / resize_height, W / resize_width), new sides "
                "round(H / ratio) and round(W / ratio), rounded half to even")
    fill = "the mean colour, round(255 * mean)" if pre.crop_mode == "border" else "black"
    return {"rule": rule, "resampling": f"PIL Image.resize with Resampling.{pre.interpolation.upper()} on the 8-bit "
                                        "RGB image (antialiased, as PIL always is); no resize where the size is met",
            "antialias": True,
            "crop": f"pad with {fill} to at least input_size (left/top get the smaller half), then cut input_size "
                    "from the centre at top = round((h - crop_h) / 2), left = round((w - crop_w) / 2), rounded half "
                    "to even",
            "to_float": "uint8 RGB -> float32 * (1 / 255), then (x - mean) / std, laid out [batch, 3, H, W]"}


def _decode_rule(draft: bool) -> dict[str, Any]:
    """How the run decodes a JPEG: at reduced size (PIL's draft mode) where transforms.draft_decode is on."""
    if not draft:
        return {"draft": False, "margin": MARGIN, "rule": "every image is decoded at full size"}
    return {"draft": True, "margin": MARGIN,
            "rule": "a JPEG is decoded with PIL's Image.draft(image.mode, (ceil(W / f), ceil(H / f))) where "
                    "f = min(W / resized_w, H / resized_h) / margin is >= 2; the decode is then resized straight "
                    "to the resized size from the box draft returns; other files, and f < 2, decode in full. "
                    "Probabilities equal the tool's only with this decode (a full decode differs by about 1/255 "
                    "per pixel)"}


def _weights_origin(cfg: TrainConfig, built_with: str) -> str:
    """Where the run's starting weights came from, when summary.json (which records it) is not there yet."""
    if cfg.backbone.checkpoint:
        return f"file {cfg.backbone.checkpoint}"
    if cfg.backbone.pretrained:
        return f"pretrained {cfg.backbone.source} {cfg.backbone.name} ({cfg.backbone.weights or 'default'} weights)"
    return built_with


def _run_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json, or nothing for a run still training or interrupted (its checkpoints export all the same)."""
    file = run_dir / "summary.json"
    return read_summary(file) if file.is_file() else {}


def _finite_or_none(value: Any) -> Any:
    """A summary figure for model.json: a number only where it is a finite one (a hand-edited summary.json may hold
    NaN, which JSON cannot), else null."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value if value is None or isinstance(value, str) else None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an integer too large for a float
        return None


def _inputs(pre: Preprocessing, batch: int, seed: int) -> torch.Tensor:
    """A normalized-looking batch of the run's input size, the same every time."""
    return torch.randn(batch, 3, *pre.size, generator=torch.Generator().manual_seed(seed))


def _verify(fmt: str, network: nn.Module, check: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> float:
    """The largest logit difference between the exported model (read back, on a batch size it was not built
    with) and the run's own network; a one-line error beyond the format's tolerance."""
    expected = network(inputs)
    actual = check(inputs)
    if actual.shape != expected.shape:
        raise TransferError(f"the {fmt} export gives outputs of shape {list(actual.shape)}, the run's model "
                            f"{list(expected.shape)}: this architecture does not export to {fmt}; try another format")
    difference = float((actual - expected).abs().max())
    if not difference <= TOLERANCE[fmt] * max(1.0, float(expected.abs().max())):
        raise TransferError(f"the {fmt} export differs from the run's model by up to {difference:.3g} in its logits: "
                            f"this architecture does not export faithfully to {fmt}; try another format")
    return difference


def _torchscript(network: nn.Module, example: torch.Tensor, cfg: TrainConfig, metadata: dict) -> _Built:
    try:
        traced = torch.jit.trace(network, example)
    except Exception as error:  # noqa: BLE001 - any tracing failure is this architecture's, told in one line
        raise TransferError(f"cannot trace {cfg.backbone.name} to TorchScript ({first_line(error)[:160]}): "
                            "try --format onnx or safetensors") from error
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"model.json": json.dumps(metadata)})
    payload = buffer.getvalue()
    loaded = torch.jit.load(io.BytesIO(payload), map_location="cpu")
    return _Built(payload, loaded, {})


def _onnx(network: nn.Module, example: torch.Tensor, cfg: TrainConfig, metadata: dict) -> _Built:
    import onnx
    import onnxruntime

    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    try:  # the TorchScript-based exporter: the torch.export one needs onnxscript, which the extra does not hold
        torch.onnx.export(network, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=ONNX_OPSET)
    except Exception as error:  # noqa: BLE001 - an unsupported operator or trace failure, told in one line
        raise TransferError(f"cannot export {cfg.backbone.name} to ONNX ({first_line(error)[:160]}): "
                            "try --format torchscript or safetensors") from error
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {"transfer_cli": json.dumps(metadata)})
    onnx.checker.check_model(proto)
    payload = proto.SerializeToString()
    session = onnxruntime.InferenceSession(payload, providers=["CPUExecutionProvider"])

    def check(inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0])

    return _Built(payload, check, {"opset": ONNX_OPSET, "dynamic_axes": {INPUT_NAME: [0], OUTPUT_NAME: [0]}})


def _safetensors(network: nn.Module, example: torch.Tensor, cfg: TrainConfig, metadata: dict) -> _Built:
    """The state dict, keyed for the library's own constructor where the head allows (a linear head):
    `rebuild` in model.json then names the call whose network loads it with strict=True."""
    from safetensors.torch import load, save

    state = {key: value.detach().clone().contiguous() for key, value in network.state_dict().items()}
    reference, call = _reference_network(cfg, int(metadata["num_classes"]))
    renamed = _renamed_for(state, reference.state_dict()) if reference is not None else None
    if renamed is None:  # an mlp head: transfer_cli's own build_model makes the network these keys fit
        reference, call = network, None
    else:
        state = renamed
    payload = save(state, metadata={"transfer_cli": json.dumps({**metadata, "rebuild": call})})
    reference.eval().load_state_dict(load(payload), strict=True)
    return _Built(payload, reference, {"rebuild": call, "state_dict_keys": "rebuild" if call else "transfer_cli"})


def _reference_network(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module | None, str]:
    """The library's own network for this architecture with `num_classes` outputs, and the call that builds it."""
    name = cfg.backbone.name
    try:
        if cfg.backbone.source == "timm":
            import timm

            call = f"timm.create_model({name!r}, num_classes={num_classes})"
            return timm.create_model(name, num_classes=num_classes), call
        import torchvision

        call = f"torchvision.models.get_model({name!r}, weights=None, num_classes={num_classes})"
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes), call
    except (TypeError, ValueError, RuntimeError):  # a constructor without num_classes
        return None, ""


def _renamed_for(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """`state` with its classifier's keys renamed to `target`'s (torchvision keeps a Dropout before the last
    Linear that the run's head replaced, `fc.1.weight` is timm's `fc.weight` after a head dropout);
    None where the two differ otherwise (another head, other shapes)."""
    extra = [key for key in state if key not in target]
    missing = [key for key in target if key not in state]
    if len(extra) != len(missing) or any(state[key].shape != target[key].shape for key in state if key in target):
        return None
    pairs = dict(zip(extra, missing))
    if any(state[old].shape != target[new].shape or old.rsplit(".", 1)[-1] != new.rsplit(".", 1)[-1]
           for old, new in pairs.items()):
        return None
    return {pairs.get(key, key): value for key, value in state.items()}


BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor, TrainConfig, dict], _Built]] = {
    "torchscript": _torchscript, "onnx": _onnx, "safetensors": _safetensors}


def _write(out: Path, fmt: str, payload: bytes, metadata: dict[str, Any]) -> Exported:
    """The model file, preprocess.py, then model.json, each whole or not at all; a folder that cannot be written
    is one line."""
    model_file, metadata_file = out / FILES[fmt], out / "model.json"
    try:
        with atomic_file(model_file, "wb") as file:
            file.write(payload)
        with atomic_file(out / PREPROCESS_FILE, "w") as file:
            file.write(Path(preprocess_script.__file__).read_text(encoding="utf-8"))
        write_json(metadata_file, metadata)
    except OSError as error:
        raise TransferError(f"cannot write the export to {out}: {error.strerror or error}") from error
    return Exported(model_file, metadata_file, metadata)
