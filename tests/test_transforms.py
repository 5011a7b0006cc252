"""The bundle's own transforms: CLAHE, percentile scaling and the lung-opacity augmentation."""

import cv2
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from scripts.transforms import CLAHE, CLAHEd, RandLungOpacityd


def _low_contrast(rows=128, cols=128):
    rng = np.random.default_rng(0)
    base = np.add.outer(np.linspace(0.40, 0.45, rows), np.linspace(0, 0.05, cols))
    return (base + rng.normal(0, 0.01, (rows, cols))).astype(np.float32)[None]


def test_clahe_raises_local_contrast_more_with_a_higher_clip_limit():
    r = np.arange(128)
    checker = (r[:, None] // 4 + r[None, :] // 4) % 2 == 1
    image = (0.3 + 0.03 * checker).astype(np.float32)[None]  # faint detail on a dark background

    def contrast(img):
        return img[0][checker].mean() - img[0][~checker].mean()

    low, high = CLAHE(clip_limit=2.0)(image), CLAHE(clip_limit=4.0)(image)
    assert low.shape == image.shape and low.dtype == np.float32
    assert 0.0 <= low.min() and high.max() <= 1.0
    assert contrast(low) > 1.2 * contrast(image)
    assert contrast(high) > 1.1 * contrast(low)


def test_clahe_matches_opencv_on_8bit_input():
    image = _low_contrast()
    quantised = np.rint(image[0] * 255).astype(np.uint8)
    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 8)).apply(quantised) / 255.0
    out = CLAHE(clip_limit=3.0, tile_grid_size=(8, 4))(image)  # ours is (rows, columns)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_clahe_16bit_histogram():
    image = _low_contrast()
    out8 = CLAHE(bins=256)(image)
    out16 = CLAHE(bins=65536)(image)
    assert out16.shape == image.shape and 0.0 <= out16.min() and out16.max() <= 1.0
    assert not np.allclose(out8, out16)  # finer grey levels give a different mapping


def test_clahe_dict_keeps_metatensor_and_other_keys():
    image = MetaTensor(torch.from_numpy(_low_contrast()), meta={"filename_or_obj": "x.png"})
    label = torch.zeros(1, 128, 128)
    out = CLAHEd(keys="image")({"image": image, "label": label})
    assert isinstance(out["image"], MetaTensor)
    assert out["image"].meta["filename_or_obj"] == "x.png"
    assert out["label"] is label


def test_clahe_rejects_other_bins():
    with pytest.raises(ValueError, match="bins"):
        CLAHE(bins=1024)


def test_scale_percentiles_matches_monai_and_keeps_meta():
    from monai.transforms import ScaleIntensityRangePercentiles

    from scripts.transforms import ScalePercentilesd

    rng = np.random.default_rng(1)
    image = MetaTensor(torch.from_numpy(rng.gamma(2.0, 300.0, (1, 64, 80)).astype(np.float32)),
                       meta={"filename_or_obj": "x.dcm"})
    ours = ScalePercentilesd("image", 0.5, 99.5)({"image": image})["image"]
    monai = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(image)
    assert isinstance(ours, MetaTensor) and ours.meta["filename_or_obj"] == "x.dcm"
    assert float(ours.min()) == 0.0 and float(ours.max()) == 1.0
    torch.testing.assert_close(ours.as_tensor(), monai.as_tensor(), atol=1e-5, rtol=0)


def _montgomery_pair(montgomery, stem="MCUCXR_0004_0"):
    image = np.asarray(Image.open(montgomery / "images" / f"{stem}.png"), np.float32)[None] / 255
    label = np.asarray(Image.open(montgomery / "masks" / f"{stem}.png"), np.int64)[None]
    return torch.from_numpy(image), torch.from_numpy(label)


def test_lung_opacity_whitens_part_of_a_lung_and_keeps_the_label(montgomery):
    image, label = _montgomery_pair(montgomery)
    transform = RandLungOpacityd("image", "label", prob=1.0, intensity_range=(0.9, 0.9), opacity_range=(1.0, 1.0))
    lung = label[0].numpy() > 0
    for seed in range(8):
        transform.set_random_state(seed)
        out = transform({"image": image.clone(), "label": label.clone()})
        assert torch.equal(out["label"], label)
        changed = np.abs(out["image"][0].numpy() - image[0].numpy()) > 0.05
        assert changed.sum() > 0.01 * lung.sum()
        # the opacity is centred in the lung field, where it is densest
        transform.set_random_state(seed)
        transform.randomize(None)
        alpha = transform.opacity(lung)
        assert 0.0 <= alpha.min() and alpha.max() <= 1.0
        assert lung[np.unravel_index(np.argmax(alpha), alpha.shape)]
        # it blends toward 0.9: every changed pixel moved toward that value
        before, after = image[0].numpy()[changed], out["image"][0].numpy()[changed]
        assert np.all(np.abs(after - 0.9) < np.abs(before - 0.9))


def test_lung_opacity_is_seeded_and_leaves_images_without_lung_alone(montgomery):
    image, label = _montgomery_pair(montgomery)
    first, second = (RandLungOpacityd("image", "label", prob=1.0) for _ in range(2))
    first.set_random_state(5)
    second.set_random_state(5)
    a = first({"image": image, "label": label})["image"]
    b = second({"image": image, "label": label})["image"]
    assert torch.equal(a, b) and not torch.equal(a, image)

    no_lung = RandLungOpacityd("image", "label", prob=1.0)({"image": image, "label": torch.zeros_like(label)})
    assert torch.equal(no_lung["image"], image)
    never = RandLungOpacityd("image", "label", prob=0.0)({"image": image, "label": label})
    assert torch.equal(never["image"], image)
