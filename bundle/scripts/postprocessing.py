"""Post-processing of folder inference: the network's output of one image to its label map and masks.

Decide and clean where it is cheap, bring only the decision to the native size:

1. :class:`DecideAtNetworkSized`, at the network's resolution: the decision (argmax, or a threshold per
   structure), its clean-up (largest components of each class, filled holes), and *decision fields*
   whose sign (or argmax) is that cleaned decision. For two softmax classes the field is the logit
   difference ``l1 - l0``; for one sigmoid per structure it is ``logit - logit(threshold)``. Where the
   clean-up turned a pixel (a removed fragment, a filled hole), its value is mirrored, so the cleaned
   decision is what any resampling of the fields decides.
2. :class:`ResizeDecisiond`: the fields bilinearly to the native size (OpenCV on the CPU, torch on the
   device of the network's output) and the sign (or argmax): the label map and one binary mask per
   structure. For two classes the sign of the upsampled logit difference is exactly the argmax of the
   upsampled logits (bilinear interpolation is linear), without ever holding C full-size maps.

The overlay samples the same fields at its own (screen) size. :class:`SafeCompose` runs the transforms
on each item and turns an exception into an error for that item only.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform
from scipy import ndimage

from .inputs import describe_error


class SafeCompose(Compose):
    """``Compose`` for the evaluator's per-item post-processing: an exception fails that item only.

    Items that already carry an ``error`` are passed through; an exception sets ``error`` to
    ``"post-processing failed: ..."``.
    """

    def __call__(self, data, *args, **kwargs):
        if isinstance(data, Mapping) and data.get("error"):
            return data
        try:
            return super().__call__(data, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            out = dict(data)
            out["error"] = f"post-processing failed: {describe_error(e)}"
            return out


def output_mode(n_channels: int, class_names: Sequence[str]) -> str:
    """How the network's channels map to the classes, from their number.

    - ``len(class_names)`` channels: ``"softmax"``, one channel per class including background (the
      lung model: 2 channels; a pixel is the argmax);
    - ``len(class_names) - 1`` channels: ``"sigmoid"``, one independent channel per structure
      ``class_names[1:]`` (the anatomy model of anatomy.yaml: lungs, heart, clavicles, which overlap;
      each is thresholded, and the label map gives overlaps to the later class).
    """
    if n_channels == len(class_names):
        return "softmax"
    if n_channels == len(class_names) - 1:
        return "sigmoid"
    raise ValueError(f"the network has {n_channels} output channels, class_names {list(class_names)} needs "
                     f"{len(class_names)} (softmax) or {len(class_names) - 1} (one sigmoid per structure)")


_EIGHT = np.ones((3, 3), dtype=bool)


def keep_largest(mask: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` largest connected components (8-connectivity) of a binary mask."""
    components, count = ndimage.label(mask, structure=_EIGHT)
    if count <= n:
        return mask.astype(bool)
    sizes = np.bincount(components.ravel())[1:]
    kept = np.argsort(sizes, kind="stable")[::-1][:n] + 1
    return np.isin(components, kept)


def clean_labels(
    labels: np.ndarray,
    class_names: Sequence[str],
    max_components: Mapping[str, int] | None = None,
    fill_holes: bool = True,
) -> np.ndarray:
    """Keep the largest connected components of each class of a label map and fill enclosed holes.

    Args:
        labels: 2D label map.
        class_names: names of the class indices.
        max_components: {class name: number of components kept} (8-connectivity), e.g. lungs 2,
            heart 1, clavicles 2; classes not named keep all. Removed fragments become background.
        fill_holes: background regions enclosed by one class take that class (a hole in a lung
            becomes lung; a region of another class inside is left as it is).
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    for index, name in enumerate(class_names):
        keep = (max_components or {}).get(name)
        if index > 0 and keep is not None:
            mask = out == index
            out[mask & ~keep_largest(mask, keep)] = 0
    if fill_holes:
        for index in range(1, len(class_names)):
            mask = out == index
            if mask.any():
                out[ndimage.binary_fill_holes(mask) & (out == 0)] = index
    return out


def clean_structures(
    masks: np.ndarray,
    class_names: Sequence[str],
    max_components: Mapping[str, int] | None = None,
    fill_holes: bool = True,
) -> np.ndarray:
    """:func:`clean_labels` for overlapping binary masks ``(S, H, W)`` of ``class_names[1:]``, each on its own."""
    out = np.asarray(masks).astype(bool)
    for s, name in enumerate(class_names[1:]):
        keep = (max_components or {}).get(name)
        if keep is not None:
            out[s] = keep_largest(out[s], keep)
        if fill_holes and out[s].any():
            out[s] = ndimage.binary_fill_holes(out[s])
    return out.astype(np.uint8)


def structures_from_labels(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Binary masks ``(n_classes - 1, H, W)`` of the classes 1.. of a 2D label map."""
    return np.stack([labels == c for c in range(1, n_classes)]).astype(np.uint8)


def labels_from_structures(masks: np.ndarray) -> np.ndarray:
    """Label map of binary masks ``(S, H, W)`` (mask s = label s + 1); on overlaps the higher label wins
    (clavicles 3 over heart 2 over lungs 1), the rule of the JSRT/SCR label maps (scripts.anatomy)."""
    labels = np.zeros(np.asarray(masks).shape[1:], dtype=np.uint8)
    for s, mask in enumerate(np.asarray(masks)):
        labels[mask > 0] = s + 1
    return labels


# the smallest magnitude given to a pixel whose decision the clean-up turned (its field value is mirrored)
_MIRROR_FLOOR = 1e-3


