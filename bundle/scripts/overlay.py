"""Overlays of folder inference: the radiograph with each structure outlined and a legend band below."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .measures import HEART, LUNGS, has_ctr, horizontal_span

# RGB colours of the overlay; other classes take PALETTE colours in order
CLASS_COLOURS = {"lungs": (40, 220, 90), "heart": (235, 60, 60), "clavicles": (255, 200, 0)}
PALETTE = [(70, 150, 255), (220, 80, 220), (0, 220, 220), (255, 140, 0)]


def class_colours(class_names: Sequence[str]) -> dict[int, tuple[int, int, int]]:
    colours, spare = {}, iter(PALETTE * 4)
    for index, name in enumerate(class_names[1:], start=1):
        colours[index] = CLASS_COLOURS.get(name, None) or next(spare)
    return colours


def display_image(image: np.ndarray) -> np.ndarray:
    """8-bit grey display of a radiograph: the 0.5-99.5 percentile range stretched to 0-255."""
    image = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(image[::2, ::2], (0.5, 99.5))  # every 4th pixel is plenty for display
    scaled = (image - low) / max(float(high - low), 1e-6)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


_LEVELS = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)  # every uint8 level, RGB


def make_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    class_names: Sequence[str],
    legend: Sequence[tuple],
    min_width: int = 512,
    max_width: int = 1024,
) -> np.ndarray:
    """RGB overlay: the radiograph, each class filled translucently and outlined, and a legend band below.

    With heart and lungs among the classes, two calipers show what the cardiothoracic ratio measures:
    the heart's widest horizontal extent (drawn at the heart's middle row) and the thorax's (the lungs'
    outer borders, drawn below the heart).

    Args:
        image: the radiograph: an 8-bit display copy (used as it is), or any range (stretched by
            :func:`display_image`).
        masks: binary masks ``(S, H, W)`` of ``class_names[1:]`` at the same size (they may overlap).
        legend: lines of the legend band, each ``(text, RGB colour or None)``; a colour draws a swatch.
        min_width: images narrower than this are enlarged by an integer factor, so that outlines
            and legend stay legible (the overlay is for viewing; the mask keeps the native size).
        max_width: images wider than this are reduced to this width: a 3000 px radiograph gives a
            screen-sized overlay, about 9x faster to draw and write than at full size.
    """
    import cv2

    grey = image if np.asarray(image).dtype == np.uint8 else display_image(image)
    masks = [np.asarray(m, dtype=np.uint8) for m in masks]
    width, height = grey.shape[1], grey.shape[0]
    if width < min_width:
        factor = math.ceil(min_width / width)
        size = (width * factor, height * factor)
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_LINEAR)
        masks = [cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in masks]
    elif width > max_width:
        size = (max_width, max(1, round(height * max_width / width)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        masks = [cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in masks]
    picture = cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_GRAY2RGB)
    rows, columns = grey.shape
    thickness = max(1, round(min(rows, columns) / 300))
    outlines = []
    for mask, colour in zip(masks, class_colours(class_names).values()):
        mask = (mask > 0).astype(np.uint8)
        if not mask.any():
            continue
        # fill: a quarter of the class colour over the radiograph, inside the mask only. The blend of a pixel
        # depends on its level and channel alone, so it is a lookup table (OpenCV's uint8 arithmetic on the 256
        # levels): the same pixels as blending the whole picture, 6x faster
        blend = cv2.add(cv2.multiply(_LEVELS, (0.75, 0.75, 0.75, 0)), tuple(0.25 * c for c in colour) + (0,))
        cv2.copyTo(cv2.LUT(picture, blend), mask, picture)
        outlines.append((cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)[0], colour))
    for contours, colour in outlines:  # outlines over every fill
        cv2.drawContours(picture, contours, -1, colour, thickness, cv2.LINE_AA)
    if has_ctr(class_names):
        names, colours = [str(n) for n in class_names], class_colours(class_names)
        heart, lungs = names.index(HEART), names.index(LUNGS)
        _draw_ctr_calipers(picture, masks[heart - 1], masks[lungs - 1], colours[heart], colours[lungs], thickness)

    # legend band under the image, so that no anatomy is hidden; the font shrinks to fit the width
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, float(np.clip(columns / 1300, 0.45, 2.0))
    weight = max(1, round(scale * 1.5))
    text_height = cv2.getTextSize("Hg", font, scale, weight)[0][1]
    swatch, pad = text_height + 2, max(4, text_height // 2)
    widest = max((cv2.getTextSize(t, font, scale, weight)[0][0] + (swatch + pad if c else 0) for t, c in legend),
                 default=0)
    if widest > columns - 2 * pad:
        scale *= (columns - 2 * pad) / widest
        text_height = cv2.getTextSize("Hg", font, scale, weight)[0][1]
        swatch, pad = text_height + 2, max(3, text_height // 2)
    line_height = swatch + pad
    band = np.full((pad + line_height * len(legend), columns, 3), 24, dtype=np.uint8)
    for i, (text, colour) in enumerate(legend):
        y, x = pad + i * line_height, pad
        if colour is not None:
            cv2.rectangle(band, (x, y), (x + swatch, y + swatch), tuple(int(c) for c in colour), -1)
            x += swatch + pad
        cv2.putText(band, text, (x, y + swatch - 2), font, scale, (235, 235, 235), weight, cv2.LINE_AA)
    return np.concatenate([picture, band], axis=0)


def render_overlay(
    display: np.ndarray,
    fields: np.ndarray,
    rule: str,
    class_names: Sequence[str],
    legend: Sequence[tuple],
    min_width: int = 512,
) -> np.ndarray:
    """The overlay of one study from its 8-bit display copy and the decision fields of post-processing.

    The masks are decided at the overlay's own size from the fields (see
    :func:`scripts.postprocessing.decide_at_size`), so nothing at the native size is resized or redrawn;
    a display copy narrower than ``min_width`` is enlarged by an integer factor first.
    """
    import cv2

    from .postprocessing import decide_at_size

    rows, columns = display.shape
    if columns < min_width:
        factor = math.ceil(min_width / columns)
        display = cv2.resize(display, (columns * factor, rows * factor), interpolation=cv2.INTER_LINEAR)
    masks = decide_at_size(fields, rule, display.shape)
    return make_overlay(display, masks, class_names, legend, min_width=min_width)


def _draw_ctr_calipers(picture: np.ndarray, heart: np.ndarray, lungs: np.ndarray, heart_colour: Sequence[int],
                       lung_colour: Sequence[int], thickness: int) -> None:
    """Draw the heart and thorax widths of the cardiothoracic ratio as horizontal calipers (in place)."""
    import cv2

    heart_span, thorax_span = horizontal_span(heart), horizontal_span(lungs)
    if heart_span is None or thorax_span is None:
        return
    heart_rows = np.nonzero(np.asarray(heart).any(axis=1))[0]
    lung_rows = np.nonzero(np.asarray(lungs).any(axis=1))[0]
    tick = 3 * thickness + 4
    heart_row = int((heart_rows[0] + heart_rows[-1]) // 2)
    thorax_row = int(min(heart_rows[-1] + 2 * tick, lung_rows[-1]))
    for row, (left, right), colour in ((heart_row, heart_span, heart_colour), (thorax_row, thorax_span, lung_colour)):
        colour = tuple(int(c) for c in colour)
        cv2.line(picture, (left, row), (right, row), colour, thickness, cv2.LINE_AA)
        for x in (left, right):
            cv2.line(picture, (x, row - tick), (x, row + tick), colour, thickness, cv2.LINE_AA)


def legend_lines(class_names: Sequence[str], measures: dict) -> list[tuple]:
    colours = class_colours(class_names)
    lines = []
    for index, name in enumerate(class_names[1:], start=1):
        key = "lung" if name == "lungs" else name
        px, cm2 = measures.get(f"{key}_area_px"), measures.get(f"{key}_area_cm2")
        text = f"{name} {cm2:.1f} cm2" if cm2 is not None else (f"{name} {px} px" if px is not None else name)
        if name == "lungs" and "right_lung_area_px" in measures:
            right, left = measures["right_lung_area_px"], measures["left_lung_area_px"]
            if cm2 is not None and px:
                right, left = f"{cm2 * right / px:.1f}", f"{cm2 * left / px:.1f}"
            text += f" (patient R {right} / L {left})"
        lines.append((text, colours[index]))
    if measures.get("cardiothoracic_ratio") is not None:
        ctr = measures["cardiothoracic_ratio"]
        lines.append((f"cardiothoracic ratio {ctr:.2f} (calipers: heart width / thorax width)", None))
    if measures.get("qc_flags"):
        score = measures.get("qc_score")
        label = f"QC {score:.2f}, flagged: " if score is not None else "QC, flagged: "
        lines.append((label + ", ".join(measures["qc_flags"]), (255, 80, 80)))  # a red swatch
    lines.append(("automatic segmentation, research use only", None))
    return lines
