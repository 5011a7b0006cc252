"""DICOM Segmentation objects (highdicom) for the label maps of DICOM radiographs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def make_dicom_seg(
    source_path: str,
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
    has ``len(class_names) - 1`` segments.

    Args:
        source_path: the DICOM radiograph.
        masks: binary masks ``(S, rows, columns)``, S = ``len(class_names) - 1``, or a 2D label map.

    Raises:
        ValueError: the masks' shape differs from the source image, or the source lacks a tag
            highdicom needs (the message says which).
    """
    import highdicom as hd
    import pydicom

    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = np.stack([masks == c for c in range(1, len(class_names))])
    if masks.shape != (len(class_names) - 1, int(source.Rows), int(source.Columns)):
        raise ValueError(f"masks {masks.shape} do not match {len(class_names) - 1} segments of the source's "
                         f"{source.Rows}x{source.Columns} pixels")
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=np.moveaxis(masks.astype(np.uint8), 0, -1)[None],  # (1 frame, rows, columns, segments)
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
        omit_empty_frames=False,
    )