def _agree(fields: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``fields`` with their sign made equal to ``masks`` (positive inside) by mirroring the values that disagree."""
    flip = (fields > 0) != masks
    out = fields.copy()
    out[flip] = np.where(masks[flip], 1.0, -1.0) * np.maximum(np.abs(fields[flip]), _MIRROR_FLOOR)
    return out


def decision_fields(
    logits: np.ndarray,
    class_names: Sequence[str],
    max_components: Mapping[str, int] | None = None,
    fill_holes: bool = True,
    threshold: float = 0.5,
) -> tuple[np.ndarray, str]:
    """Decide and clean the network's logits ``(C, h, w)`` at their own size; returns ``(fields, rule)``.

    ``rule`` says how any resampling of ``fields`` is read: ``"sign"``, structure ``s`` is where
    ``fields[s] > 0`` (two softmax classes: one field; one sigmoid per structure: one field each), or
    ``"argmax"``, the class is the argmax over ``fields`` (softmax over three or more classes). At the
    logits' own size the fields decide exactly the cleaned label map (:func:`clean_labels`) or masks
    (:func:`clean_structures`).
    """
    logits = np.asarray(logits, dtype=np.float32)
    if output_mode(logits.shape[0], class_names) == "sigmoid":
        fields = logits - np.float32(np.log(threshold / (1.0 - threshold)))
        masks = clean_structures(fields > 0, class_names, max_components, fill_holes).astype(bool)
        return _agree(fields, masks), "sign"
    if logits.shape[0] == 2:
        field = logits[1:] - logits[:1]
        labels = clean_labels((field[0] > 0).astype(np.uint8), class_names, max_components, fill_holes)
        return _agree(field, labels[None] > 0), "sign"
    decided = logits.argmax(axis=0)
    labels = clean_labels(decided, class_names, max_components, fill_holes)
    # where the clean-up turned a pixel, its class gets +v and every other class -v (v above all of that
    # pixel's logits): no resampling between it and its neighbours then picks the class it lost
    fields = logits.copy()
    rows, columns = np.nonzero(labels != decided)
    v = np.abs(logits[:, rows, columns]).max(axis=0) + _MIRROR_FLOOR
    fields[:, rows, columns] = -v
    fields[labels[rows, columns], rows, columns] = v
    return fields, "argmax"


def decide_at_size(fields: np.ndarray | torch.Tensor, rule: str, size: Sequence[int]) -> np.ndarray:
    """Binary masks ``(S, rows, columns)`` uint8 of the structures 1.. from the fields resampled to ``size``.

    Bilinear with pixel centres aligned (``align_corners=False``, as OpenCV's ``INTER_LINEAR``). A CPU
    array goes through OpenCV (about 10x faster than torch here); a tensor on another device is resized
    and decided there, and only the masks come back.
    """
    rows, columns = (int(s) for s in size)
    if isinstance(fields, torch.Tensor) and fields.device.type != "cpu":
        resized = torch.nn.functional.interpolate(fields[None].float(), size=(rows, columns), mode="bilinear",
                                                  align_corners=False)[0]
        if rule == "sign":
            return (resized > 0).to(torch.uint8).cpu().numpy()
        labels = resized.argmax(dim=0).to(torch.uint8).cpu().numpy()
        return structures_from_labels(labels, resized.shape[0])
    import cv2

    fields = np.asarray(fields.cpu() if isinstance(fields, torch.Tensor) else fields, dtype=np.float32)
    if fields.shape[1:] == (rows, columns):
        resized = fields
    else:
        channels_last = np.ascontiguousarray(np.moveaxis(fields, 0, -1))
        resized = cv2.resize(channels_last, (columns, rows), interpolation=cv2.INTER_LINEAR)
        resized = resized.reshape(rows, columns, -1).transpose(2, 0, 1)
    if rule == "sign":
        return (resized > 0).view(np.uint8)  # NumPy's bool is one byte, 0 or 1: no copy of a full-size mask
    return structures_from_labels(resized.argmax(axis=0), fields.shape[0])


class DecideAtNetworkSized(MapTransform):
    """The network's logits (``key``, ``(C, h, w)``) to cleaned decision fields at the same size (see
    :func:`decision_fields`): ``fields`` (float32 NumPy, ``(K, h, w)``) and ``rule``."""

    def __init__(
        self,
        keys: KeysCollection,
        class_names: Sequence[str],
        max_components: Mapping[str, int] | None = None,
        keep_largest: bool = True,
        fill_holes: bool = True,
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.class_names = list(class_names)
        self.max_components = dict(max_components or {}) if keep_largest else {}
        self.fill_holes = fill_holes
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            logits = torch.as_tensor(d[key]).detach().float().cpu().numpy()
            d["fields"], d["rule"] = decision_fields(logits, self.class_names, self.max_components, self.fill_holes,
                                                     self.threshold)
        return d


class ResizeDecisiond(MapTransform):
    """The decision fields at the item's native ``rows`` x ``columns`` (see :func:`decide_at_size`): the
    binary masks ``structures`` ``(S, H, W)`` and the label map ``key`` ``(1, H, W)`` (uint8 tensors).

    The masks are the full structures (the anatomy model's may overlap); the label map gives an overlap
    to the later class (:func:`labels_from_structures`). With ``device`` (the network's), the resize runs
    there, so on a GPU no full-size float map reaches the CPU.
    """

    def __init__(self, keys: KeysCollection, device: torch.device | str | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        size = (int(d["rows"]), int(d["columns"]))
        fields = d["fields"] if self.device.type == "cpu" else torch.as_tensor(d["fields"], device=self.device)
        masks = decide_at_size(fields, d["rule"], size)
        labels = masks[0] if len(masks) == 1 else labels_from_structures(masks)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(np.ascontiguousarray(labels)[None])
        d["structures"] = torch.from_numpy(masks)
        return d
