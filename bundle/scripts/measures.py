"""Measures of a chest radiograph's label map for inference's results.csv, and quality-control flags.

All functions take a 2D label map (rows, columns) in the bundle's convention, with the class indices
named by ``class_names`` (``["background", "lungs"]``, or ``["background", "lungs", "heart",
"clavicles"]`` for the anatomy model), and the pixel spacing in mm (rows, columns) or None.

Sides: a frontal radiograph is displayed as if facing the patient (PA or AP view), so the patient's
RIGHT lung is on the IMAGE LEFT (small column indices) and the left lung on the image right.

Quality-control thresholds (``QC_LIMITS``) were set from the expert masks of the 700 radiographs in
../shared/data (Montgomery, Shenzhen, JSRT/SCR), with a margin:

- lung area as a fraction of the image: 0.09 to 0.43 in the reference masks (median 0.20 Montgomery,
  0.25 Shenzhen, 0.29 JSRT) -> flagged outside [0.08, 0.50];
- right/left lung area ratio: 1st to 99th percentile 0.75 to 1.79 (median 1.16 to 1.25) -> flagged
  outside [0.5, 2.0] (a collapsed or missing lung, or a split that went wrong);
- cardiothoracic ratio: 0.35 to 0.63 on JSRT (median 0.47) -> flagged outside [0.30, 0.70]. A CTR
  above 0.5 is a clinical finding (cardiomegaly on a PA view), not a segmentation problem, and is not
  flagged by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

QC_LIMITS = {
    "lung_area_fraction": (0.08, 0.50),
    "right_left_ratio": (0.5, 2.0),
    "cardiothoracic_ratio": (0.30, 0.70),
}

LUNGS, HEART = "lungs", "heart"


def csv_columns(class_names: Sequence[str]) -> list[str]:
    """The header of results.csv for a model with these classes (heart columns only with a heart class)."""
    columns = ["path", "status", "error", "warnings", "mask", "rows", "columns", "spacing_mm"]
    if LUNGS in class_names:
        columns += ["lung_area_px", "lung_area_cm2", "right_lung_area_px", "left_lung_area_px", "n_lung_components"]
    for name in class_names[1:]:
        if name != LUNGS:
            columns += [f"{name}_area_px", f"{name}_area_cm2"]
    if LUNGS in class_names and HEART in class_names:
        columns.append("cardiothoracic_ratio")
    columns += ["qc_score", "qc_flags"]
    return columns


def area_cm2(area_px: int, spacing: Sequence[float] | None) -> float | None:
    """Area in cm^2 of ``area_px`` pixels of ``spacing`` (mm, rows and columns); None when spacing is unknown."""
    if spacing is None:
        return None
    return float(area_px) * float(spacing[0]) * float(spacing[1]) / 100.0


def _lung_components(lungs: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray, int, int, dict]:
    """Connected components (8-connectivity, OpenCV: 3x faster than SciPy) of a lung mask, labelled in the
    mask's bounding box only (a third to two thirds of a radiograph), and the pixels of those that lie on
    both sides of the midline of :func:`split_lungs` (the others go whole to their side: no counting).

    Returns:
        (the bounding box (row and column slices of the image; empty for an empty mask), its component
        labels, the number of components, the box's first column right of the midline, and the
        components that lie on both sides of it: ``{label: (pixels left of it, pixels right of it)}``).
    """
    import cv2

    lungs = np.asarray(lungs, dtype=bool)
    rows = np.flatnonzero(lungs.any(axis=1))
    if rows.size == 0:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.int32), 0, 0, {}
    band = lungs[rows[0]:rows[-1] + 1]
    cols = np.flatnonzero(band.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    crop = band[:, box[1]].view(np.uint8)  # a view: OpenCV takes its row stride
    try:  # 16-bit labels: half the memory, faster
        n, labels = cv2.connectedComponents(crop, connectivity=8, ltype=cv2.CV_16U)
    except cv2.error:  # 65535 components or more
        n, labels = cv2.connectedComponents(crop, connectivity=8, ltype=cv2.CV_32S)
    n -= 1  # OpenCV counts the background
    midline = (cols[0] + cols[-1] + 1) / 2.0 if n >= 2 else lungs.shape[1] / 2.0
    split = min(max(int(np.ceil(midline)) - cols[0], 0), crop.shape[1])  # box columns < split: the image left
    straddling = {}
    if 0 < split < crop.shape[1]:  # a component on both sides crosses from column split - 1 to column split
        left, right = labels[:, :split], labels[:, split:]
        for c in np.intersect1d(labels[:, split - 1], labels[:, split]):
            if c:
                straddling[int(c)] = (np.count_nonzero(left == c), np.count_nonzero(right == c))
    return box, labels, n, split, straddling


def _side(on_left: int, on_right: int) -> str:
    """A component's side from its pixels on the image left and right: "R" whole to the patient's right
    (image left), "L" whole to the left, or "cut" at the midline (at least a quarter on each side)."""
    share_left = on_left / max(on_left + on_right, 1)
    return "cut" if 0.25 <= share_left <= 0.75 else "R" if share_left > 0.75 else "L"


def split_lungs(lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Split a lung mask into the patient's right lung (image left) and left lung (image right).

    Each connected component (8-connectivity) goes whole to the side of the midline that holds most of
    it. The midline is the middle of the lungs' horizontal extent when there are two or more
    components, else the image's middle column (one lung alone keeps its side). A single component
    that straddles the midline (at least a quarter of it on each side: lungs merged across the
    mediastinum) is cut at the midline.

    Returns:
        (right lung mask, left lung mask, number of components).
    """
    lungs = np.asarray(lungs, dtype=bool)
    box, labels, n, split, straddling = _lung_components(lungs)
    right, left = np.zeros(lungs.shape, bool), np.zeros(lungs.shape, bool)
    right_box, left_box = right[box], left[box]  # views
    # a component on one side only goes to that side; one on both sides is cut, or goes whole to one side
    right_box[:, :split] = lungs[box][:, :split]
    left_box[:, split:] = lungs[box][:, split:]
    for component, counts in straddling.items():
        side = _side(*counts)
        if side != "cut":
            mask = labels == component
            (right_box if side == "R" else left_box)[mask] = True
            (left_box if side == "R" else right_box)[mask] = False
    return right, left, n


