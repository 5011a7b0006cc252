"""Inputs of folder inference: which files to segment, and a dataset that survives broken files.

:func:`find_inputs` lists the radiographs under the input folder; :class:`InferenceDataset` runs the
configured preprocessing on each inside a try/except, so that a file that cannot be read becomes an
*error record* (a blank image and the reason) and never stops a batch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.data import Dataset

from .io import NIFTI_SUFFIXES, PIL_SUFFIXES, RadiographReadError, is_supported

logger = logging.getLogger("cxr_segmentation.inference")

DICOM_SUFFIXES = (".dcm", ".dicom")


def _strip_suffix(name: str) -> tuple[str, str]:
    """(stem, suffix) of a file name, for the image suffixes only: ``x.nii.gz`` -> (x, .nii.gz);
    a DICOM named by UID (``1.2.840.5``) keeps its dots."""
    lower = name.lower()
    for suffix in sorted(NIFTI_SUFFIXES + PIL_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return name, ""


def find_inputs(input_dir: str, exclude: Sequence[str] = (), image_key: str = "image") -> list[dict]:
    """The radiographs under ``input_dir`` (recursive, sorted), as ``{image, rel, name}`` records.

    ``image`` is the absolute path, ``rel`` the path relative to ``input_dir`` and ``name`` the
    output name without suffix relative to the output folder: ``a/b/x.png`` -> ``a/b/x`` (outputs
    ``a/b/x_seg.png`` ...). Two inputs of one folder with the same stem (``x.png`` and ``x.dcm``) get
    ``x_png`` and ``x_dcm``. Hidden files and folders, files that are not images by name or content
    (``.txt``, ``.csv``, extension-less non-DICOM files) and the folders in ``exclude`` (the output
    folder when it lies inside the input folder) are left out. ``input_dir`` may also be one file.

    A missing folder gives an empty list and a warning (the run stops with a clear error in
    :meth:`SegmentationWriter.check_ready`), so that the config can be parsed without data.
    """
    root = os.path.abspath(os.path.expanduser(str(input_dir)))
    if os.path.isfile(root):
        files, root = [root], os.path.dirname(root)
    elif os.path.isdir(root):
        excluded = {os.path.abspath(os.path.expanduser(str(e))) for e in exclude if e}
        files, skipped = [], 0
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(folder, d) not in excluded)
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.startswith(".") or not os.path.isfile(path):
                    continue
                if is_supported(path):
                    files.append(path)
                else:
                    skipped += 1
        if skipped:
            logger.info(f"inference: {skipped} file(s) under {root} are not images by name or content; skipped")
    else:
        logger.warning(f"inference: input folder {root} does not exist")
        return []
    records = []
    for path in sorted(files):
        rel = os.path.relpath(path, root)
        stem, suffix = _strip_suffix(os.path.basename(rel))
        records.append({image_key: path, "rel": rel, "name": os.path.join(os.path.dirname(rel), stem), "_sfx": suffix})
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["name"], []).append(r)
    for same in by_name.values():
        if len(same) > 1:
            for r in same:
                r["name"] += "_" + (r["_sfx"].lstrip(".").replace(".", "_") or "noext")
    for r in records:
        del r["_sfx"]
    return records


def describe_error(exc: BaseException) -> str:
    """One line saying why a file failed: the reader's reason when known, else the innermost exception."""
    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, RadiographReadError):
            return e.reason
    inner = chain[-1]
    message = " ".join(str(inner).split()) or repr(inner)
    return f"{type(inner).__name__}: {message}"[:500]


class InferenceDataset(Dataset):
    """MONAI ``Dataset`` over :func:`find_inputs` records that turns a failing file into an error record.

    Each item is a flat dict: ``image`` (float32 tensor, 1 x spatial_size), ``path``, ``rel``,
    ``name``, ``rows`` / ``columns`` (native size), ``spacing`` (float64 tensor [row, column] in mm,
    NaN when the file gives none), ``format`` (dicom, pil, nifti) and ``error`` ("" when the file was
    read). An error record has a zero image, so batches keep one shape; post-processing and the
    writer skip it.
    """

    def __init__(self, data: Sequence[dict], transform: Callable, spatial_size: Sequence[int],
                 image_key: str = "image"):
        super().__init__(data=data, transform=transform)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.image_key = image_key

    def _record(self, item: dict, image: torch.Tensor, rows: int, columns: int, spacing, fmt: str, error: str) -> dict:
        return {
            self.image_key: image,
            "path": item[self.image_key],
            "rel": item["rel"],
            "name": item["name"],
            "rows": rows,
            "columns": columns,
            "spacing": torch.tensor(spacing if spacing is not None else (math.nan, math.nan), dtype=torch.float64),
            "format": fmt,
            "error": error,
        }

    def _transform(self, index: int) -> dict:
        item = self.data[index]
        try:
            image = self.transform(dict(item))[self.image_key]
            meta = image.meta
            rows, columns = (int(s) for s in meta["spatial_shape"][:2])
            # the reader's affine holds the file's spacing; "affine" itself follows the resize
            original = np.asarray(meta.get("original_affine", meta["affine"]))
            spacing = np.abs(np.diag(original))[:2].tolist() if bool(meta["spacing_known"]) else None
            return self._record(item, image.as_tensor().float().contiguous(), rows, columns, spacing,
                                str(meta["source_format"]), "")
        except Exception as e:  # noqa: BLE001 - any failure of one file makes an error record
            blank = torch.zeros((1, *self.spatial_size), dtype=torch.float32)
            return self._record(item, blank, 0, 0, None, "", describe_error(e))
