"""Quality control of folder inference: is the input a frontal chest radiograph, and is its segmentation plausible?

Two kinds of statistics, learned from the training split only (no example of a non-radiograph is ever
used), decide it at the network's size, where it costs well under a millisecond per study:

- **appearance**: the network input (after the preprocessing: percentile scaling, CLAHE) reduced to
  32 x 32 and compared with a principal-component model of the training radiographs: the residual
  outside the model's 20 components and the Mahalanobis distance inside them;
- **shape**: the predicted lung mask (and heart, for the anatomy model) reduced to 32 x 32 and compared
  the same way with a model of the expert masks of the training split.

Each distance is divided by its limit: the 99.5th percentile of the training split's distances, each
measured by a model fitted without it (five folds), times ``MARGIN``; a ratio above 1 is outside what the
training data hold. When the appearance is out of range, the same
test on the image turned by 90, 180 or 270 degrees, or with its grey scale inverted, says whether it is
a chest radiograph stored that way (``rotated_*``, ``inverted_grey_scale``) rather than something else
(``not_a_frontal_chest_radiograph``).

``qc_score`` (0 to 1) maps the largest ratio ``r`` to ``1 / (1 + r**4)``: 0.5 at a limit, 0.94 at half of it,
below 0.06 at twice it; a flag of :func:`scripts.measures.qc_flags` (lung components, areas, CTR) counts
as ``FLAG_RATIO``. A study is flagged when its score is below 0.5, i.e. when any flag is set.

The model file (``models/qc_model.npz``) is written by :func:`fit_qc_model` (``run fitting_qc``, see
configs/qc_fit.yaml) and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

logger = logging.getLogger("cxr_segmentation.qc")

SIZE = 32            # side of the reduced image and masks the models compare
COMPONENTS = 20      # principal components of each model
QUANTILE = 0.995     # the limits: this quantile of the training split's distances ...
MARGIN = 1.1         # ... times this margin
FLAG_RATIO = 1.25    # the ratio a flag of measures.qc_flags counts as in qc_score
PARTS = ("appearance", "lungs", "heart")
# the flags that make a cardiothoracic ratio meaningless (it is then left empty)
NOT_MEASURABLE = ("not_a_frontal_chest_radiograph", "inverted_grey_scale", "rotated_90_ccw", "rotated_90_cw",
                  "upside_down", "implausible_lung_shape", "implausible_heart_shape")
# how an image whose appearance is out of range fits when turned back: (flag, np.rot90 turns, inverted)
CORRECTIONS = (("rotated_90_ccw", 3, False), ("upside_down", 2, False), ("rotated_90_cw", 1, False),
               ("inverted_grey_scale", 0, True))


def reduce(image: np.ndarray) -> np.ndarray:
    """A 2D image or mask reduced (area) to ``SIZE`` x ``SIZE``, float32."""
    import cv2

    return cv2.resize(np.asarray(image, dtype=np.float32), (SIZE, SIZE), interpolation=cv2.INTER_AREA)


class _PCA:
    """Mean, principal components and their variances of reduced images; the two distances of a new one."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, variance: np.ndarray, limits: np.ndarray):
        self.mean, self.components, self.variance, self.limits = mean, components, variance, limits

    @classmethod
    def fit(cls, reduced: np.ndarray, components: int = COMPONENTS, folds: int = 5) -> "_PCA":
        """The model of all rows; its limits from out-of-fold distances (each fifth of the rows measured by a
        model of the other four fifths), so that they hold for new images, not only for the fitted ones."""
        x = reduced.reshape(len(reduced), -1).astype(np.float64)

        def pca(rows: np.ndarray) -> "_PCA":
            mean = rows.mean(axis=0)
            _, s, vt = np.linalg.svd(rows - mean, full_matrices=False)
            return cls(mean, vt[:components], s[:components] ** 2 / (len(rows) - 1), np.ones(2))

        part = np.arange(len(x)) % folds
        held_out = np.concatenate([pca(x[part != k]).distances(x[part == k]) for k in range(folds)])
        model = pca(x)
        model.limits = np.quantile(held_out, QUANTILE, axis=0) * MARGIN
        return model

    def distances(self, reduced: np.ndarray) -> np.ndarray:
        """(residual outside the components, Mahalanobis distance inside them / components) of each row."""
        x = np.asarray(reduced, dtype=np.float64).reshape(-1, self.mean.size) - self.mean
        coefficients = x @ self.components.T
        residual = ((x - coefficients @ self.components) ** 2).sum(axis=1)
        mahalanobis = (coefficients ** 2 / self.variance).sum(axis=1) / len(self.variance)
        return np.stack([residual, mahalanobis], axis=1)

    def ratio(self, reduced: np.ndarray) -> float:
        """The larger of the two distances, each divided by its limit (above 1: outside the training data)."""
        return float((self.distances(reduced)[0] / self.limits).max())


