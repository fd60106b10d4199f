"""ImageNet-1k classes by index, WordNet id or name (timm's ImageNetInfo): which of the 1000
outputs a dataset class stands for when a pretrained head is scored directly."""

from __future__ import annotations

import re
from functools import lru_cache

from transfer_cli.core.errors import TransferError


NUM_IMAGENET_CLASSES = 1000


def _normalize_name(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", text)).strip().lower()


@lru_cache(maxsize=1)
def _imagenet_info() -> tuple[list[str], list[str], dict[str, list[tuple[int, int]]]]:
    """WordNet ids, descriptions, and synonym -> [(class index, position of the synonym)]."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids, descriptions = list(info.label_names()), list(info.label_descriptions())
    synonyms: dict[str, list[tuple[int, int]]] = {}
    for index, description in enumerate(descriptions):
        for position, synonym in enumerate(description.split(",")):
            synonyms.setdefault(_normalize_name(synonym), []).append((index, position))
    return wnids, descriptions, synonyms


def imagenet_class_name(index: int) -> str:
    """The first synonym of ImageNet class `index` (`ant` for 310)."""
    return _imagenet_info()[1][index].split(",")[0].strip()


def imagenet_index(name: str) -> int:
    """The ImageNet-1k index a class folder (or dataset class) named `name` stands for.

    Accepts an index (`310`), a WordNet id (`n02219486`) or a class name matched against
    every synonym of the ImageNet descriptions, case and `_`/`-` insensitive, with a simple
    plural 's' stripped where the name itself matches nothing (`ants` -> `ant`, 310).
    """
    text = name.strip()
    if text.isdigit():
        index = int(text)
        if index >= NUM_IMAGENET_CLASSES:
            raise TransferError(f"class '{name}': ImageNet class indices run from 0 to {NUM_IMAGENET_CLASSES - 1}")
        return index
    wnids, descriptions, synonyms = _imagenet_info()
    if re.fullmatch(r"n\d{8}", text):
        if text not in wnids:
            raise TransferError(f"class '{name}' is a WordNet id that is not one of the 1000 ImageNet classes")
        return wnids.index(text)
    key = _normalize_name(text)
    candidates = synonyms.get(key) or (synonyms.get(key[:-1]) if key.endswith("s") else None)
    if not candidates:
        raise TransferError(
            f"class '{name}' is not an ImageNet class name: name its folder by ImageNet class index (e.g. 310) "
            "or WordNet id, or by a name from timm.data.ImageNetInfo().label_descriptions()")
    indices = sorted({index for index, _ in candidates})
    if len(indices) > 1:
        first = sorted({index for index, position in candidates if position == 0})
        if len(first) == 1:
            return first[0]
        options = ", ".join(f"{i} ({descriptions[i]})" for i in indices)
        raise TransferError(f"class '{name}' names several ImageNet classes: {options}; name its folder by the index")
    return indices[0]
