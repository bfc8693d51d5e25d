"""PipelineResult heatmaps -> RGB Secondary Captures, for viewers without Parametric Map support.

Each heatmap is drawn over one source slice (the key slice, else the slice of its maximum) as a colour
overlay where it is above a threshold, with a colour bar naming the map and its value range, and the
"AI result" warning burned in. The colours follow one range for the whole map, so two renderings of it
compare.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Heatmap, Manifest, PipelineResult
from dicom_ai_node.results.heatmaps import checked_heatmaps, display_range, heatmap_slice_index
from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.sc import (
    WHITE,
    draw_label,
    draw_warning,
    fitting_size,
    font,
    secondary_capture,
    shown_gray,
    text_size_for,
)

HEATMAP_SC_SERIES_NUMBER = 9005
THRESHOLD = 0.3  # fraction of the value range below which the map is not drawn, so the anatomy stays visible
ALPHA = 0.5
UNDRAWN = (96, 96, 96)  # the colour bar's part below THRESHOLD
# Jet-like anchors (position in [0, 1], RGB): dark blue, blue, cyan, yellow, red, dark red.
COLORMAP = (
    (0.0, (0, 0, 128)),
    (0.125, (0, 0, 255)),
    (0.375, (0, 255, 255)),
    (0.625, (255, 255, 0)),
    (0.875, (255, 0, 0)),
    (1.0, (128, 0, 0)),
)


def colours(fractions: np.ndarray) -> np.ndarray:
    """RGB float colours (..., 3) of values in [0, 1] along the colour map."""
    positions = [p for p, _ in COLORMAP]
    return np.stack(
        [np.interp(fractions, positions, [rgb[channel] for _, rgb in COLORMAP]) for channel in range(3)], axis=-1
    )


def overlaid(rgb: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """`rgb` with the colour of `fractions` blended in where they reach THRESHOLD."""
    shown = fractions >= THRESHOLD
    blended = rgb.astype(np.float32)
    blended[shown] = (1 - ALPHA) * blended[shown] + ALPHA * colours(fractions[shown])
    return blended.round().astype(np.uint8)


def number_text(value: float, span: float) -> str:
    """The value to 3 significant digits; one below a thousandth of the bar's span reads 0, not 2.2e-30."""
    return "0" if abs(value) < 1e-3 * span else f"{value:.3g}"


def unit_text(heatmap: Heatmap) -> str:
    """' HU', ' mL'...: the UCUM code, its meaning for an annotation ('{probability}'), nothing for '1'."""
    unit = heatmap.unit
    if unit.value == "1":
        return ""
    return f" {unit.meaning if unit.value.startswith('{') else unit.value}"


def draw_right_aligned(draw: ImageDraw.ImageDraw, right: int, y: int, text: str, size: int) -> None:
    draw_label(draw, (right - int(draw.textlength(text, font=font(size))), y), text, size)


def draw_colour_bar(draw: ImageDraw.ImageDraw, image: Image.Image, heatmap: Heatmap, low: float, high: float) -> None:
    """A vertical colour bar at the right edge: the map's name above it, its maximum at the top, minimum below;
    the part below THRESHOLD is grey, as those values are not drawn."""
    size = text_size_for(image)
    margin = size // 2
    width, height = size, image.height // 3
    right = image.width - margin
    left, top = right - width, margin + 2 * size
    fractions = np.linspace(1.0, 0.0, height)
    bar = np.where((fractions >= THRESHOLD)[:, None], colours(fractions), UNDRAWN)[:, None, :].repeat(width, axis=1)
    image.paste(Image.fromarray(bar.round().astype(np.uint8)), (left, top))
    draw.rectangle((left - 1, top - 1, right, top + height), outline=WHITE)
    draw_right_aligned(draw, right, margin, heatmap.name, fitting_size(draw, heatmap.name, size, image.width // 2))
    for value, y in ((high, top), (low, top + height - size)):
        draw_right_aligned(draw, left - margin, y, number_text(value, high - low) + unit_text(heatmap), size)


def heatmap_image(volume: Volume, heatmap: Heatmap, index: int, manifest: Manifest) -> tuple[np.ndarray, int]:
    """(RGB uint8 image, enlargement factor) of slice `index` with the heatmap, its colour bar and warning."""
    rgb, factor = shown_gray(volume, index)
    low, high = display_range(heatmap)
    fractions = np.clip((heatmap.array[index] - low) / (high - low), 0.0, 1.0)
    image = Image.fromarray(overlaid(rgb, fractions.repeat(factor, axis=0).repeat(factor, axis=1)))
    draw = ImageDraw.Draw(image)
    draw_colour_bar(draw, image, heatmap, float(heatmap.array.min()), float(heatmap.array.max()))
    draw_warning(draw, image, manifest)
    return np.array(image), factor


def build_heatmap_scs(
    volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext
) -> list[Dataset]:
    """One RGB Secondary Capture per heatmap of `result`, in one series."""
    objects = []
    for index, heatmap in enumerate(checked_heatmaps(result, volume)):
        slice_index = heatmap_slice_index(volume, heatmap, result)
        objects.append(secondary_capture(
            volume, slice_index, heatmap_image(volume, heatmap, slice_index, manifest), manifest, ctx,
            uid_kind="heatmap-sc", uid_index=index, series_number=HEATMAP_SC_SERIES_NUMBER, what="heatmap",
            derivation=f"Heatmap '{heatmap.name}' of {manifest.name} {manifest.version} over the source slice",
        ))
    return objects
