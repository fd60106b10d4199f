"""Reference preprocessing for an exported model: image file -> the model's input, as `transfer predict` builds it.

`transfer export` copies this file next to the model as preprocess.py; it needs only PIL and numpy
and reads every number from the model.json beside it. Usage:
    python preprocess.py OUT.npy IMAGE [IMAGE ...]   # float32 [N, 3, H, W], in the order given
or, imported: `batch = preprocess.load(path, preprocess.read_spec(folder))[None]`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image


FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "nearest": Image.Resampling.NEAREST}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def read_spec(folder: Path) -> dict:
    """model.json of the export in `folder`."""
    return json.loads((Path(folder) / "model.json").read_text(encoding="utf-8"))


def resized_size(spec: dict, height: int, width: int) -> tuple[int, int]:
    """(height, width) the resize step gives a height x width image, with the tool's integer arithmetic."""
    size, mode = spec["resize_size"], spec["crop_mode"]
    if mode == "squash":
        return (size, size) if isinstance(size, int) else (size[0], size[1])
    if mode == "center" and isinstance(size, int):  # torchvision: the short side to `size`, the long one truncated
        short, long = min(height, width), max(height, width)
        new_long = int(size * long / short)
        return (new_long, size) if width <= height else (size, new_long)
    target = (size, size) if isinstance(size, int) else size  # one scale for both sides, rounded half to even
    ratios = (height / target[0], width / target[1])
    ratio = max(ratios) if mode == "border" else min(ratios)
    return round(height / ratio), round(width / ratio)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit grey scaled by >> 8 (PIL's convert would clip it), palette transparency via RGBA."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int32).clip(0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def draft_request(spec: dict, width: int, height: int) -> tuple[int, int] | None:
    """The size to ask `Image.draft` for: each side stays >= margin x the resize output; None below a 2x reduction."""
    out_height, out_width = resized_size(spec, height, width)
    limit = min(width / out_width, height / out_height) / spec["decode"]["margin"]
    return (math.ceil(width / limit), math.ceil(height / limit)) if limit >= 2 else None


def decode_resized(path: Path, spec: dict) -> Image.Image:
    """The image resized as the model expects; a JPEG decoded at reduced size (draft) where model.json allows."""
    with Image.open(path) as image:
        width, height = image.size
        out_height, out_width = resized_size(spec, height, width)
        request = draft_request(spec, width, height) if spec["decode"]["draft"] and image.format == "JPEG" else None
        drafted = image.draft(image.mode, request) if request is not None else None
        rgb = to_rgb(image)
    if drafted is not None:  # resize only the part of the reduced decode that is the original image
        return rgb.resize((out_width, out_height), FILTERS[spec["interpolation"]], box=drafted[1])
    if rgb.size == (out_width, out_height):
        return rgb
    return rgb.resize((out_width, out_height), FILTERS[spec["interpolation"]])


def centre_crop(pixels: np.ndarray, spec: dict) -> np.ndarray:
    """Pad (black; the mean colour for border) to at least the input size, then cut its centre, offsets rounded
    half to even."""
    _, crop_h, crop_w = spec["input_size"]
    height, width = pixels.shape[:2]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        fill = [round(255 * v) for v in spec["mean"]] if spec["crop_mode"] == "border" else [0, 0, 0]
        padded = np.empty((height + pad_h, width + pad_w, 3), np.uint8)
        padded[:] = np.asarray(fill, np.uint8)
        padded[pad_h // 2:pad_h // 2 + height, pad_w // 2:pad_w // 2 + width] = pixels
        pixels, height, width = padded, height + pad_h, width + pad_w
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return pixels[top:top + crop_h, left:left + crop_w]


def load(path: Path, spec: dict) -> np.ndarray:
    """One image as float32 [3, H, W]: RGB scaled to 0-1, then (x - mean) / std per channel."""
    pixels = centre_crop(np.asarray(decode_resized(path, spec)), spec)
    values = pixels.astype(np.float32) * np.float32(1.0 / 255)
    values = (values - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(values.transpose(2, 0, 1))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python preprocess.py OUT.npy IMAGE [IMAGE ...]")
    model_spec = read_spec(Path(__file__).resolve().parent)
    np.save(sys.argv[1], np.stack([load(Path(name), model_spec) for name in sys.argv[2:]]))
