"""MONAI-style transforms that MONAI itself does not provide."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform, RandomizableTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy

from .io import RadiographReader


class LoadRadiographd(LoadImaged):
    """``LoadImaged`` with :class:`scripts.io.RadiographReader` alone, channel first: (1, rows, columns).

    MONAI's ``LoadImaged(reader=...)`` falls back to its other readers when the given one fails, which
    can read a file that ours rejects (a 3D NIfTI, say) or transpose a PNG. Here a failure raises
    ``RadiographReadError`` naming the file and the reason.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, reader=RadiographReader, image_only=True, ensure_channel_first=True,
                         allow_missing_keys=allow_missing_keys)
        self.radiograph_reader = RadiographReader()

    def __call__(self, data, reader=None):
        return super().__call__(data, reader=self.radiograph_reader)


class ScalePercentilesd(MapTransform):
    """Scale intensities so that the ``lower`` and ``upper`` percentiles map to 0 and 1, clipped to [0, 1].

    The same result as MONAI's ``ScaleIntensityRangePercentilesd(lower, upper, 0, 1, clip=True)``, with the
    percentiles from NumPy: ``torch.quantile`` takes about 10x longer on a radiograph. Metadata are kept.
    Images of more than ``sample_pixels`` pixels (a 5-megapixel study; not the 512 px training images)
    take the percentiles from a regular grid of about that many pixels: 10x faster, and the same values
    to within a grey level or so.
    """

    sample_pixels = 2**18

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.lower, self.upper = float(lower), float(upper)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            array = convert_to_numpy(img)
            step = max(1, int(np.sqrt(array.size / self.sample_pixels)))
            sample = array[..., ::step, ::step] if step > 1 else array
            low, high = (float(v) for v in np.percentile(sample, (self.lower, self.upper)))
            scaled = img - low  # a new array or tensor: scaled and clipped in place from here on
            if high > low:
                scaled *= 1.0 / (high - low)
            d[key] = scaled.clip(0.0, 1.0, out=scaled) if isinstance(scaled, np.ndarray) else scaled.clamp_(0.0, 1.0)
        return d