def lung_side_areas(lungs: np.ndarray) -> tuple[int, int, int]:
    """The pixels of :func:`split_lungs`' right and left lung and the number of components, counted
    without drawing the two masks."""
    lungs = np.asarray(lungs, dtype=bool)
    box, _, n, split, straddling = _lung_components(lungs)
    right, left = np.count_nonzero(lungs[box][:, :split]), np.count_nonzero(lungs[box][:, split:])
    for on_left, on_right in straddling.values():  # components on both sides of the midline
        side = _side(on_left, on_right)
        if side == "R":
            right, left = right + on_right, left - on_right
        elif side == "L":
            right, left = right - on_left, left + on_left
    return int(right), int(left), n


def has_ctr(class_names: Sequence[str]) -> bool:
    """True when the classes hold what the cardiothoracic ratio needs: lungs and heart."""
    return {LUNGS, HEART} <= {str(n) for n in class_names}


def horizontal_span(mask: np.ndarray) -> tuple[int, int] | None:
    """Leftmost and rightmost columns of a mask (None if empty)."""
    cols = np.nonzero(np.asarray(mask, dtype=bool).any(axis=0))[0]
    return (int(cols[0]), int(cols[-1])) if cols.size else None


def horizontal_extent(mask: np.ndarray) -> int:
    """Widest horizontal extent of a mask in pixels: its rightmost minus leftmost column, plus one (0 if empty)."""
    span = horizontal_span(mask)
    return span[1] - span[0] + 1 if span else 0


def cardiothoracic_ratio(heart: np.ndarray, lungs: np.ndarray) -> float | None:
    """Widest horizontal heart extent / widest horizontal thoracic extent (the lungs' outer borders).

    Both widths are horizontal bounding extents in pixels, so the ratio needs no pixel spacing.
    None when either mask is empty.
    """
    thorax = horizontal_extent(lungs)
    heart_width = horizontal_extent(heart)
    if thorax == 0 or heart_width == 0:
        return None
    return heart_width / thorax


