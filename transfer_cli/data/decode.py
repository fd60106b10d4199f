"""Decoding JPEGs at reduced size where a pipeline's first step shrinks them anyway.

libjpeg can decode at 1/2, 1/4 or 1/8 of the stored size by scaling in the DCT domain (PIL's
`Image.draft`): a photo decodes several times faster at half size, and the resize after it works on
4-64x fewer pixels. A pipeline (`Pipeline`, transforms.py builds them) carries a `DecodePlan` that
says how far its input may be reduced; datasets that read files themselves honour it (folder.py's
`fetch`), anything else (tensors, decoded images, torchvision's sets) is served unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import PIL.Image
from torchvision.transforms import v2


# each side of the decoded image stays >= this many times the first step's output side
MARGIN = 2

# the filter torchvision's resize of a PIL image uses for each interpolation
PIL_FILTERS = {
    v2.InterpolationMode.BILINEAR: PIL.Image.Resampling.BILINEAR,
    v2.InterpolationMode.BICUBIC: PIL.Image.Resampling.BICUBIC,
    v2.InterpolationMode.NEAREST: PIL.Image.Resampling.NEAREST,
}


def resized_size(step: Any, height: int, width: int) -> tuple[int, int]:
    """(height, width) a height x width image has after `step`: a KeepRatioResize (its `output_size`) or a
    v2.Resize to a pair or to a short side (torchvision's rule: the long side scaled and truncated)."""
    if hasattr(step, "output_size"):
        return step.output_size(height, width)
    size = list(step.size)
    if len(size) == 2:
        return size[0], size[1]
    short, long = min(height, width), max(height, width)
    new_long = int(size[0] * long / short)
    return (new_long, size[0]) if width <= height else (size[0], new_long)


@dataclass(frozen=True)
class DecodePlan:
    """How small a JPEG may be decoded for a pipeline whose first step is `first`.

    The rule: every pixel the first step outputs still comes from at least 2x2 decoded pixels
    (MARGIN), so the reduced decode stays below interpolation noise at the final size.

    - A resize (eval, the image cache, training without a random crop) of an H x W image to h x w:
      decode at >= 2h x 2w, then resize that to exactly h x w from the part of it that is the
      original image (PIL's resize `box`: a reduced decode rounds its sides up to whole pixels), so
      the pipeline's own resize finds nothing left to do and its crop cuts what full decoding would.
      On hymenoptera's photos at 32-224 px this differs from full decoding by <= 1.4/255 on average
      per image (test_decode.py); at 1x (decoding down to h x w) by up to 5.7/255, hence the margin.
    - RandomResizedCrop(size, scale=(a, b), ratio=(r0, r1)): its smallest crop of an H x W image has
      sides >= sqrt(a * H * W * min(r0, 1/r1)); decode so that this side stays >= 2x the output's
      larger side. The crop is then drawn on the decoded image: for a given sample it is another
      crop than full decoding would draw (the same distribution), and never one upscaled more. With
      timm's scale (0.08, 1) this allows a reduction only for images above ~4.5x the output side.
    """

    first: Any  # v2.Resize | KeepRatioResize | v2.RandomResizedCrop

    def largest_reduction(self, width: int, height: int) -> float:
        """The largest factor a width x height image may be shrunk by before the first step."""
        if isinstance(self.first, v2.RandomResizedCrop):
            low, high = self.first.ratio
            smallest_side = math.sqrt(self.first.scale[0] * width * height * min(low, 1 / high))
            return smallest_side / (MARGIN * max(self.first.size))
        out_height, out_width = resized_size(self.first, height, width)
        return min(width / out_width, height / out_height) / MARGIN

    def request(self, width: int, height: int) -> tuple[int, int] | None:
        """The (width, height) to hand `Image.draft` for a width x height JPEG: PIL picks the largest of
        1/2, 1/4, 1/8 that keeps both sides >= it. None where not even 1/2 is allowed."""
        limit = self.largest_reduction(width, height)
        if limit < 2:
            return None
        return math.ceil(width / limit), math.ceil(height / limit)

    def finish(self, image: PIL.Image.Image, box: tuple[float, float, float, float],
               original: tuple[int, int]) -> PIL.Image.Image:
        """The reduced decode `image` (RGB) of an image of size `original` (width, height), as the first step
        expects it: resized to that step's output from `box` (what `Image.draft` returned), or as it is
        for a random crop."""
        if isinstance(self.first, v2.RandomResizedCrop):
            return image
        out_height, out_width = resized_size(self.first, original[1], original[0])
        return image.resize((out_width, out_height), PIL_FILTERS[self.first.interpolation], box=box)


class Pipeline(v2.Compose):
    """A v2.Compose that also says how small its input may be decoded (`decode`; None: in full).

    Its repr names the plan, so what a transformed dataset serves (the feature cache's key) tells a
    reduced decode from a full one.
    """

    def __init__(self, transforms: list[Any], decode: DecodePlan | None = None) -> None:
        super().__init__(transforms)
        self.decode = decode

    def extra_repr(self) -> str:
        steps = super().extra_repr()
        return steps if self.decode is None else f"{steps}\n    decode={self.decode!r}"
