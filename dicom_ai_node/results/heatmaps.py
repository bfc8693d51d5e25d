"""Heatmaps of a PipelineResult as the Parametric Map and the heatmap Secondary Capture see them."""
from __future__ import annotations

import numpy as np

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Heatmap, PipelineResult
from dicom_ai_node.results.segments import key_slice_index, source_series_uid


def checked_heatmaps(result: PipelineResult, volume: Volume) -> list[Heatmap]:
    """The result's heatmaps, checked to be finite, non-empty and shaped like the volume."""
    for number, heatmap in enumerate(result.heatmaps, start=1):
        where = f"heatmap {number} ({heatmap.name!r}) of series {source_series_uid(volume)}"
        if not heatmap.name.strip():
            raise ValueError(f"{where}: the name is empty; it labels the map's values in viewers")
        if heatmap.array.shape != volume.array.shape:
            raise ValueError(f"{where}: shape {heatmap.array.shape} differs from the volume {volume.array.shape}")
        if not np.isfinite(heatmap.array).all():
            raise ValueError(f"{where}: holds NaN or infinite values")
    return list(result.heatmaps)


def heatmap_slice_index(volume: Volume, heatmap: Heatmap, result: PipelineResult) -> int:
    """result.key_slice when set (one slice for all objects), else the slice holding the map's maximum."""
    if result.key_slice is not None:
        return key_slice_index(volume, result)
    return int(np.unravel_index(int(np.argmax(heatmap.array)), heatmap.array.shape)[0])


def display_range(heatmap: Heatmap) -> tuple[float, float]:
    """(min, max) of the map; a constant map gets a range of width 1 so that scales never divide by zero."""
    low, high = float(heatmap.array.min()), float(heatmap.array.max())
    return (low, high) if high > low else (low, low + 1.0)
