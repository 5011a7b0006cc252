"""Lungs, heart and clavicles as overlapping structures (JSRT/SCR), for ``configs/anatomy.yaml``.

The anatomy model has one sigmoid channel per structure (0 lungs, 1 heart, 2 clavicles), trained on
the full binary masks of ``<dataset>/structures/<name>/<stem>.png``: in SCR the clavicles lie mostly
inside the lung fields, and a label map (one class per pixel) would cut them out of the lungs.

- :class:`LoadStructuresd` reads the masks of one image into a ``(3, H, W)`` label (``load_label``
  of anatomy.yaml);
- :func:`structures_to_label_map` / :class:`StructuresToLabelMapd` turn such masks (or the thresholded
  network output) into the dataset's label map 0 background, 1 lungs, 2 heart, 3 clavicles, where
  the higher label wins on overlaps (clavicles > heart > lungs), as in ``<dataset>/masks/``;
- :class:`SelectChannel` is a metric ``output_transform`` that keeps one structure, for the metrics
  per structure during validation.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.handlers import from_engine
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import convert_to_dst_type

from .io import RadiographReader

STRUCTURES = ("lungs", "heart", "clavicles")  # channel order of the anatomy model = label values 1, 2, 3


def structure_paths(label_path: str | os.PathLike, structures: Sequence[str] = STRUCTURES,
                    structures_dir: str = "structures") -> list[Path]:
    """Paths of the binary masks that belong with a dataset's label file.

    ``<root>/masks/<stem>.png`` (or any ``<root>/<sub>/<stem>.png``) -> ``<root>/structures/<name>/<stem>.png``
    for every name; ``<root>/structures/<name>/<stem>.png`` itself is accepted too.
    """
    path = Path(label_path)
    root = path.parent.parent
    if root.name == structures_dir:  # a structures/<name>/<stem>.png path
        root = root.parent
    return [root / structures_dir / name / path.name for name in structures]


class LoadStructuresd(MapTransform):
    """Read the binary masks of the structures into one channel-first label ``(len(structures), H, W)``.

    The value of ``key`` is the path of the image's label file (``masks/<stem>.png``, as the data list
    of :func:`scripts.data.split_datalist` gives it); the masks are found next to it by
    :func:`structure_paths`. Channel ``c`` is 1 where ``structures[c]`` is, whatever other structure
    lies there too (overlaps intact). The result keeps the label file's path in its
    ``filename_or_obj`` metadata, so that it can be read again (evaluation at native size).

    Raises:
        FileNotFoundError: a structure mask is missing (its path is in the message).
    """

    def __init__(self, keys: KeysCollection, structures: Sequence[str] = STRUCTURES,
                 structures_dir: str = "structures", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.structures = tuple(structures)
        self.structures_dir = structures_dir
        self.loader = LoadImage(reader=RadiographReader, image_only=True, ensure_channel_first=True)
        self.reader = RadiographReader()  # given at call time: no fallback to MONAI's other readers

    def __call__(self, data: Mapping[Hashable, str]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label_path = str(d[key])
            masks = []
            for path in structure_paths(label_path, self.structures, self.structures_dir):
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{path}: missing mask of the structure {path.parent.name!r} for {label_path} "
                        f"(expected <dataset>/{self.structures_dir}/<name>/<stem>.png)")
                masks.append(self.loader(str(path), reader=self.reader) > 0)
            shapes = {tuple(m.shape) for m in masks}
            if len(shapes) != 1:
                raise ValueError(f"{label_path}: the structure masks differ in size {sorted(shapes)}")
            label = torch.cat(masks, dim=0).to(torch.uint8)  # MetaTensor: metadata of the first mask
            if isinstance(label, MetaTensor):
                label.meta["filename_or_obj"] = label_path
            d[key] = label
        return d


def structures_to_label_map(masks, threshold: float = 0.5):
    """Binary (or probability) masks ``(C, H, W)``, channel c = label value c + 1, to a label map ``(1, H, W)``.

    Where structures overlap the higher label value wins (for the anatomy model: clavicles 3 over heart 2
    over lungs 1), the precedence rule of the JSRT/SCR label maps in ``masks/``. Values above
    ``threshold`` count as inside. Returns the type of ``masks`` (tensor/MetaTensor or numpy array),
    with integer values 0..C.
    """
    array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if array.ndim != 3:
        raise ValueError(f"expected channel-first masks (C, H, W), got shape {array.shape}")
    label = np.zeros((1, *array.shape[1:]), dtype=np.uint8)
    for c in range(array.shape[0]):  # later (higher) values overwrite earlier ones
        label[0][array[c] > threshold] = c + 1
    return convert_to_dst_type(label, masks, dtype=torch.uint8 if isinstance(masks, torch.Tensor) else np.uint8)[0]


class StructuresToLabelMap(Transform):
    """Array version of :func:`structures_to_label_map`, for the inference config's post-processing."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def __call__(self, masks):
        return structures_to_label_map(masks, self.threshold)


class StructuresToLabelMapd(MapTransform):
    """Dictionary version of :func:`structures_to_label_map`: ``(C, H, W)`` masks -> ``(1, H, W)`` label map."""

    def __init__(self, keys: KeysCollection, threshold: float = 0.5, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = StructuresToLabelMap(threshold)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class SelectChannel:
    """Metric ``output_transform``: ``(y_pred, y)`` lists from the engine output, keeping channel ``channel``.

    With ``MeanDice(include_background=True, output_transform=SelectChannel(1))`` a handler reports the
    Dice of one structure (here the heart), logged like any other metric.
    """

    def __init__(self, channel: int, keys: Sequence[str] = ("pred", "label")):
        self.channel = int(channel)
        self.to_pred_label = from_engine(list(keys))

    def __call__(self, output):
        preds, labels = self.to_pred_label(output)
        c = slice(self.channel, self.channel + 1)
        return [p[c] for p in preds], [y[c] for y in labels]
