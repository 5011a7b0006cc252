"""The lung measures of scripts/measures.py (component count, right/left lung split, QC flags), which label
the lungs' bounding box only and count the pixels of only the components that straddle the midline, against
a straightforward reference: SciPy's 8-connected labelling of the whole image and plain counting."""

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import shared_dataset

LUNGS_ONLY = ["background", "lungs"]
ANATOMY = ["background", "lungs", "heart", "clavicles"]
FULL_SIZE = (2500, 2048)  # rows, columns: a 5-megapixel radiograph


# ---- the reference --------------------------------------------------------------------------------


def reference_split(lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """split_lungs' documented rule on the whole image: each 8-connected component goes whole to the side
    of the midline (middle of the lungs' horizontal extent with 2+ components, else the image's middle)
    that holds most of it, and is cut there when each side holds at least a quarter of it."""
    lungs = np.asarray(lungs, dtype=bool)
    labels, n = ndimage.label(lungs, structure=np.ones((3, 3), int))
    columns = np.flatnonzero(lungs.any(axis=0))
    if n >= 2:
        split = -(-(int(columns[0]) + int(columns[-1]) + 1) // 2)  # ceil of the middle
    else:
        split = -(-lungs.shape[1] // 2)
    on_left = np.bincount(labels[:, :split].ravel(), minlength=n + 1).astype(np.int64)
    on_right = np.bincount(labels[:, split:].ravel(), minlength=n + 1).astype(np.int64)
    total = on_left + on_right
    cut = (4 * on_left >= total) & (4 * on_right >= total)
    whole_right = ~cut & (on_left > on_right)  # the patient's right lung: the image left
    whole_right[0] = cut[0] = False  # the background
    image_left = np.arange(lungs.shape[1]) < split
    right = whole_right[labels] | (cut[labels] & image_left)
    left = lungs & ~right
    return right, left, n


def reference_measure(masks: np.ndarray, class_names: list, spacing) -> dict:
    """measure()'s values, computed the plain way (qc_flags from scripts.measures.qc_flags on them)."""
    from scripts.measures import qc_flags

    masks = np.asarray(masks)
    if masks.ndim == 2:
        structures = [masks == c for c in range(1, len(class_names))]
    else:
        structures = [m != 0 for m in masks]

    def cm2(px):
        return None if spacing is None else float(px) * float(spacing[0]) * float(spacing[1]) / 100.0

    def width(mask):
        columns = np.flatnonzero(mask.any(axis=0))
        return int(columns[-1] - columns[0] + 1) if columns.size else 0

    out: dict = {}
    lungs = structures[class_names.index("lungs") - 1] if "lungs" in class_names else None
    if lungs is not None:
        right, left, n = reference_split(lungs)
        area = int(lungs.sum())
        out.update(lung_area_px=area, lung_area_cm2=cm2(area), right_lung_area_px=int(right.sum()),
                   left_lung_area_px=int(left.sum()), n_lung_components=n)
    for name, mask in zip(class_names[1:], structures):
        if name != "lungs":
            out[f"{name}_area_px"] = int(mask.sum())
            out[f"{name}_area_cm2"] = cm2(int(mask.sum()))
    if lungs is not None and "heart" in class_names:
        heart, thorax = width(structures[class_names.index("heart") - 1]), width(lungs)
        out["cardiothoracic_ratio"] = heart / thorax if heart and thorax else None
    out["qc_flags"] = qc_flags(out, structures[0].size)
    return out


def check(labels: np.ndarray, class_names: list = LUNGS_ONLY, spacing=(0.5, 0.25)) -> dict:
    """measure(), lung_side_areas() and split_lungs() on a label map (or (S, H, W) masks) equal the
    reference: the same values of the same types, the same keys in the same order, the same masks."""
    from scripts.measures import lung_side_areas, measure, split_lungs

    got, want = measure(labels, class_names, spacing), reference_measure(labels, class_names, spacing)
    assert got == want
    assert list(got) == list(want) and [type(v) for v in got.values()] == [type(v) for v in want.values()]
    labels = np.asarray(labels)
    lungs = labels == 1 if labels.ndim == 2 else labels[class_names.index("lungs") - 1]
    right, left, n = split_lungs(lungs)
    ref_right, ref_left, ref_n = reference_split(lungs)
    assert n == ref_n and type(n) is int
    assert right.dtype == left.dtype == bool and right.shape == left.shape == lungs.shape
    assert np.array_equal(right, ref_right) and np.array_equal(left, ref_left)
    sides = lung_side_areas(lungs)
    assert sides == (int(ref_right.sum()), int(ref_left.sum()), ref_n)
    assert all(type(v) is int for v in sides)
    return got


def test_reference_on_hand_made_cases():
    """The reference itself, on cases counted by hand (so that it does not merely agree with the code)."""
    two = np.zeros((10, 12), bool)
    two[2:8, 1:4] = two[2:8, 8:11] = True  # 18 px each side
    assert [m.sum() for m in reference_split(two)[:2]] == [18, 18] and reference_split(two)[2] == 2
    merged = np.zeros((10, 12), bool)
    merged[2:6, 2:10] = True  # one component, cut at the image's middle (column 6)
    right, left, n = reference_split(merged)
    assert (right.sum(), left.sum(), n) == (16, 16, 1) and right[:, :6].sum() == 16
    mostly_right = np.zeros((10, 12), bool)
    mostly_right[2:6, 0:9] = True  # 4 x 9; with the island below, the midline is (0 + 11 + 1) / 2 = 6
    mostly_right[8, 11] = True  # 3/9 of the big one right of the midline: cut
    right, left, n = reference_split(mostly_right)
    assert (right.sum(), left.sum(), n) == (24, 13, 2)
    mostly_right[2:6, 8] = False  # 2/8 right: still cut (a quarter)
    assert reference_split(mostly_right)[0].sum() == 24
    mostly_right[2:6, 7] = False  # 1/7 right: whole to the patient's right
    right, left, n = reference_split(mostly_right)
    assert (right.sum(), left.sum(), n) == (28, 1, 2)


# ---- synthetic cases ------------------------------------------------------------------------------


def _boxes(shape, *boxes, dtype=np.uint8):
    out = np.zeros(shape, dtype)
    for r0, r1, c0, c1 in boxes:
        out[r0:r1, c0:c1] = 1
    return out


@pytest.mark.parametrize("labels", [
    pytest.param(np.zeros((50, 60), np.uint8), id="empty"),
    pytest.param(np.zeros((1, 1), np.uint8), id="empty-1x1"),
    pytest.param(np.ones((1, 1), np.uint8), id="one-pixel"),
    pytest.param(_boxes((50, 60), (10, 40, 5, 25)), id="one-component-image-left"),
    pytest.param(_boxes((50, 60), (10, 40, 35, 55)), id="one-component-image-right"),
    pytest.param(_boxes((50, 60), (10, 40, 20, 40)), id="one-component-centred"),
    pytest.param(_boxes((50, 60), (10, 40, 5, 38)), id="one-component-mostly-left"),
    pytest.param(_boxes((50, 61), (10, 40, 5, 25), (12, 38, 35, 57)), id="two-lungs"),
    pytest.param(_boxes((50, 60), (10, 40, 5, 25), (12, 38, 25, 57)), id="merged-lungs"),
    pytest.param(_boxes((50, 60), (10, 40, 5, 25), (24, 26, 24, 40), (12, 38, 40, 57)), id="bridged-lungs"),
    pytest.param(_boxes((50, 60), (10, 40, 5, 34), (12, 38, 40, 57)), id="right-lung-over-the-midline"),
    pytest.param(_boxes((50, 60), (10, 40, 5, 28), (12, 38, 29, 57)), id="diagonal-neighbours"),
    pytest.param(_boxes((50, 60), (10, 40, 5, 25), (41, 42, 26, 27), (12, 38, 28, 57)), id="diagonal-bridge"),
    pytest.param(_boxes((50, 60), (10, 40, 5, 25), (1, 2, 1, 2), (45, 46, 58, 59), (2, 3, 30, 31),
                        (47, 49, 30, 33), (20, 22, 27, 29)), id="islands"),
    pytest.param(_boxes((50, 60), (0, 50, 0, 20), (0, 1, 0, 60), (30, 50, 45, 60)), id="touching-the-borders"),
    pytest.param(np.ones((50, 60), np.uint8), id="full"),
    pytest.param(_boxes((40, 1), (5, 10, 0, 1), (20, 30, 0, 1)), id="one-column"),
    pytest.param(_boxes((1, 40), (0, 1, 3, 10), (0, 1, 25, 39)), id="one-row"),
    pytest.param(_boxes((60, 60), (10, 50, 10, 50)) - _boxes((60, 60), (20, 40, 20, 40)) +
                 _boxes((60, 60), (28, 32, 28, 32)), id="island-in-a-hole"),
])
def test_measures_equal_the_reference_on_synthetic_masks(labels):
    check(labels)
    check(labels.astype(bool), spacing=None)
    check(labels[None] * np.uint8(255), ["background", "lungs"])  # (S, H, W) masks, nonzero is the structure


def test_views_and_degenerate_shapes():
    from scripts.measures import lung_side_areas, measure, split_lungs

    field = cv2.GaussianBlur(np.random.default_rng(0).normal(size=(120, 90)), (0, 0), 4) > 0.05
    for view in (field.T, field[:, ::-1], field[::-1], field[::2, ::3], np.asfortranarray(field)):
        check(view.astype(np.uint8))
        right, left, n = split_lungs(view)
        ref_right, ref_left, ref_n = reference_split(view)
        assert n == ref_n and np.array_equal(right, ref_right) and np.array_equal(left, ref_left)
    for shape in ((0, 5), (5, 0)):  # no pixels: nothing to label
        assert lung_side_areas(np.zeros(shape, bool)) == (0, 0, 0)
        assert [m.shape for m in split_lungs(np.zeros(shape, bool))[:2]] == [shape, shape]
        assert measure(np.zeros(shape, np.uint8), LUNGS_ONLY, None)["n_lung_components"] == 0


def test_one_lung_keeps_its_side():
    from scripts.measures import measure

    one = _boxes((100, 100), (20, 80, 60, 90))
    assert (check(one)["right_lung_area_px"], measure(one, LUNGS_ONLY, None)["left_lung_area_px"]) == (0, 1800)
    one = _boxes((100, 100), (20, 80, 5, 35))
    assert check(one)["left_lung_area_px"] == 0


def test_anatomy_label_maps_and_structures():
    labels = _boxes((100, 120), (20, 80, 10, 50), (25, 75, 70, 110))
    labels[50:85, 40:80] = 2  # the heart
    labels[5:10, 20:100] = 3  # the clavicles
    check(labels, ANATOMY)
    structures = np.stack([labels == 1, labels == 2, labels == 3]).astype(np.uint8)
    structures[0, 50:60, 40:50] = 1  # overlapping structures: the lungs behind the heart
    check(structures, ANATOMY)
    check(np.zeros((30, 40), np.uint8), ANATOMY, None)


def test_many_components_and_wide_label_types():
    """More components than 16-bit labels hold (the code falls back to 32-bit ones)."""
    dots = np.zeros((600, 500), np.uint8)
    dots[::2, ::2] = 1  # 75,000 one-pixel components
    assert check(dots, spacing=None)["n_lung_components"] == 300 * 250
    check(dots.astype(np.int64) * 1, spacing=None)  # label maps of other integer types


@pytest.mark.parametrize("seed", range(40))
def test_measures_equal_the_reference_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        shape = tuple(int(s) for s in rng.integers(1, 90, size=2))
        if rng.random() < 0.5:  # blobs of various sizes
            field = cv2.GaussianBlur(rng.normal(size=shape), (0, 0), float(rng.uniform(0.5, 6)))
            lungs = field > rng.uniform(-0.1, 0.3) * field.std()
        else:  # salt
            lungs = rng.random(shape) < rng.uniform(0.01, 0.7)
        labels = lungs.astype(np.uint8)
        labels[(rng.random(shape) < 0.05) & lungs] = 2  # a heart class over a few lung pixels
        check(labels, ANATOMY[:3], spacing=tuple(rng.uniform(0.1, 1, size=2)))
        check(lungs)


# ---- full-size masks from the real reference masks -----------------------------------------------


def _real_masks(count: int = 2) -> list[tuple[str, np.ndarray]]:
    """The first ``count`` masks of each data set in ../shared/data (fails under CI when it is missing)."""
    out = []
    for dataset in ("montgomery", "shenzhen", "jsrt_scr"):
        for path in sorted((shared_dataset(dataset) / "masks").glob("*.png"))[:count]:
            out.append((f"{dataset}/{path.stem}", np.asarray(Image.open(path))))
    return out


def _full_size(labels: np.ndarray) -> np.ndarray:
    return cv2.resize(labels, FULL_SIZE[::-1], interpolation=cv2.INTER_NEAREST)


def test_measures_equal_the_reference_on_full_size_real_masks():
    for name, small in _real_masks():
        labels = _full_size(small)
        names = ANATOMY if small.max() > 1 else LUNGS_ONLY
        columns = np.flatnonzero((labels == 1).any(axis=0))
        middle = (columns[0] + columns[-1]) // 2
        merged = labels.copy()  # a bridge across the mediastinum: one component over the midline
        merged[1200:1260, columns[0]:columns[-1] + 1] = 1
        low = labels.copy()  # a thin bridge off centre: the component is cut, or goes whole to one side
        low[2000:2003, middle - 200:middle + 400] = 1
        one = labels.copy()
        one[:, :middle][one[:, :middle] == 1] = 0  # the patient's right lung missing
        islands = labels.copy()  # small islands, some on the image's borders
        islands[5:9, 5:9] = islands[2490:2500, 2040:2048] = islands[100, 1024] = islands[2400:2410, 700:1300] = 1
        for case in (labels, merged, low, one, islands):
            check(case, names, (0.143, 0.143))
        check(labels[None] == 1, LUNGS_ONLY, None)  # (1, H, W) boolean masks
