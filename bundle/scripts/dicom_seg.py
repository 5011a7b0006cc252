"""DICOM Segmentation objects (highdicom) for the label maps of DICOM radiographs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from os import PathLike

    from pydicom import Dataset

# segment label -> (SNOMED CT code value, meaning) of the segmented property type
PROPERTY_TYPES = {
    "lungs": ("39607008", "Lung"),
    "lung": ("39607008", "Lung"),
    "heart": ("80891009", "Heart"),
    "clavicles": ("51299004", "Clavicle"),
    "clavicle": ("51299004", "Clavicle"),
}
FALLBACK_PROPERTY_TYPE = ("85756007", "Tissue")


def _segment_descriptions(class_names: Sequence[str], algorithm_version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="cxr_segmentation", version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, name in enumerate(class_names[1:], start=1):
        value, meaning = PROPERTY_TYPES.get(name.lower(), FALLBACK_PROPERTY_TYPE)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=hd.sr.CodedConcept(value, "SCT", meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return descriptions


# What hd.seg.Segmentation (highdicom 0.28, seg/sop.py and base.py) reads from the source image.
# Type 1, read as attributes: a source without one cannot be referenced (ValueError).
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns")
# Type 2 (present, may be empty), read as attributes: de-identified exports often lack them; they are added empty.
TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
         "StudyTime", "ReferringPhysicianName")
# highdicom's own default slice thickness for a single plane without one (Image.get_volume_geometry)
NOMINAL_SLICE_THICKNESS = 1.0


def _highdicom_accepts(keyword: str, value) -> bool:
    """Whether highdicom's SOPClass accepts this type-2 value (it parses dates, times and the sex)."""
    import highdicom as hd
    from pydicom.valuerep import DA, TM

    try:
        if value in (None, ""):
            return True
        if keyword == "PatientSex":
            hd.PatientSexValues(value)
        elif keyword in ("PatientBirthDate", "StudyDate"):
            DA(value)
        elif keyword == "StudyTime":
            TM(value)
    except ValueError:
        return False
    return True


def _source_header(source):
    """The source's header (from a path, or a copy of a Dataset) in which every TYPE2 attribute is present."""
    import copy

    import pydicom

    if isinstance(source, pydicom.Dataset):
        # a deep copy without the pixel data: the SEG shares no element with the caller's dataset
        header = copy.deepcopy(pydicom.Dataset({tag: elem for tag, elem in source.items() if tag.group != 0x7FE0}))
    else:
        header = pydicom.dcmread(source, stop_before_pixels=True)
    missing = [keyword for keyword in REQUIRED if keyword not in header]
    if missing:
        raise ValueError(f"the source lacks {', '.join(missing)}, which a DICOM SEG needs")
    for keyword in TYPE2:
        if keyword not in header or not _highdicom_accepts(keyword, header[keyword].value):
            setattr(header, keyword, "")  # type 2: empty is allowed
    return header


def make_dicom_seg(
    source: str | PathLike | Dataset,
    masks: np.ndarray,
    class_names: Sequence[str],
    algorithm_version: str = "unknown",
    series_number: int = 901,
):
    """A BINARY DICOM SEG of the masks of ``class_names[1:]`` on the source image.

    One segment per class except background (segment number = class index; segments may overlap, as
    the anatomy model's clavicles and lungs do), a new series, and the source image referenced by its
    SOP Instance UID. The masks must match the source's Rows and Columns pixel for pixel (they do:
    inference writes them at the native size and orientation). Empty segments are kept, so every SEG
    has ``len(class_names) - 1`` segments. The SEG reads back with ``highdicom.seg.segread``.

    Type-2 attributes the source lacks (de-identified exports) or has in a form highdicom rejects are
    empty in the SEG. A source with Pixel Spacing gets it in the SEG's Pixel Measures, with its Slice
    Thickness or else highdicom's nominal 1 mm for a single plane (highdicom's reader needs one).

    Args:
        source: the DICOM radiograph: a path, or its dataset (the header is enough); never modified.
        masks: binary masks ``(S, rows, columns)`` (nonzero = inside), S = ``len(class_names) - 1``, or a 2D
            label map.

    Raises:
        ValueError: the masks' shape differs from the source image, or the source lacks an attribute
            a SEG needs (the message says which).
    """
    import highdicom as hd

    header = _source_header(source)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = np.stack([masks == c for c in range(1, len(class_names))])
    if masks.shape != (len(class_names) - 1, int(header.Rows), int(header.Columns)):
        raise ValueError(f"masks {masks.shape} do not match {len(class_names) - 1} segments of the source's "
                         f"{header.Rows}x{header.Columns} pixels")
    pixel_measures = None
    if header.get("PixelSpacing"):
        pixel_measures = hd.PixelMeasuresSequence(
            pixel_spacing=header.PixelSpacing,
            slice_thickness=header.get("SliceThickness") or NOMINAL_SLICE_THICKNESS,
        )
    # bool viewed as uint8 (no copy); segments last as highdicom wants, a view whose frames stay contiguous
    pixels = np.moveaxis(masks.astype(bool, copy=False).view(np.uint8), 0, -1)[None]
    return hd.seg.Segmentation(
        source_images=[header],
        pixel_array=pixels,  # (1 frame, rows, columns, segments)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(class_names, algorithm_version),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="cxr_segmentation",
        manufacturer_model_name="cxr_segmentation MONAI bundle",
        software_versions=algorithm_version,
        device_serial_number="none",
        series_description="Chest X-ray segmentation (automatic, research use only)",
        pixel_measures=pixel_measures,
        omit_empty_frames=False,
    )


def warm_up(class_names: Sequence[str], algorithm_version: str = "unknown") -> None:
    """Build and encode one tiny SEG, so that highdicom's and pydicom's first-use work (imports, tables: about
    0.6 s) is done in this process: the writer processes forked from it then start warm."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    source = pydicom.Dataset()
    source.update({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "SOPInstanceUID": generate_uid(),  # DX image
                   "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), "Modality": "DX",
                   "Rows": 8, "Columns": 8})
    seg = make_dicom_seg(source, np.zeros((len(class_names) - 1, 8, 8), np.uint8), class_names, algorithm_version)
    seg.save_as(io.BytesIO(), enforce_file_format=True)