def measure(masks: np.ndarray, class_names: Sequence[str], spacing: Sequence[float] | None) -> dict:
    """Measures of one segmentation: the results.csv columns after ``spacing_mm`` (see :func:`csv_columns`).

    Args:
        masks: a 2D label map (0 background, i = ``class_names[i]``), or binary masks ``(S, H, W)`` of
            ``class_names[1:]``, which may overlap (the anatomy model's full structures: the lung area
            then includes the parts behind the clavicles).
        class_names: names of the class indices, background first.
        spacing: pixel spacing (rows, columns) in mm, or None.

    Returns:
        the values (None for unknown) and ``qc_flags``, a list of flag names (see :func:`qc_flags`).
    """
    masks = np.asarray(masks)
    if masks.ndim == 2:  # a label map: a mask per class (for the lungs alone, a view rather than a stacked copy)
        masks = (masks == 1)[np.newaxis] if len(class_names) == 2 else \
            np.stack([masks == c for c in range(1, len(class_names))])
    if masks.shape[0] != len(class_names) - 1:
        raise ValueError(f"{masks.shape[0]} masks for the {len(class_names) - 1} classes {list(class_names[1:])}")
    masks = masks.astype(bool, copy=False)  # no copy of the masks of a label map
    image_area = masks.shape[1] * masks.shape[2]
    out: dict = {}
    lungs = heart = None
    if LUNGS in class_names:
        lungs = masks[class_names.index(LUNGS) - 1]
        right, left, n = lung_side_areas(lungs)
        area = int(np.count_nonzero(lungs))
        out.update(
            lung_area_px=area,
            lung_area_cm2=area_cm2(area, spacing),
            right_lung_area_px=right,
            left_lung_area_px=left,
            n_lung_components=n,
        )
    for index, name in enumerate(class_names):
        if index == 0 or name == LUNGS:
            continue
        mask = masks[index - 1]
        if name == HEART:
            heart = mask
        area = int(np.count_nonzero(mask))
        out[f"{name}_area_px"] = area
        out[f"{name}_area_cm2"] = area_cm2(area, spacing)
    if lungs is not None and heart is not None:
        out["cardiothoracic_ratio"] = cardiothoracic_ratio(heart, lungs)
    out["qc_flags"] = qc_flags(out, image_area)
    return out


def qc_flags(measures: dict, image_area_px: int) -> list[str]:
    """Names of the quality-control checks that a label map's measures fail (thresholds in ``QC_LIMITS``).

    - ``lung_components!=2``: not exactly two lung components (missing, merged or fragmented lungs);
    - ``lung_area_fraction_out_of_range``: lung area / image area outside ``QC_LIMITS``;
    - ``right_left_ratio_out_of_range``: right / left lung area outside ``QC_LIMITS`` (or a side empty);
    - ``heart_missing``: a model with a heart class found no heart;
    - ``cardiothoracic_ratio_out_of_range``: CTR outside ``QC_LIMITS``.
    """
    flags = []
    if "lung_area_px" in measures:
        if measures["n_lung_components"] != 2:
            flags.append("lung_components!=2")
        low, high = QC_LIMITS["lung_area_fraction"]
        if not low <= measures["lung_area_px"] / max(image_area_px, 1) <= high:
            flags.append("lung_area_fraction_out_of_range")
        right, left = measures["right_lung_area_px"], measures["left_lung_area_px"]
        low, high = QC_LIMITS["right_left_ratio"]
        if measures["lung_area_px"] and (left == 0 or not low <= right / left <= high):
            flags.append("right_left_ratio_out_of_range")
    if f"{HEART}_area_px" in measures and measures[f"{HEART}_area_px"] == 0:
        flags.append("heart_missing")
    ctr = measures.get("cardiothoracic_ratio")
    low, high = QC_LIMITS["cardiothoracic_ratio"]
    if ctr is not None and not low <= ctr <= high:
        flags.append("cardiothoracic_ratio_out_of_range")
    return flags
