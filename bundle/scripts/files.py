"""Writing output files atomically: a reader never sees a half-written file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

import numpy as np


def _create_temporary(folder: str, name: str) -> str:
    """Create an empty ``.<name>.<random>.tmp`` in ``folder`` with mode 0o666 less the umask, as ``open``
    makes a new file (``tempfile.mkstemp`` makes it 0o600, which the final file would keep)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {folder}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(temporary path)`` in ``path``'s folder, then move the result onto ``path`` (os.replace).

    The file gets the permissions of any new file: 0o666 less the umask (0o644 with the usual 0o022), so that
    other users and services can read the outputs when the umask allows it."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = _create_temporary(folder or ".", name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(array: np.ndarray, path: str, level: int = 1) -> None:
    """Write a grey (H, W) or RGB (H, W, 3) uint8 picture as PNG (Pillow, zlib ``level``), atomically."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=level))


def save_mask_png(labels: np.ndarray, path: str) -> None:
    """Write a uint8 label map (H, W) as an 8-bit grey PNG, atomically, made for masks: long runs of equal
    values need no PNG filter, and deflate's run-length strategy finds them. OpenCV: a 5-megapixel mask in
    7 ms and 16 kB, where Pillow's adaptive filters take 30 ms and 38 kB (one core of the 2-core test machine)."""
    import cv2

    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
              cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(labels, dtype=np.uint8), params)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write(path, lambda tmp: encoded.tofile(tmp))


def save_jpeg(array: np.ndarray, path: str, quality: int = 90) -> None:
    """Write a grey or RGB (H, W, 3) uint8 picture as JPEG (Pillow: libjpeg-turbo, twice as fast as OpenCV's
    encoder here), atomically: for overlays, which are for looking at. No chroma subsampling (4:4:4), so thin
    coloured outlines stay sharp."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda tmp: image.save(tmp, format="JPEG", quality=int(quality), subsampling=0))
