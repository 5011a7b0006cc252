"""Writing output files atomically: a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(temporary path)`` in ``path``'s folder, then move the result onto ``path`` (os.replace)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(array: np.ndarray, path: str) -> None:
    """Write a grey (H, W) or RGB (H, W, 3) uint8 array as PNG, atomically.

    zlib level 1 with the FILTERED strategy: about 4x faster than PIL's default level 6 and 30 % faster
    than level 1 with the default strategy, for files about as small (bench/README.md, "stages")."""
    import cv2

    if array.ndim == 3:
        array = array[..., ::-1]  # OpenCV writes BGR
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_FILTERED]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array), params)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write(path, lambda tmp: encoded.tofile(tmp))
