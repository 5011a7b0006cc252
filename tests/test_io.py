"""Reading radiographs: PNG (8/16-bit, RGB), DICOM, NIfTI, and clear errors for bad files."""

import numpy as np
import pytest
from PIL import Image

from scripts.io import RadiographReadError, RadiographReader, image_size, read_radiograph


def _gradient(rows=40, cols=60):
    return np.add.outer(np.arange(rows), np.arange(cols) * 2).astype(np.uint16)


def test_png_8bit_keeps_rows_and_columns(tmp_path):
    pixels = (_gradient() % 256).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    array, meta = read_radiograph(tmp_path / "a.png")
    assert array.shape == (40, 60)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, pixels)
    assert image_size(tmp_path / "a.png") == (40, 60)


def test_png_16bit_keeps_full_range(tmp_path):
    pixels = (_gradient() * 300).astype(np.uint16)  # values above 255
    Image.fromarray(pixels).save(tmp_path / "a16.png")
    array, _ = read_radiograph(tmp_path / "a16.png")
    assert array.max() > 255
    np.testing.assert_array_equal(array, pixels)


def test_rgb_jpeg_is_converted_to_gray(tmp_path):
    gray = (_gradient() % 256).astype(np.uint8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "a.jpg", quality=100)
    array, _ = read_radiograph(tmp_path / "a.jpg")
    assert array.shape == (40, 60)
    assert np.abs(array - gray).max() <= 3  # JPEG rounding only


def test_nifti_2d_transposed_to_rows_columns(tmp_path):
    import nibabel as nib

    pixels = _gradient().astype(np.float32)
    nib.save(nib.Nifti1Image(pixels.T, np.diag([0.5, 0.25, 1, 1])), tmp_path / "a.nii.gz")
    array, meta = read_radiograph(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(array, pixels)
    assert meta["spacing"] == (0.25, 0.5)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"this is not an image", "not a readable image"), (None, "no such file")],
)
def test_bad_files_are_named(tmp_path, content, reason):
    path = tmp_path / "broken.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RadiographReadError, match=reason) as info:
        read_radiograph(path)
    assert str(path) in str(info.value)


def test_truncated_png_is_named(tmp_path):
    Image.fromarray((_gradient(200, 200) % 256).astype(np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(RadiographReadError, match="cut.png"):
        read_radiograph(tmp_path / "cut.png")


def test_monai_loader_with_reader_keeps_orientation_and_spacing(tmp_path):
    from monai.transforms import LoadImage

    pixels = (_gradient() % 256).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    img = LoadImage(reader=RadiographReader, image_only=True)(str(tmp_path / "a.png"))
    assert tuple(img.shape) == (40, 60)
    np.testing.assert_array_equal(img.numpy(), pixels)
    assert img.meta["spacing_known"] is False


def test_load_radiographd_does_not_fall_back_to_other_readers(tmp_path):
    """A 3D NIfTI is no radiograph: MONAI's NibabelReader could read it, LoadRadiographd must refuse it."""
    import nibabel as nib
    from monai.transforms import LoadImaged

    from scripts.transforms import LoadRadiographd

    path = str(tmp_path / "volume.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), path)
    assert LoadImaged("image", reader=RadiographReader, image_only=True)({"image": path})["image"].ndim == 3
    with pytest.raises(Exception) as info:
        LoadRadiographd("image")({"image": path})
    assert "expected a 2D NIfTI image" in str(info.value) and "volume.nii.gz" in str(info.value)
