"""One study's output files and its results.csv row: what the inference writer's processes run.

:func:`study_record` turns an evaluator item and its post-processed output into a plain record of NumPy
arrays and numbers (small: the decision fields at network size and the display copy, or the native-size
masks when post-processing made them on a GPU), which is cheap to hand to another process.
:class:`OutputFiles` writes a record's files and returns its row; it is picklable and never raises.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from monai.utils import convert_to_numpy

from .files import atomic_write, save_jpeg, save_mask_png, save_png
from .inputs import describe_error
from .io import is_dicom
from .measures import measure
from .overlay import legend_lines, render_overlay
from .postprocessing import decide_at_size, labels_from_structures
from .qc import NOT_MEASURABLE, qc_score


def study_record(item: Mapping, out: Mapping) -> dict:
    """What writing one study needs, as NumPy arrays and plain values (no tensors, nothing at native size
    unless post-processing already decided there, as ``ResizeDecisiond`` does on a GPU)."""
    record = {key: item.get(key) for key in ("path", "rel", "name", "format")}
    record["error"] = str(item.get("error") or "")
    if record["error"]:
        return record
    spacing = [float(s) for s in convert_to_numpy(item["spacing"]).reshape(-1).tolist()]
    display = None
    if "display" in item:
        shown = (int(item["display_rows"]), int(item["display_columns"]))
        display = np.ascontiguousarray(convert_to_numpy(item["display"])[: shown[0], : shown[1]])
    record.update(
        rows=int(item["rows"]),
        columns=int(item["columns"]),
        spacing=None if any(math.isnan(s) for s in spacing) else spacing,
        display=display,
        fields=convert_to_numpy(out.get("fields")),
        rule=out.get("rule"),
        structures=convert_to_numpy(out.get("structures")),
        qc_model_flags=list(out.get("qc_model_flags") or []),
        qc_ratios=dict(out.get("qc_ratios") or {}),
    )
    return record


@dataclass(frozen=True)
class OutputFiles:
    """Writes one study's files under ``output_dir`` and returns its results.csv row.

    ``<name>_seg.png`` (uint8 label map at native size), ``<name>_overlay.jpg`` (or ``.png``, if
    ``write_overlay``) and, for DICOM inputs, ``<name>_seg.dcm`` (if ``write_dicom_seg``). The mask and the
    measures make the row ``ok``; a failure there makes it ``failed`` with the reason. An optional output
    (overlay, SEG) that fails leaves the row ``ok`` and is named, with why, in ``warnings``.
    """

    output_dir: str
    class_names: tuple[str, ...]
    write_overlay: bool = True
    overlay_format: str = "jpg"
    write_dicom_seg: bool = True
    version: str = "unknown"

    def expected(self, record: Mapping, warnings: str = "") -> list[str]:
        """The output files of a finished input, less the optional ones its row says were not written."""
        base = os.path.join(self.output_dir, str(record["name"]))
        files = [base + "_seg.png"]
        if self.write_overlay and "overlay not written" not in warnings:
            files.append(base + "_overlay." + self.overlay_format)
        if self.write_dicom_seg and is_dicom(record["image"]) and "DICOM SEG not written" not in warnings:
            files.append(base + "_seg.dcm")
        return files

    def write(self, record: Mapping) -> dict:
        """Write one study's output files (see :func:`study_record`); returns its row. Never raises."""
        error = record["error"]
        row: dict = {"path": str(record["rel"]), "status": "ok", "error": ""}
        if not error:
            try:
                row.update(self._write(record))
            except Exception as e:  # noqa: BLE001 - a failed output fails this file only
                error = f"writing outputs failed: {describe_error(e)}"
        if error:
            row.update(status="failed", error=error)
        return row

    def _write(self, record: Mapping) -> dict:
        """The mask and the measures (a failure raises), then the optional outputs (a failure is a warning)."""
        rows, columns, spacing = record["rows"], record["columns"], record["spacing"]
        masks = record["structures"]
        if masks is None:  # decided here, at the native size, from the fields (CPU inference)
            masks = decide_at_size(record["fields"], record["rule"], (rows, columns))
        masks = np.asarray(masks).astype(np.uint8, copy=False)
        if masks.shape[1:] != (rows, columns):
            raise ValueError(f"masks {masks.shape[1:]} are not the native size {(rows, columns)}")
        labels = masks[0] if len(masks) == 1 else labels_from_structures(masks)
        measures = measure(masks, self.class_names, spacing)
        flags = record["qc_model_flags"] + measures["qc_flags"]
        if measures.get("cardiothoracic_ratio") is not None and any(f in NOT_MEASURABLE for f in flags):
            measures["cardiothoracic_ratio"] = None  # a CTR of something that is not a plausible chest is no CTR
        measures.update(qc_score=qc_score(record["qc_ratios"], flags), qc_flags=flags)
        base = os.path.join(self.output_dir, str(record["name"]))
        save_mask_png(labels, base + "_seg.png")
        warnings = []
        if self.write_overlay:
            try:
                self._write_overlay(record, measures, base + "_overlay." + self.overlay_format)
            except Exception as e:  # noqa: BLE001 - an optional output: the study keeps its mask and row
                warnings.append(f"overlay not written: {describe_error(e)}")
        if self.write_dicom_seg and str(record.get("format")) == "dicom":
            try:
                from .dicom_seg import make_dicom_seg

                seg = make_dicom_seg(str(record["path"]), masks, self.class_names, self.version)
                atomic_write(base + "_seg.dcm", lambda tmp: seg.save_as(tmp, enforce_file_format=True))
            except Exception as e:  # noqa: BLE001 - as above
                warnings.append(f"DICOM SEG not written: {describe_error(e)}")
        measures["qc_flags"] = ";".join(measures["qc_flags"])
        return {"rows": rows, "columns": columns, "spacing_mm": _spacing_text(spacing),
                "warnings": "; ".join(warnings), "mask": os.path.relpath(base + "_seg.png", self.output_dir),
                **measures}

    def _write_overlay(self, record: Mapping, measures: dict, path: str) -> None:
        """The overlay, drawn on the display copy that came with the study (the file is not read again)."""
        if record.get("display") is None or record.get("fields") is None:
            raise ValueError("no display copy or decision fields (inference.yaml's DisplayCopyd and "
                             "DecideAtNetworkSized make them)")
        picture = render_overlay(record["display"], record["fields"], record["rule"], self.class_names,
                                 legend_lines(self.class_names, measures))
        (save_jpeg if self.overlay_format == "jpg" else save_png)(picture, path)


def _spacing_text(spacing: Sequence[float] | None) -> str:
    if spacing is None:
        return ""
    if abs(spacing[0] - spacing[1]) < 1e-6:
        return f"{spacing[0]:.4g}"
    return f"{spacing[0]:.4g}x{spacing[1]:.4g}"
