"""Inputs of folder inference: which files to segment, and a dataset that survives broken files.

:func:`find_inputs` lists the radiographs under the input folder; :class:`InferenceDataset` runs the
configured preprocessing on each inside a try/except, so that a file that cannot be read becomes an
*error record* (a blank image and the reason) and never stops a batch.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
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


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what ``path`` leads to (links followed); None when it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(root: str, excluded: set[str], visited: set) -> list[str]:
    """The image files under the folder ``root`` (unsorted), following linked files and folders.

    The real tree is walked first, then the linked folders found in it (then the ones found in those ...),
    so a folder reached both directly and through a link is listed under its direct path, and of two links
    to one folder the first in walk order is followed. ``visited`` holds the (st_dev, st_ino) of the folders
    walked (and of the excluded ones): a link to an ancestor or to a folder already walked is not entered.
    """
    files, skipped, repeated = [], 0, 0
    queue = deque([root])

    def unreadable(e: OSError) -> None:
        logger.warning(f"inference: cannot list {e.filename}: {e.strerror}; skipped")

    while queue:
        top = queue.popleft()
        identity = _identity(top)
        if identity is None or identity in visited:
            repeated += top != root
            continue
        visited.add(identity)
        for folder, dirs, names in os.walk(top, onerror=unreadable):  # it does not enter linked folders
            kept = []
            for d in sorted(dirs):
                path = os.path.join(folder, d)
                if d.startswith(".") or path in excluded:
                    continue
                if os.path.islink(path):
                    queue.append(path)  # after the real tree
                elif (identity := _identity(path)) is not None and identity not in visited:
                    visited.add(identity)
                    kept.append(d)
            dirs[:] = kept
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.startswith("."):
                    continue
                if not os.path.isfile(path):
                    if os.path.islink(path) and not os.path.exists(path):
                        logger.warning(f"inference: broken link {path} -> {os.readlink(path)}; skipped")
                    continue
                if is_supported(path):
                    files.append(path)
                else:
                    skipped += 1
    if skipped:
        logger.info(f"inference: {skipped} file(s) under {root} are not images by name or content; skipped")
    if repeated:
        logger.info(f"inference: {repeated} linked folder(s) under {root} lead to a folder already listed "
                    f"(or excluded); not listed again")
    return files


def _once(files: list[str]) -> list[str]:
    """``files`` less the file links whose target is listed too (by a direct path, else by the first link)."""
    by_identity: dict[tuple[int, int], list[str]] = {}
    for path in sorted(files):
        identity = _identity(path)
        if identity is not None:
            by_identity.setdefault(identity, []).append(path)
    dropped = set()
    for same in by_identity.values():
        links = [p for p in same if os.path.islink(p)]
        if len(same) > 1 and links:
            dropped.update(links[1:] if len(links) == len(same) else links)  # hard links stay separate files
    if dropped:
        logger.info(f"inference: {len(dropped)} file link(s) lead to a file already listed; not listed again")
    return [p for p in files if p not in dropped]


def _read_list(input_list: str, excluded: set[str], visited: set) -> tuple[list[str], str]:
    """The files named by the text file ``input_list`` (folders expanded as by the folder walk) and their
    common folder."""
    list_path = os.path.abspath(os.path.expanduser(str(input_list)))
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"inference: the input list {list_path} does not exist")
    with open(list_path, encoding="utf-8-sig") as f:
        entries = [line.strip() for line in f.read().splitlines()]
    base = os.path.dirname(list_path)
    files, anchors, seen = [], [], set()
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        path = os.path.abspath(os.path.join(base, os.path.expanduser(entry)))
        if path in seen:
            continue
        seen.add(path)
        if os.path.isdir(path):
            found = [p for p in _walk(path, excluded, visited) if p not in seen]
            seen.update(found)
            files += found
            anchors.append(path)
        else:  # a missing file stays: reading it fails, and it gets a failed row ("no such file")
            files.append(path)
            anchors.append(os.path.dirname(path))
    if not files:
        raise ValueError(f"inference: the input list {list_path} names no file (nor a folder holding images)")
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        logger.warning(f"inference: {len(missing)} file(s) of the input list {list_path} do not exist "
                       f"(first: {missing[0]}); they get a failed row")
    return files, os.path.commonpath(anchors)


def find_inputs(input_dir: str, exclude: Sequence[str] = (), image_key: str = "image",
                input_list: str | None = None) -> list[dict]:
    """The radiographs under ``input_dir`` (recursive, sorted), as ``{image, rel, name}`` records.

    ``image`` is the absolute path, ``rel`` the path relative to ``input_dir`` and ``name`` the
    output name without suffix relative to the output folder: ``a/b/x.png`` -> ``a/b/x`` (outputs
    ``a/b/x_seg.png`` ...). Two inputs of one folder with the same stem (``x.png`` and ``x.dcm``) get
    ``x_png`` and ``x_dcm``. Hidden files and folders, files that are not images by name or content
    (``.txt``, ``.csv``, extension-less non-DICOM files) and the folders in ``exclude`` (the output
    folder when it lies inside the input folder) are left out. ``input_dir`` may also be one file.

    Linked files and folders are followed, and paths keep the link names. Each folder is listed once
    (by st_dev and st_ino: a link to an ancestor or a second link to a folder is not entered), and so is
    each file reached through file links; broken links are skipped with a warning.

    ``input_list``, when set, is used instead of ``input_dir``: a text file of paths, one per line (blank
    lines and ``#`` comments ignored, relative paths relative to the list's folder; a folder stands for
    the images under it). The records are sorted, duplicates dropped, and ``rel`` is relative to the
    listed paths' common folder. Listed files are kept whatever their name and even when they do not
    exist, so that each gets a ``failed`` row. A missing or empty list raises an error.

    A missing folder gives an empty list and a warning (the run stops with a clear error in
    :meth:`SegmentationWriter.check_ready`), so that the config can be parsed without data.
    """
    excluded = {os.path.abspath(os.path.expanduser(str(e))) for e in exclude if e}
    visited = {i for i in map(_identity, excluded) if i is not None}
    root = os.path.abspath(os.path.expanduser(str(input_dir)))
    if input_list:
        files, root = _read_list(input_list, excluded, visited)
    elif os.path.isfile(root):
        files, root = [root], os.path.dirname(root)
    elif os.path.isdir(root):
        visited.discard(_identity(root))  # the output folder may be the input folder: it is still read
        files = _walk(root, excluded, visited)
    else:
        logger.warning(f"inference: input folder {root} does not exist")
        return []
    records = []
    for path in sorted(_once(files)):
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
    read). With ``display_size``, the preprocessing's 8-bit display copy (``display``, see
    :class:`scripts.transforms.DisplayCopyd`) travels in the top-left corner of a ``display_size`` square
    uint8 tensor, with its ``display_rows`` / ``display_columns``, so that items of any size batch
    together. An error record has zero images, so batches keep one shape; post-processing and the writer
    skip it.
    """

    def __init__(self, data: Sequence[dict], transform: Callable, spatial_size: Sequence[int],
                 image_key: str = "image", display_size: int | None = None):
        super().__init__(data=data, transform=transform)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.image_key = image_key
        self.display_size = int(display_size) if display_size else None

    def _record(self, item: dict, image: torch.Tensor, rows: int, columns: int, spacing, fmt: str, error: str,
                display: np.ndarray | None = None) -> dict:
        record = {
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
        if self.display_size:
            canvas = torch.zeros((self.display_size, self.display_size), dtype=torch.uint8)
            shown = (0, 0) if display is None else display.shape
            if display is not None:
                canvas[: shown[0], : shown[1]] = torch.from_numpy(np.ascontiguousarray(display))
            record.update(display=canvas, display_rows=int(shown[0]), display_columns=int(shown[1]))
        return record

    def _transform(self, index: int) -> dict:
        item = self.data[index]
        try:
            out = self.transform(dict(item))
            image = out[self.image_key]
            meta = image.meta
            rows, columns = (int(s) for s in meta["spatial_shape"][:2])
            # the reader's affine holds the file's spacing; "affine" itself follows the resize
            original = np.asarray(meta.get("original_affine", meta["affine"]))
            spacing = np.abs(np.diag(original))[:2].tolist() if bool(meta["spacing_known"]) else None
            display = out.get("display") if self.display_size else None
            if display is not None and max(display.shape) > self.display_size:
                raise ValueError(f"display copy {display.shape} larger than display_size {self.display_size}")
            return self._record(item, image.as_tensor().float().contiguous(), rows, columns, spacing,
                                str(meta["source_format"]), "", display)
        except Exception as e:  # noqa: BLE001 - any failure of one file makes an error record
            blank = torch.zeros((1, *self.spatial_size), dtype=torch.float32)
            return self._record(item, blank, 0, 0, None, "", describe_error(e))
