"""Writers of test inputs: DICOM radiographs with real tags (pydicom), and broken files of every kind.

Nothing here is a pytest fixture by itself; tests call these functions with paths in ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
# type-2 attributes (present, may be empty) that de-identified exports often lack altogether
DEIDENTIFIED_REMOVED = ("PatientName", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID",
                        "AccessionNumber", "StudyDate", "StudyTime")


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    bits_stored: int = 8,
    monochrome1: bool = False,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    spacing: tuple[float, float] | None = (0.5, 0.5),
    sop_class: str = "DX",
    compress: str | None = None,
    pixel_data: bool = True,
    study_uid: str | None = None,
    patient_id: str = "CXR-TEST-001",
    deidentified: bool = False,
) -> "Dataset":
    """Write ``pixels`` (rows, columns; stored values, already inverted for MONOCHROME1) as a DICOM file.

    Args:
        bits_stored: 8, 12 or 16; BitsAllocated is 8 for 8 and 16 otherwise. Values must fit.
        monochrome1: PhotometricInterpretation MONOCHROME1 (high values dark) instead of MONOCHROME2.
        rescale: (RescaleSlope, RescaleIntercept), the modality LUT.
        window: (WindowCenter, WindowWidth), the VOI LUT.
        spacing: ImagerPixelSpacing in mm (rows, columns), or None to leave it out.
        sop_class: "DX" (DX For Presentation) or "CR".
        compress: None (explicit VR little endian), "rle" (RLE Lossless, pydicom's own encoder),
            "j2k" (JPEG 2000 Lossless, encoded by pylibjpeg-openjpeg), "jpegls" (JPEG-LS Lossless, encoded by
            pyjpegls) or "jpeg" (JPEG Baseline 8-bit, lossy,
            quality 95, encoded by Pillow and encapsulated; 8-bit pixels only): the common PACS exports.
        pixel_data: False writes every image tag but no PixelData element.
        deidentified: leave out the type-2 attributes that de-identification profiles remove or that
            archive exports often lack (PatientName, PatientBirthDate, PatientSex, ReferringPhysicianName,
            StudyID, AccessionNumber, StudyDate, StudyTime), as many real exports are.

    Returns:
        the dataset as written.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGLSLossless,
        PYDICOM_IMPLEMENTATION_UID,
        RLELossless,
        generate_uid,
    )

    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2D, got {pixels.shape}")
    if int(pixels.min()) < 0 or int(pixels.max()) >= 2**bits_stored:
        raise ValueError(f"pixel values {pixels.min()}..{pixels.max()} do not fit in {bits_stored} bits")
    bits_allocated = 8 if bits_stored <= 8 else 16
    stored = pixels.astype(np.uint8 if bits_allocated == 8 else np.uint16)

    sop_class_uid = {"DX": DX_FOR_PRESENTATION, "CR": CR_IMAGE_STORAGE}[sop_class]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Test^Radiograph"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "A0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = sop_class
    ds.Manufacturer = "cxr_segmentation tests"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet (PA view)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if sop_class == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.BurnedInAnnotation = "NO"
    if deidentified:
        for keyword in DEIDENTIFIED_REMOVED:
            delattr(ds, keyword)
    if spacing is not None:
        ds.ImagerPixelSpacing = [f"{s:g}" for s in spacing]

    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (f"{v:g}" for v in rescale)
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (f"{v:g}" for v in window)

    if pixel_data:
        ds.PixelData = stored.tobytes()
        if compress == "rle":
            ds.compress(RLELossless, encoding_plugin="pydicom")
        elif compress == "j2k":
            ds.compress(JPEG2000Lossless)
        elif compress == "jpegls":
            ds.compress(JPEGLSLossless)
        elif compress == "jpeg":
            import io

            from PIL import Image
            from pydicom.encaps import encapsulate

            if bits_allocated != 8:
                raise ValueError("JPEG Baseline holds 8-bit pixels only")
            buffer = io.BytesIO()
            Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
            ds.PixelData = encapsulate([buffer.getvalue()])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
        elif compress is not None:
            raise ValueError(f"unknown compression {compress!r}")
    ds.save_as(str(path), enforce_file_format=True)
    return ds


def write_broken_files(folder: str | Path, like_png: str | Path, like_dicom_pixels: np.ndarray) -> dict[str, str]:
    """Write the broken inputs of the robustness tests into ``folder``.

    Returns:
        {file name: a fragment of the reason expected in results.csv}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    data = Path(like_png).read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("this is a text file, not an image\n")
    write_dicom(folder / "no_pixels.dcm", like_dicom_pixels, pixel_data=False)
    return {
        "empty.png": "empty",
        "truncated.png": "not a readable image",
        "notes.png": "not a readable image",
        "no_pixels.dcm": "no pixel data",
    }