class CLAHE(Transform):
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a channel-first image in [0, 1].

    Each channel is quantised to ``bins`` levels (256: 8-bit, 65536: 16-bit), equalised with
    ``cv2.createCLAHE(clip_limit, tile_grid_size)`` and scaled back to [0, 1]. Run it after the
    intensity scaling; on a resized image the tile grid covers the same anatomy at any input size.

    Args:
        clip_limit: OpenCV's contrast limit per tile (2.0 is OpenCV's usual value).
        tile_grid_size: number of tiles along (rows, columns).
        bins: 256 or 65536 grey levels for the histogram.
    """

    def __init__(self, clip_limit: float = 2.0, tile_grid_size: Sequence[int] = (8, 8), bins: int = 256):
        if bins not in (256, 65536):
            raise ValueError(f"bins must be 256 (8-bit) or 65536 (16-bit), got {bins}")
        self.clip_limit = float(clip_limit)
        self.tile_grid_size = tuple(int(t) for t in tile_grid_size)
        self.bins = bins

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        array = convert_to_numpy(img, dtype=np.float32)
        dtype = np.uint8 if self.bins == 256 else np.uint16
        # OpenCV's tile grid is (columns, rows)
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=self.tile_grid_size[::-1])
        top = self.bins - 1
        out = np.empty_like(array)
        for c, channel in enumerate(array):
            quantised = np.rint(np.clip(channel, 0.0, 1.0) * top).astype(dtype)
            out[c] = clahe.apply(quantised).astype(np.float32) / top
        return convert_to_dst_type(out, img)[0]


class CLAHEd(MapTransform):
    """Dictionary version of :class:`CLAHE`."""

    def __init__(
        self,
        keys: KeysCollection,
        clip_limit: float = 2.0,
        tile_grid_size: Sequence[int] = (8, 8),
        bins: int = 256,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.clahe = CLAHE(clip_limit, tile_grid_size, bins)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.clahe(d[key])
        return d


class RandLungOpacityd(RandomizableTransform, MapTransform):
    """Paint a soft bright opacity over part of a lung field, leaving the label as it is.

    Effusions, consolidations and masses whiten parts of a lung, and the experts still outline the whole
    anatomical lung behind them (Montgomery's TB cases). This is meant to teach the network the lung's shape
    rather than its air (on the shared data it gained nothing beyond noise, so train.yaml leaves it off):
    with probability ``prob``, an ellipse centred on a random pixel of the lung
    field (``label[lung_channel] > 0``) is blurred at its edges and blended toward a bright grey value.
    Run it after the spatial augmentation, on an image in [0, 1], so that image and label agree.

    Args:
        image_key, label_key: the image (C, H, W) and its label (channel ``lung_channel`` > 0 is lung).
        prob: probability of painting an opacity.
        radius_range: semi-axes of the ellipse as fractions of the image's smaller side.
        intensity_range: grey value the opacity blends toward.
        opacity_range: blend weight at its centre (1: the anatomy below is hidden).
        lung_channel: which label channel marks the lung field (0 for a label map or anatomy's lungs).
    """

    def __init__(
        self,
        image_key: str,
        label_key: str,
        prob: float = 0.3,
        radius_range: Sequence[float] = (0.08, 0.25),
        intensity_range: Sequence[float] = (0.6, 0.95),
        opacity_range: Sequence[float] = (0.5, 1.0),
        lung_channel: int = 0,
    ):
        MapTransform.__init__(self, [image_key, label_key])
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key = image_key, label_key
        self.radius_range, self.intensity_range = tuple(radius_range), tuple(intensity_range)
        self.opacity_range, self.lung_channel = tuple(opacity_range), int(lung_channel)

    def opacity(self, lung: np.ndarray) -> np.ndarray | None:
        """A random blend weight (H, W) in [0, 1] centred in ``lung`` (a boolean mask), or None without lung."""
        rows, cols = np.nonzero(lung)
        if rows.size == 0:
            return None
        pick = self.R.randint(rows.size)
        side = min(lung.shape)
        axes = tuple(int(round(self.R.uniform(*self.radius_range) * side)) for _ in range(2))
        alpha = np.zeros(lung.shape, np.float32)
        cv2.ellipse(alpha, (int(cols[pick]), int(rows[pick])), axes, self.R.uniform(0, 180), 0, 360, 1.0, -1)
        sigma = max(1.0, 0.3 * min(axes))   # soft edges, as a real opacity fades out
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
        return alpha * self.R.uniform(*self.opacity_range)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        alpha = self.opacity(convert_to_numpy(d[self.label_key][self.lung_channel]) > 0)
        if alpha is None:
            return d
        value = self.R.uniform(*self.intensity_range)
        image = d[self.image_key]
        blend = convert_to_dst_type(alpha[None], image)[0]
        d[self.image_key] = image * (1 - blend) + value * blend
        return d


class DisplayCopyd(MapTransform):
    """Keep a small 8-bit copy of the radiograph for the overlay, so the file is read and windowed once.

    Place it right after the intensity scaling (:class:`ScalePercentilesd`, which clips): the image (channel
    first, at its native size, in [0, 1]) is mapped to 0-255 and reduced with OpenCV's area filter to fit
    ``max_size`` x ``max_size`` (smaller images keep their size). The copy goes to ``display_key`` as a uint8
    NumPy array (rows, columns); the image itself is left as it is.
    """

    def __init__(self, keys: KeysCollection, max_size: int = 1024, display_key: str = "display",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.max_size, self.display_key = int(max_size), display_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            # to 8 bits first (rounded and saturated; the image is in [0, 1]), then reduced: OpenCV's area filter
            # is faster on uint8, and the copy within two grey levels of reducing the float image
            image = cv2.convertScaleAbs(convert_to_numpy(d[key], dtype=np.float32)[0], alpha=255.0)
            rows, columns = image.shape
            scale = self.max_size / max(rows, columns)
            if scale < 1:
                step = int(1 / scale)
                if step > 1:  # an integer factor first: OpenCV's fast path, 2x faster on a 5-megapixel image
                    image = cv2.resize(image, (columns // step, rows // step), interpolation=cv2.INTER_AREA)
                size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            d[self.display_key] = image
        return d
