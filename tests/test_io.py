"""Reading radiographs: PNG (8/16-bit, RGB), DICOM, NIfTI, and clear errors for bad files."""

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_fixtures import write_dicom
from scripts.io import RadiographReadError, RadiographReader, image_size, is_dicom, read_radiograph


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


# --- DICOM: the modality LUT, the VOI LUT or window, MONOCHROME1, spacing (fixtures written with pydicom) ---


def _ramp12():
    return (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # every 12-bit value range, no two rows alike


def test_dicom_modality_lut_is_applied(tmp_path):
    stored = _ramp12()
    write_dicom(tmp_path / "a.dcm", stored, bits_stored=12, rescale=(2.0, -50.0))
    array, meta = read_radiograph(tmp_path / "a.dcm")
    np.testing.assert_array_equal(array, stored.astype(np.float32) * 2 - 50)
    assert meta["format"] == "dicom"


def test_dicom_window_clips_outside_and_keeps_order_inside(tmp_path):
    stored = _ramp12()
    # modality values 2v - 50 in [-50, 8140]; the window keeps [2000, 4000]
    write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, rescale=(2.0, -50.0), window=(3000.0, 2000.0))
    array, _ = read_radiograph(tmp_path / "w.dcm")
    values = stored.astype(np.float64) * 2 - 50
    below, above, inside = values <= 1999, values >= 4001, (values > 2001) & (values < 3999)
    assert np.unique(array[below]).size == 1 and np.unique(array[above]).size == 1
    assert array[below][0] < array[inside].min() <= array[inside].max() < array[above][0]
    order = np.argsort(values[inside])
    assert np.all(np.diff(array[inside][order]) > 0)  # linear inside the window: no two values merged


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    """A VOI LUT Sequence (here an inverting table) takes the place of the window."""
    stored = _ramp12()
    write_dicom(tmp_path / "lut.dcm", stored, bits_stored=12)
    ds = pydicom.dcmread(tmp_path / "lut.dcm")
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (4095 - np.arange(4096, dtype="<u2")).tobytes()  # OW: 16-bit little-endian words
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "lut.dcm")
    array, _ = read_radiograph(tmp_path / "lut.dcm")
    np.testing.assert_array_equal(array, 4095 - stored.astype(np.float32))


def test_dicom_monochrome1_reads_like_the_monochrome2_image(tmp_path):
    pixels = (_gradient() * 255 // _gradient().max()).astype(np.uint8)  # 0..255: the inversion is exact
    write_dicom(tmp_path / "m2.dcm", pixels)
    write_dicom(tmp_path / "m1.dcm", 255 - pixels, monochrome1=True, sop_class="CR")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "m1.dcm")[0], read_radiograph(tmp_path / "m2.dcm")[0])


def test_dicom_spacing_pixel_spacing_first_then_imager_pixel_spacing(tmp_path):
    pixels = (_gradient() % 256).astype(np.uint8)
    write_dicom(tmp_path / "imager.dcm", pixels, spacing=(0.2, 0.15))
    assert read_radiograph(tmp_path / "imager.dcm")[1]["spacing"] == (0.2, 0.15)
    ds = pydicom.dcmread(tmp_path / "imager.dcm")
    ds.PixelSpacing = ["0.18", "0.14"]  # calibrated at the patient: preferred over the detector pitch
    ds.save_as(tmp_path / "both.dcm")
    assert read_radiograph(tmp_path / "both.dcm")[1]["spacing"] == (0.18, 0.14)
    write_dicom(tmp_path / "none.dcm", pixels, spacing=None)
    assert read_radiograph(tmp_path / "none.dcm")[1]["spacing"] is None


def test_dicom_recognised_by_content_and_without_pixels_named(tmp_path):
    pixels = (_gradient() % 256).astype(np.uint8)
    write_dicom(tmp_path / "IM0001", pixels)
    assert is_dicom(tmp_path / "IM0001") and not is_dicom(tmp_path / "IM0001.txt")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "IM0001")[0], pixels)
    write_dicom(tmp_path / "nopix.dcm", pixels, pixel_data=False)
    with pytest.raises(RadiographReadError, match="no pixel data") as info:
        read_radiograph(tmp_path / "nopix.dcm")
    assert "nopix.dcm" in str(info.value)


def test_dicom_jpeg_baseline_is_decoded(tmp_path):
    """JPEG Baseline (1.2.840.10008.1.2.4.50), the usual lossy PACS export, decodes to the pixels within JPEG's loss."""
    pixels = (_gradient(256, 256) % 256).astype(np.uint8)
    write_dicom(tmp_path / "jpeg.dcm", pixels, compress="jpeg")
    assert pydicom.dcmread(tmp_path / "jpeg.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    array, _ = read_radiograph(tmp_path / "jpeg.dcm")
    assert array.shape == (256, 256)
    assert np.abs(array - pixels).mean() < 2.0
