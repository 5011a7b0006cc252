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
    """Write a grey (H, W) or RGB (H, W, 3) uint8 array as PNG (Pillow, zlib ``level``), atomically.

    Pillow writes a 5-megapixel mask about 2x faster than OpenCV 5's encoder at any level here; for such a
    label map level 3 is faster than level 1 (16 against 24 ms) and the file smaller, for an RGB picture
    level 1 is the faster."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=level))


def save_jpeg(array: np.ndarray, path: str, quality: int = 90) -> None:
    """Write a grey or RGB (H, W, 3) uint8 picture as JPEG (OpenCV), atomically: for overlays, which are
    for looking at. No chroma subsampling (4:4:4), so thin coloured outlines stay sharp."""
    import cv2

    if array.ndim == 3:
        array = array[..., ::-1]  # OpenCV writes BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality),
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(array), params)
    if not ok:
        raise OSError(f"could not encode {path} as JPEG")
    atomic_write(path, lambda tmp: encoded.tofile(tmp))
