"""Images of a concept with its object masks, for methods that train on them (MACE).

``method.data`` names where they come from: a folder in MACE's data layout (``<concept>/`` images and
``<concept> mask/`` masks, as the authors' ``data_preparation.py`` writes them with Grounded-SAM), or a source
registered under the ``erasure.example_sources`` entry-point group (:mod:`erasure.plugins`): the toy world's
``renderer`` (its scenes of the concept and their exact masks), or a plug-in's. A source is
``source(concept, count, seed) -> (images (n, H, W, 3) uint8, masks (n, H, W) float32 in [0, 1])``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from erasure.plugins import plugins

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Source = Callable[[str, int, int], tuple[np.ndarray, np.ndarray]]


@cache
def sources() -> dict[str, Source]:
    """The registered sources by name (read once)."""
    return plugins("erasure.example_sources", {})


def concept_examples(data: str, concept: str, count: int, size: int, seed: int,
                     masks: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``count`` images of ``concept`` (and their masks, or None without ``masks``) from ``data``: a registered
    source's name, else a folder (images resized to ``size``)."""
    if data in sources():
        images, found = sources()[data](concept, count, seed)
        return images, found if masks else None
    return folder_examples(Path(data), concept, count, size, masks)


def folder_examples(root: Path, concept: str, count: int, size: int,
                    masks: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``count`` images of ``root/<concept>`` resized to ``size`` and, with ``masks``, those of
    ``root/<concept> mask`` (the same names in order; grey above one half is the object)."""
    def files(folder: Path) -> list[Path]:
        if not folder.is_dir():
            raise ValueError(f"method.data: no folder {folder}; MACE needs {count} images of '{concept}' there"
                             + (" and their masks in '<concept> mask'" if masks else ""))
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
        if not found:
            raise ValueError(f"method.data: {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        return found

    def read(path: Path, mode: str) -> np.ndarray:
        return np.asarray(Image.open(path).convert(mode).resize((size, size), Image.Resampling.BICUBIC))

    images = np.stack([read(p, "RGB") for p in files(root / concept)])
    if not masks:
        return images, None
    mask_files = files(root / f"{concept} mask")
    if len(mask_files) != len(images):
        raise ValueError(f"method.data: {len(images)} images of '{concept}' but {len(mask_files)} masks; give one "
                         "mask per image")
    return images, np.stack([read(p, "L") for p in mask_files]).astype(np.float32) / 255
