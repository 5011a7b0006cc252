"""DICOM SEG of radiographs: de-identified and compressed sources, read back with highdicom's own reader."""

from __future__ import annotations

import copy
import os

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_fixtures import DEIDENTIFIED_REMOVED, write_dicom

ROWS, COLUMNS = 48, 64  # not square: a transposed mask cannot pass
CLASS_NAMES = ["background", "lungs", "heart", "clavicles"]


def make_masks() -> np.ndarray:
    """Three segments, (3, ROWS, COLUMNS) bool: lungs and heart overlap, clavicles empty, none symmetric."""
    masks = np.zeros((3, ROWS, COLUMNS), bool)
    masks[0, 5:40, 3:30] = True
    masks[0, 10:20, 40:60] = True
    masks[1, 25:45, 20:35] = True
    masks[1, 0, 0] = True  # a corner pixel catches flips
    return masks


def write_source(tmp_path, name="src.dcm", **kwargs):
    kwargs = {"bits_stored": 12, "deidentified": True, **kwargs}
    pixels = np.random.default_rng(1).integers(0, 2 ** kwargs["bits_stored"], (ROWS, COLUMNS))
    path = tmp_path / name
    write_dicom(path, pixels, **kwargs)
    return path, pixels


def read_back(seg, tmp_path, source_uid: str) -> tuple:
    """Save the SEG, read it with highdicom.seg.segread; (the SEG read back, its masks (S, rows, columns))."""
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_instance(
        [source_uid], segment_numbers=list(range(1, len(CLASS_NAMES))), combine_segments=False
    )
    return back, np.moveaxis(pixels[0], -1, 0)


def assert_round_trip(seg, tmp_path, source_uid: str, masks: np.ndarray):
    back, pixels = read_back(seg, tmp_path, source_uid)
    assert back.number_of_segments == len(CLASS_NAMES) - 1
    assert [s.SegmentLabel for s in back.SegmentSequence] == CLASS_NAMES[1:]
    assert back.SegmentationType == "BINARY"
    assert int(back.NumberOfFrames) == len(CLASS_NAMES) - 1  # the empty segment is kept
    assert pixels.shape == masks.shape
    for number, (got, want) in enumerate(zip(pixels, masks.astype(np.uint8)), start=1):
        np.testing.assert_array_equal(got, want, err_msg=f"segment {number}")
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source_uid
    return back


@pytest.mark.parametrize("sop_class", ["DX", "CR"])
def test_deidentified_source_gives_a_seg_that_reads_back(tmp_path, sop_class):
    from scripts.dicom_seg import make_dicom_seg

    path, _ = write_source(tmp_path, sop_class=sop_class)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    assert not any(keyword in source for keyword in DEIDENTIFIED_REMOVED)
    masks = make_masks()
    seg = make_dicom_seg(path, masks, CLASS_NAMES, "1.2.3")
    back = assert_round_trip(seg, tmp_path, source.SOPInstanceUID, masks)
    for keyword in DEIDENTIFIED_REMOVED:  # type 2: present and empty
        assert keyword in back and back[keyword].value in ("", None), keyword
    assert back.PatientID == source.PatientID
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID and back.SeriesNumber == 901
    assert back.SegmentsOverlap == "YES"


def _encoder_available(compress: str) -> bool:
    from pydicom.pixels.encoders import JPEG2000LosslessEncoder, JPEGLSLosslessEncoder

    return {"rle": True, "j2k": JPEG2000LosslessEncoder.is_available,
            "jpegls": JPEGLSLosslessEncoder.is_available}[compress]


@pytest.mark.parametrize("compress, bits_stored, monochrome1", [
    ("rle", 12, True), ("j2k", 16, True), ("j2k", 12, False), ("jpegls", 16, True), ("jpegls", 12, False),
])
def test_compressed_sources(tmp_path, compress, bits_stored, monochrome1):
    from scripts.dicom_seg import make_dicom_seg

    if not _encoder_available(compress):  # the test extra installs them all: CI must not skip
        message = f"no {compress} encoder installed (pip install -e '.[test]')"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    path, pixels = write_source(tmp_path, compress=compress, bits_stored=bits_stored, monochrome1=monochrome1,
                                sop_class="CR" if compress == "rle" else "DX")
    source = pydicom.dcmread(path)
    assert source.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(source.pixel_array, pixels)  # lossless, and the plugins decode it
    masks = make_masks()
    back = assert_round_trip(make_dicom_seg(path, masks, CLASS_NAMES), tmp_path, source.SOPInstanceUID, masks)
    # the SEG's own pixels are plain bits: not inverted for a MONOCHROME1 source, not compressed
    assert back.PhotometricInterpretation == "MONOCHROME2"
    assert not back.file_meta.TransferSyntaxUID.is_compressed


