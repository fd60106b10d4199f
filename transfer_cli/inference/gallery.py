"""The images a model got most wrong (fastai's `plot_top_losses`): top_losses.png, and top_losses_cam.png with
the Grad-CAM heat map of the predicted class over each, where the backbone has a spatial feature map.

top_losses.png shows each image as the user knows it: its file, scaled to fit the eval size (for images that
are not files, the model's input, de-normalised). The heat maps lie over the model's input, de-normalised: the
pixels they were computed on (where the eval transform crops, a part of the file).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ImageOps
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from transfer_cli.core.plotting import pyplot, save_figure
from transfer_cli.data.folder import load_rgb
from transfer_cli.data.transforms import Preprocessing
from transfer_cli.inference.cam import CamUnavailable, grad_cam
from transfer_cli.inference.predictions import SplitScores
from transfer_cli.models.runtime import Precision


GALLERY = "top_losses.png"
CAM_GALLERY = "top_losses_cam.png"
MAX_SHOWN = 256  # panels in one figure; top_losses= refuses more
CAM_BATCH = 32  # images per Grad-CAM pass
NAME_CHARS = 24  # class names in a panel's title are cut to this
PANEL_INCHES = 2.4  # each image's width in the figure
TITLE_BAND = 0.3  # the title band above each image, as a share of its width
HEAT_ALPHA = 0.45


def top_losses(losses: Sequence[float], n: int) -> list[int]:
    """The indices of the `n` highest losses (all of them where there are fewer), highest first; equal losses in
    split order."""
    return sorted(range(len(losses)), key=lambda index: -losses[index])[:n]


def write_galleries(out: Path, chosen: list[int], *, model: nn.Module, scores: SplitScores, inputs: Dataset,
                    files: list[Path] | None, classes: list[str], pre: Preprocessing, precision: Precision,
                    model_name: str) -> dict[str, Any]:
    """top_losses.png and top_losses_cam.png of the `chosen` images (nothing where none are), a gallery this
    pass did not draw removed, so none is left from an earlier eval; `inputs` serves the model's input of each
    image of the split. Returns metrics.json's `grad_cam` record; where Grad-CAM is not available, says so once
    on stderr."""
    drawn: set[str] = set()
    record: dict[str, Any] = {"file": None, "reason": "top_losses=0: no gallery"}
    if chosen:
        titles = [_title(scores, index, classes) for index in chosen]
        tensors = torch.stack([inputs[index][0] for index in chosen])
        seen = [_denormalized(tensor, pre) for tensor in tensors]
        shown = seen if files is None else [_file_image(files[index], pre) for index in chosen]
        draw_gallery(shown, titles, out / GALLERY)
        drawn.add(GALLERY)
        try:
            maps = _cam_maps(model, tensors, scores.predicted[chosen], precision)
        except CamUnavailable as reason:
            record = {"file": None, "reason": f"not available for {model_name}: {reason}"}
            print(f"Grad-CAM: {record['reason']}", file=sys.stderr)
        else:
            draw_gallery(seen, titles, out / CAM_GALLERY, heat=maps)
            drawn.add(CAM_GALLERY)
            record = {"file": CAM_GALLERY, "reason": None}
    for name in {GALLERY, CAM_GALLERY} - drawn:
        (out / name).unlink(missing_ok=True)
    return record


def _cam_maps(model: nn.Module, tensors: torch.Tensor, predicted: torch.Tensor, precision: Precision) -> list[Any]:
    """Each image's Grad-CAM map, upsampled to the input size and scaled to 0-1 for display (H x W arrays)."""
    maps = []
    for start in range(0, len(tensors), CAM_BATCH):
        images, classes = precision.to_device(tensors[start:start + CAM_BATCH], predicted[start:start + CAM_BATCH])
        cam = grad_cam(model, images, classes)
        cam = F.interpolate(cam[:, None], size=tensors.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1).clamp(min=1e-12)
        maps.extend((cam / peak[:, None, None]).cpu().numpy())
    return maps


def _title(scores: SplitScores, index: int, classes: list[str]) -> str:
    predicted, label = int(scores.predicted[index]), int(scores.labels[index])
    log_probabilities = scores.logits[index].log_softmax(dim=0)
    probability, loss = float(log_probabilities[predicted].exp()), float(-log_probabilities[label])
    return (f"{_short(classes[label])} / {_short(classes[predicted])}\n"
            f"p={probability:.3f}  loss {loss:.3f}")


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


def _denormalized(tensor: torch.Tensor, pre: Preprocessing) -> Any:
    """The model's (3, H, W) normalized input as an H x W x 3 image in 0-1."""
    mean, std = (torch.tensor(values, dtype=torch.float32).view(3, 1, 1) for values in (pre.mean, pre.std))
    return (tensor.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _file_image(file: Path, pre: Preprocessing) -> Any:
    """The image file, whole, scaled to fit the eval size (aspect kept), as an H x W x 3 image in 0-1."""
    height, width = pre.size
    return np.asarray(ImageOps.contain(load_rgb(file), (width, height)), dtype=np.float32) / 255


def draw_gallery(images: list[Any], titles: list[str], path: Path, heat: list[Any] | None = None) -> None:
    """A grid of `images` (H x W x 3 in 0-1, each centred in a cell as large as the largest) under their titles;
    `heat` maps (H x W in 0-1, one per image) blended over them in the `jet` colour map.

    The grid is one image in one axes: a figure of many small axes spends seconds laying out their ticks.
    """
    plt = pyplot()
    if heat is not None:
        colours = plt.get_cmap("jet")
        images = [(1 - HEAT_ALPHA) * image + HEAT_ALPHA * colours(map_)[..., :3] for image, map_ in zip(images, heat)]
    height, width = (max(image.shape[axis] for image in images) for axis in (0, 1))
    band, gap = max(1, round(TITLE_BAND * width)), max(1, round(0.06 * width))  # title band above, gap right
    columns = min(len(images), max(1, math.ceil(math.sqrt(len(images)))), 8)
    rows = math.ceil(len(images) / columns)
    grid = np.ones((rows * (band + height), columns * (width + gap), 3), dtype=np.float32)
    figure = plt.figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * columns * grid.shape[0] / grid.shape[1]))
    axis = figure.add_axes((0, 0, 1, 1))
    axis.set_axis_off()
    for position, (image, title) in enumerate(zip(images, titles)):
        top, left = (position // columns) * (band + height) + band, (position % columns) * (width + gap) + gap // 2
        top_pad, left_pad = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
        grid[top + top_pad:top + top_pad + image.shape[0], left + left_pad:left + left_pad + image.shape[1]] = image
        axis.text(left + width / 2, top - band * 0.1, title, ha="center", va="bottom", fontsize=8)
    axis.imshow(grid, interpolation="antialiased")
    save_figure(figure, path)
