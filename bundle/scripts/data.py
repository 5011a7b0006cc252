"""Data lists for training and evaluation: image/mask pairs from one or more dataset folders.

A dataset folder holds ``images/<stem>.<ext>`` and ``masks/<stem>.png`` with matching stems (the
layout that ``data/prepare_data.py`` writes). ``dataset_dir`` in the configs is one such folder,
or a list of them; an entry may also be a dict ``{"dir": ..., "masks": "structures/lungs"}`` to
take the masks from another sub-folder.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

from .io import image_size, is_supported


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the folder or file and the fix."""


def _as_source(entry: str | os.PathLike | dict) -> tuple[Path, Path, str]:
    """(images dir, masks dir, dataset name) for one ``dataset_dir`` entry."""
    if isinstance(entry, dict):
        root, masks = Path(entry["dir"]), entry.get("masks", "masks")
    else:
        root, masks = Path(entry), "masks"
    return root / "images", root / masks, root.name


def find_pairs(entry: str | os.PathLike | dict, check_sizes: bool = True) -> list[dict]:
    """All ``{"image", "label", "dataset"}`` pairs of one dataset folder, sorted by stem.

    Raises:
        DatasetError: the folder has no images, an image has no mask, or an image and its mask differ in size.
    """
    images_dir, masks_dir, name = _as_source(entry)
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such folder; a dataset folder holds images/ and masks/ "
                               "(see data/README.md)")
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and is_supported(p))
    if not images:
        raise DatasetError(f"{images_dir}: no images found (expected PNG, JPEG, DICOM or NIfTI files)")
    masks = {p.name.split(".")[0]: p for p in masks_dir.iterdir() if p.is_file()}
    pairs = []
    for image in images:
        stem = image.name.split(".")[0]
        mask = masks.get(stem)
        if mask is None:
            raise DatasetError(f"{image}: no mask for this image; expected {masks_dir / (stem + '.png')}")
        if check_sizes and image_size(image) != image_size(mask):
            raise DatasetError(
                f"{image}: image is {image_size(image)} (rows, columns) but its mask {mask} is {image_size(mask)}; "
                "masks must have the image's size"
            )
        pairs.append({"image": str(image), "label": str(mask), "dataset": name})
    return pairs


def split_datalist(
    dataset_dir: str | os.PathLike | dict | Sequence, val_fraction: float = 0.2, seed: int = 0, fold: int = 0
) -> dict[str, list[dict]]:
    """Seeded split of every dataset folder into ``{"training": [...], "validation": [...]}``.

    Each folder is split on its own (shuffled with ``random.Random(seed)``), so that every data set has a
    held-out part. The shuffled pairs are cut into parts of ``round(val_fraction * n)`` (at least one);
    part ``fold`` is the validation set and the rest is training. ``fold`` 0 (the first part) is the
    default; folds 0 .. ceil(1 / val_fraction) - 1 give a cross-validation in which every image is
    validated once (0.2: five folds). The same inputs, seed and fold always give the same split.
    """
    entries = [dataset_dir] if isinstance(dataset_dir, (str, os.PathLike, dict)) else list(dataset_dir)
    if not entries:
        raise DatasetError("dataset_dir is an empty list; give a dataset folder or a list of them")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_folds = math.ceil(round(1 / val_fraction, 6)) if val_fraction > 0 else 1
    if not 0 <= fold < n_folds:
        raise DatasetError(f"fold must be in 0..{n_folds - 1} for val_fraction {val_fraction}, got {fold}")
    split = {"training": [], "validation": []}
    for entry in entries:
        pairs = find_pairs(entry)
        random.Random(seed).shuffle(pairs)
        if val_fraction == 0:
            start = stop = 0
        else:
            start = round(fold * val_fraction * len(pairs))
            stop = min(len(pairs), max(start + 1, round((fold + 1) * val_fraction * len(pairs))))
        if stop - start >= len(pairs) or start >= len(pairs):
            raise DatasetError(f"{_as_source(entry)[0]}: {len(pairs)} image(s) are too few to split off "
                               f"fold {fold} of {n_folds} (val_fraction {val_fraction})")
        split["validation"] += pairs[start:stop]
        split["training"] += pairs[:start] + pairs[stop:]
    return split