def test_path_header_and_full_dataset_give_the_same_seg(tmp_path):
    from scripts.dicom_seg import make_dicom_seg

    path, _ = write_source(tmp_path, monochrome1=True)
    masks = make_masks()
    header = pydicom.dcmread(path, stop_before_pixels=True)
    full = pydicom.dcmread(path)
    segs = [make_dicom_seg(source, masks, CLASS_NAMES) for source in (path, str(path), header, full)]
    for seg in segs:
        back = assert_round_trip(seg, tmp_path, header.SOPInstanceUID, masks)
        assert back.StudyInstanceUID == header.StudyInstanceUID
    assert len({seg.SOPInstanceUID for seg in segs}) == len(segs)  # a new instance each time


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_the_callers_dataset_is_not_modified(tmp_path):
    from scripts.dicom_seg import make_dicom_seg

    path, _ = write_source(tmp_path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    header.PatientSex = "U"  # not a DICOM value: highdicom rejects it, so the SEG leaves it empty
    header.StudyDate = "2024-01-31"  # not DA either
    before = copy.deepcopy(header)
    seg = make_dicom_seg(header, make_masks(), CLASS_NAMES)
    assert seg.PatientSex in ("", None) and seg.StudyDate in ("", None)
    seg.PatientID = "changed in the SEG"
    seg.ContentCreatorName = "someone"
    assert header == before
    assert header.PatientSex == "U" and header.StudyDate == "2024-01-31"
    assert header.PatientID == "CXR-TEST-001"
    assert not any(keyword in header for keyword in DEIDENTIFIED_REMOVED if keyword not in ("PatientSex", "StudyDate"))


def test_pixel_spacing_without_slice_thickness_reads_back(tmp_path):
    """Projection radiographs have Pixel Spacing but no Slice Thickness; highdicom's reader needs one."""
    from scripts.dicom_seg import make_dicom_seg

    path, _ = write_source(tmp_path, sop_class="CR", deidentified=False)
    header = pydicom.dcmread(path)
    header.PixelSpacing = ["0.143", "0.15"]
    header.save_as(path, enforce_file_format=True)
    assert "SliceThickness" not in header
    masks = make_masks()
    back = assert_round_trip(make_dicom_seg(path, masks, CLASS_NAMES), tmp_path, header.SOPInstanceUID, masks)
    measures = back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.143, 0.15]
    assert float(measures.SliceThickness) == 1.0  # highdicom's nominal thickness of a single plane

    header.SliceThickness = "2.5"  # a source's own thickness is kept
    back = assert_round_trip(make_dicom_seg(header, masks, CLASS_NAMES), tmp_path, header.SOPInstanceUID, masks)
    assert float(back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 2.5


def test_imager_pixel_spacing_only_gives_no_pixel_measures(tmp_path):
    """A DX's Imager Pixel Spacing is at the detector, not in the patient: not copied as Pixel Spacing."""
    from scripts.dicom_seg import make_dicom_seg

    path, _ = write_source(tmp_path, spacing=(0.2, 0.2))
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert "ImagerPixelSpacing" in header and "PixelSpacing" not in header
    masks = make_masks()
    back = assert_round_trip(make_dicom_seg(header, masks, CLASS_NAMES), tmp_path, header.SOPInstanceUID, masks)
    assert "PixelMeasuresSequence" not in back.SharedFunctionalGroupsSequence[0]


def test_label_map_and_uint8_masks(tmp_path):
    from scripts.dicom_seg import make_dicom_seg

    path, _ = write_source(tmp_path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    labels = np.zeros((ROWS, COLUMNS), np.uint8)
    labels[5:40, 3:30] = 1
    labels[25:45, 20:35] = 2  # label maps cannot overlap
    want = np.stack([labels == c for c in range(1, len(CLASS_NAMES))])
    assert_round_trip(make_dicom_seg(header, labels, CLASS_NAMES), tmp_path, header.SOPInstanceUID, want)
    masks = make_masks()
    assert_round_trip(make_dicom_seg(header, masks.astype(np.uint8), CLASS_NAMES), tmp_path,
                      header.SOPInstanceUID, masks)


def test_shape_mismatch_raises_a_clear_value_error(tmp_path):
    from scripts.dicom_seg import make_dicom_seg

    path, _ = write_source(tmp_path)
    masks = make_masks()
    with pytest.raises(ValueError, match=r"do not match 3 segments of the source's 48x64 pixels"):
        make_dicom_seg(path, np.swapaxes(masks, 1, 2), CLASS_NAMES)  # transposed
    with pytest.raises(ValueError, match=r"masks \(2, 48, 64\) do not match 3 segments"):
        make_dicom_seg(path, masks[:2], CLASS_NAMES)


def test_source_without_a_required_attribute_raises_value_error(tmp_path):
    from scripts.dicom_seg import make_dicom_seg

    path, _ = write_source(tmp_path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    del header.StudyInstanceUID
    with pytest.raises(ValueError, match="lacks StudyInstanceUID"):
        make_dicom_seg(header, make_masks(), CLASS_NAMES)
