"""Detections of a PipelineResult as the SR and the GSPS see them: checked, split into regions, tracked.

A detection's box and each of its key points is one region: one SR planar measurement group (TID 1410 holds
exactly one image region) and one GSPS graphic object, both carrying the region's TrackingUID so a viewer
can tie the drawing to the report.

Coordinates become DICOM image coordinates (column, row), where (0, 0) is the top-left corner of the
top-left pixel: a box's slice bounds map to its edges unchanged, a point's pixel index to its centre (+0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Detection, Manifest, PipelineResult
from dicom_ai_node.results.provenance import LO_MAX, ResultContext
from dicom_ai_node.results.segments import source_series_uid
from dicom_ai_node.results.uids import derive_result_uid

POLYLINE, POINT = "POLYLINE", "POINT"


@dataclass(frozen=True)
class Region:
    detection: Detection
    number: int  # 1-based position of the detection in PipelineResult.detections
    part: int  # 0 for the box, then 1.. for the key points (when there is no box, points start at 1 too)
    graphic_type: str  # POLYLINE (a closed box) or POINT
    data: np.ndarray  # (points, 2) float (column, row) in DICOM image coordinates
    tracking_id: str
    tracking_uid: str


def check_detection(detection: Detection, number: int, volume: Volume) -> None:
    """ValueError naming detection `number` when it lies outside the volume or has nothing to draw."""
    slices, rows, columns = volume.array.shape
    where = f"detection {number} ({detection.label!r})"
    if not 0 <= detection.slice_index < slices:
        raise ValueError(f"{where}: slice_index {detection.slice_index} outside 0..{slices - 1}")
    if detection.box is None and not detection.points:
        raise ValueError(f"{where}: has neither a box nor key points")
    if detection.probability is not None and not 0.0 <= detection.probability <= 1.0:
        raise ValueError(f"{where}: probability {detection.probability} is not in [0, 1]")
    if detection.box is not None:
        row_min, col_min, row_max, col_max = detection.box
        if not (0 <= row_min < row_max <= rows and 0 <= col_min < col_max <= columns):
            raise ValueError(f"{where}: box {detection.box} is empty or outside the {rows}x{columns} image")
    for row, col in detection.points:
        if not (0 <= row <= rows - 1 and 0 <= col <= columns - 1):
            raise ValueError(f"{where}: point {(row, col)} outside the {rows}x{columns} image")


def box_outline(box: tuple[float, float, float, float]) -> np.ndarray:
    """The closed polyline (first point repeated last) around a box given as slice bounds."""
    row_min, col_min, row_max, col_max = (float(v) for v in box)
    return np.array([[col_min, row_min], [col_max, row_min], [col_max, row_max], [col_min, row_max],
                     [col_min, row_min]])


def pixel_centre(point: tuple[float, float]) -> np.ndarray:
    row, col = point
    return np.array([[float(col) + 0.5, float(row) + 0.5]])


def detection_regions(
    volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext
) -> list[Region]:
    """Every region of every detection, in order, checked against the volume."""
    regions = []
    for number, detection in enumerate(result.detections, start=1):
        check_detection(detection, number, volume)
        shapes = ([(0, POLYLINE, box_outline(detection.box))] if detection.box is not None else []) + [
            (part, POINT, pixel_centre(point)) for part, point in enumerate(detection.points, start=1)
        ]
        for part, graphic_type, data in shapes:
            label = detection.label if len(shapes) == 1 or part == 0 else f"{detection.label} point {part}"
            regions.append(Region(
                detection=detection,
                number=number,
                part=part,
                graphic_type=graphic_type,
                data=data,
                tracking_id=label[:LO_MAX],
                tracking_uid=derive_result_uid(
                    ctx.org_root, source_series_uid(volume), manifest.name, manifest.version,
                    "detection-tracking", number, part=part,
                ),
            ))
    return regions
