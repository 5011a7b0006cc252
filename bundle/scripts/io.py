"""Reading radiographs and label maps from PNG/JPEG (8/16-bit, RGB), DICOM and NIfTI.

Every reader returns the pixels as a 2D array in row-major (rows, columns) order, as a
person sees the image: bright bone, dark air. DICOM goes through pydicom's modality LUT
(RescaleSlope/Intercept), VOI LUT or window, and MONOCHROME1 is inverted, which MONAI's
own ``PydicomReader`` does not do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class RadiographReadError(ValueError):
    """A file that cannot be read as a radiograph; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a ``.dcm`` name or a file that starts with the DICOM preamble (``DICM`` at byte 128)."""
    if str(path).lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def may_be_dicom(path: str | os.PathLike) -> bool:
    """Whether a file that :func:`is_supported` accepts may be DICOM: it is not named as an image or NIfTI file
    (decided by name alone, without opening the file)."""
    return not str(path).lower().endswith(PIL_SUFFIXES + NIFTI_SUFFIXES)


def is_supported(path: str | os.PathLike) -> bool:
    """True for the files this module reads: PNG/JPEG/TIFF/BMP, NIfTI, and DICOM by name or content."""
    return str(path).lower().endswith(PIL_SUFFIXES + NIFTI_SUFFIXES) or is_dicom(path)


def _read_pil(path: str) -> tuple[np.ndarray, dict]:
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode now so that a truncated file fails here, with its name
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(img)
        else:  # L, LA, P (palette), RGB, RGBA, CMYK...: convert to 8-bit luminance
            array = np.asarray(img.convert("L") if img.mode != "L" else img)
    # no spacing from PNG/JPEG: their DPI fields are mostly tool defaults (72, 96), not detector pitch
    return array, {"spacing": None, "format": "pil"}


def _read_dicom(path: str) -> tuple[np.ndarray, dict]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise RadiographReadError(path, "DICOM file has no pixel data (PixelData element missing)")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # unsupported transfer syntax without its plugin, truncated data...
        raise RadiographReadError(path, f"cannot decode DICOM pixel data ({e})") from e
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:
        pixels = pixels.mean(axis=-1)
    elif pixels.ndim != 2:
        raise RadiographReadError(path, f"expected a single 2D frame, got pixel array of shape {pixels.shape}")
    if "ModalityLUTSequence" in ds:
        array = apply_modality_lut(pixels, ds).astype(np.float32)
    else:  # RescaleSlope/Intercept in float32 and in place: a third of the time of pydicom's float64 path
        array = pixels.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1:
            array *= np.float32(slope)
        if intercept != 0:
            array += np.float32(intercept)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        array = apply_voi_lut(array, ds).astype(np.float32, copy=False)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":  # high values are dark: invert
        np.subtract(np.float32(array.max() + array.min()), array, out=array)
    spacing = None
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if tag in ds and ds[tag].value:
            spacing = tuple(float(v) for v in ds[tag].value[:2])  # (row spacing, column spacing) in mm
            break
    return array, {"spacing": spacing, "format": "dicom"}


def _read_nifti(path: str) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    img = nib.load(path)
    data = np.squeeze(np.asanyarray(img.dataobj))
    if data.ndim != 2:
        raise RadiographReadError(path, f"expected a 2D NIfTI image, got shape {img.shape}")
    zooms = img.header.get_zooms()[:2]
    # NIfTI stores (x, y) = (columns, rows): transpose to (rows, columns)
    return data.T.astype(np.float32), {"spacing": (float(zooms[1]), float(zooms[0])), "format": "nifti"}


def read_radiograph(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read one radiograph as a 2D float32 array (rows, columns) and a dict with ``spacing`` (mm or None).

    Raises:
        RadiographReadError: the file is missing, empty, truncated, not an image, or a DICOM without pixels.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise RadiographReadError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise RadiographReadError(path, "file is empty (0 bytes)")
    try:
        if is_nifti(path):
            array, meta = _read_nifti(path)
        elif is_dicom(path):
            array, meta = _read_dicom(path)
        else:
            array, meta = _read_pil(path)
    except RadiographReadError:
        raise
    except Exception as e:
        raise RadiographReadError(path, f"not a readable image ({type(e).__name__}: {e})") from e
    if array.ndim != 2 or min(array.shape) < 2:
        raise RadiographReadError(path, f"expected a 2D grayscale image, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32), meta


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(rows, columns) of an image, read from its header where the format allows."""
    path = str(path)
    if not (is_nifti(path) or is_dicom(path)):
        from PIL import Image

        try:
            with Image.open(path) as img:
                return img.height, img.width
        except Exception as e:
            raise RadiographReadError(path, f"not a readable image ({type(e).__name__}: {e})") from e
    return read_radiograph(path)[0].shape


class RadiographReader(ImageReader):
    """A MONAI ``ImageReader`` over :func:`read_radiograph`, for ``LoadImage(d)(reader=RadiographReader)``.

    The array keeps the (rows, columns) order (no transposition, unlike ``PILReader``'s default), so
    images and masks read by it stay aligned whatever their format. The affine holds the pixel spacing
    (1 mm when unknown) and the metadata ``spacing_known`` says whether it came from the file.
    """

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return all(is_supported(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str] | str, **kwargs):
        files = ensure_tuple(data)
        if len(files) != 1:
            raise ValueError(f"RadiographReader reads one file at a time, got {len(files)}: {files}")
        return (str(files[0]), *read_radiograph(files[0]))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        path, array, info = img
        spacing = info["spacing"]
        affine = np.diag([*(spacing or (1.0, 1.0)), 1.0]).astype(np.float64)
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape),
            "original_channel_dim": float("nan"),
            "spacing_known": spacing is not None,
            "source_format": info["format"],
            "filename_or_obj": path,
        }
        return array, meta