class QCModel:
    """The appearance and shape models of :func:`fit_qc_model`, loaded from an ``.npz`` file (no pickle)."""

    def __init__(self, parts: Mapping[str, _PCA]):
        self.parts = dict(parts)

    @classmethod
    def load(cls, path: str) -> "QCModel":
        with np.load(path, allow_pickle=False) as f:
            return cls({p: _PCA(*(f[f"{p}_{a}"] for a in ("mean", "components", "variance", "limits")))
                        for p in PARTS if f"{p}_mean" in f.files})

    def save(self, path: str) -> None:
        from .files import atomic_write

        arrays = {f"{p}_{a}": getattr(m, a).astype(np.float32) for p, m in self.parts.items()
                  for a in ("mean", "components", "variance", "limits")}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)

    def check(self, image: np.ndarray, masks: Mapping[str, np.ndarray]) -> tuple[dict[str, float], list[str]]:
        """The ratios and flags of one study: its network input (2D, [0, 1]) and masks by structure name."""
        ratios, flags = {}, []
        if "appearance" in self.parts:
            model, small = self.parts["appearance"], reduce(image)
            ratios["appearance"] = model.ratio(small)
            if ratios["appearance"] > 1:
                turned = {flag: model.ratio(np.rot90(1 - small if invert else small, turns))
                          for flag, turns, invert in CORRECTIONS}
                best = min(turned, key=turned.get)
                # a radiograph stored turned or inverted fits clearly better once turned back
                if turned[best] < min(1.0, 0.6 * ratios["appearance"]):
                    flags.append(best)
                else:
                    flags.append("not_a_frontal_chest_radiograph")
        for name in ("lungs", "heart"):
            if name in self.parts and name in masks:
                ratios[name] = self.parts[name].ratio(reduce(masks[name]))
                if ratios[name] > 1:
                    flags.append(f"implausible_{'lung' if name == 'lungs' else name}_shape")
        return ratios, flags


def qc_score(ratios: Mapping[str, float], flags: Sequence[str]) -> float:
    """0 to 1 from the largest ratio ``r`` (a set flag counts as ``FLAG_RATIO``): ``1 / (1 + r**4)``."""
    worst = max([*ratios.values(), FLAG_RATIO if flags else 0.0], default=0.0)
    return float(1.0 / (1.0 + worst ** 4))


class QualityChecksd(MapTransform):
    """Post-processing step: the QC of one item from its network input (``keys``) and the masks decided at
    network size (``fields``/``rule`` of :class:`scripts.postprocessing.DecideAtNetworkSized`); sets
    ``qc_ratios`` and ``qc_model_flags``. Without a model file (a model trained without one) it sets
    nothing, and only the measures' flags are left."""

    def __init__(self, keys: KeysCollection, class_names: Sequence[str], model_file: str | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        import os

        self.class_names = [str(c) for c in class_names]
        self.model = QCModel.load(model_file) if model_file and os.path.isfile(model_file) else None
        if self.model is None:
            logger.warning(f"inference: no QC model at {model_file}: qc_score and qc_flags come from the measures only")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from .postprocessing import decide_at_size

        d = dict(data)
        if self.model is None:
            return d
        for key in self.key_iterator(d):
            try:
                image = torch.as_tensor(d[key]).detach().float().cpu().numpy().reshape(d[key].shape[-2:])
                fields = d["fields"]
                masks = decide_at_size(fields, d["rule"], fields.shape[1:])
                d["qc_ratios"], d["qc_model_flags"] = self.model.check(image, dict(zip(self.class_names[1:], masks)))
            except Exception as e:  # noqa: BLE001 - QC is a verdict on the study, never the reason it fails
                logger.warning(f"inference: QC could not be computed for {d.get('path', 'an input')}: {e}")
                d["qc_ratios"], d["qc_model_flags"] = {}, ["qc_not_computed"]
        return d


def fit_qc_model(training: Sequence[Mapping], preprocessing, output_file: str, heart: Sequence[Mapping] = (),
                 image_key: str = "image", label_key: str = "label") -> QCModel:
    """Fit the appearance model on the training images (through ``preprocessing``, as the network sees them)
    and the lung (and, given ``heart`` image/label pairs, heart) shape model on their expert masks; save it.

    Args:
        training: ``{image, label}`` pairs of the training split (label > 0: lungs).
        preprocessing: train.yaml's deterministic preprocessing (its ``image`` output is the network input,
            equal to inference's).
        output_file: the ``.npz`` to write.
        heart: ``{image, label}`` pairs whose label > 0 is the heart (e.g. JSRT/SCR structures/heart).
    """
    from PIL import Image
    from tqdm import tqdm

    appearance, lungs = [], []
    for item in tqdm(training, desc="QC model: training images", unit="img"):
        image = preprocessing(dict(item))[image_key]
        appearance.append(reduce(np.asarray(image)[0]))
        lungs.append(reduce(np.asarray(Image.open(item[label_key])) > 0))
    parts = {"appearance": _PCA.fit(np.stack(appearance)), "lungs": _PCA.fit(np.stack(lungs))}
    if heart:
        parts["heart"] = _PCA.fit(np.stack([reduce(np.asarray(Image.open(h[label_key])) > 0) for h in heart]))
    model = QCModel(parts)
    model.save(output_file)
    logger.info(f"QC model from {len(training)} training images ({len(heart)} heart masks) -> {output_file}; "
                f"limits: " + ", ".join(f"{p} {m.limits[0]:.3g}/{m.limits[1]:.3g}" for p, m in parts.items()))
    return model
