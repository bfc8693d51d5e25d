"""A projection image (CR, DX, MG, IO, or a secondary capture) as a Volume of one slice.

A projection has no position in space, so its geometry is nominal and documented here:
- spacing: (1.0, row, column) mm. Row/column spacing is the first positive pair of PixelSpacing (patient
  plane, calibrated where the modality says so), ImagerPixelSpacing (detector plane, not corrected for
  magnification) or NominalScannedPixelSpacing (digitized film); Volume.spacing_source names which. With
  none, 1 mm per pixel and spacing_source "" (some CR carry PixelSpacing 0\\0, which counts as none).
- row/column direction: from PatientOrientation (e.g. L\\F, or A\\FR for an oblique mammogram view) when
  it gives two perpendicular directions, else L\\F, the frontal radiograph convention. origin: (0, 0, 0).
- array: modality values (Modality LUT or rescale applied), MONOCHROME1 mirrored so higher is brighter
  (see frames.monochrome1_mirror); no VOI LUT or window, which imaging.display applies for display only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.errors import VolumeError
from dicom_ai_node.imaging.frames import frames_of, modality_values
from dicom_ai_node.imaging.volume import Volume, volume_unit

SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
NOMINAL_SLICE_SPACING_MM = 1.0
LPS_LETTERS = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0),
}
FRONTAL_DIRECTIONS = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))  # rows towards the patient's left, columns to the feet


def in_plane_spacing(ds: Dataset) -> tuple[tuple[float, float], str]:
    """((row spacing, column spacing) mm, the keyword it came from); ((1, 1), "") when none is usable."""
    for keyword in SPACING_KEYWORDS:
        values = ds.get(keyword)
        if values is not None and len(values) == 2 and all(float(v) > 0 for v in values):
            return (float(values[0]), float(values[1])), keyword
    return (1.0, 1.0), ""


def letters_direction(letters: str) -> np.ndarray | None:
    """The unit LPS vector of a PatientOrientation value such as 'L' or 'FR'; None when it has no letters."""
    vectors = [LPS_LETTERS[c] for c in letters.strip().upper() if c in LPS_LETTERS]
    if not vectors:
        return None
    total = np.sum(vectors, axis=0)
    norm = float(np.linalg.norm(total))
    return total / norm if norm > 0 else None


def patient_directions(ds: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(row direction, column direction) from PatientOrientation, else the frontal convention L\\F."""
    values = ds.get("PatientOrientation")
    if values is not None and not isinstance(values, str) and len(values) == 2:
        row, column = letters_direction(str(values[0])), letters_direction(str(values[1]))
        if row is not None and column is not None and abs(float(row @ column)) < 1e-6:
            return tuple(float(v) for v in row), tuple(float(v) for v in column)
    return FRONTAL_DIRECTIONS


def projection_volume(datasets: Sequence[Dataset], series_uid: str) -> Volume:
    """The one projection image of a checked series as a Volume of one slice."""
    if len(datasets) != 1:
        named = ", ".join(str(ds.SOPInstanceUID) for ds in datasets[:2])
        raise VolumeError(
            f"series {series_uid} holds {len(datasets)} projection images ({named}, ...): each is an image "
            "of its own, not a slice of one volume"
        )
    (ds,) = datasets
    (frame,) = frames_of(ds)
    (row_spacing, column_spacing), spacing_source = in_plane_spacing(ds)
    row_direction, column_direction = patient_directions(ds)
    return Volume(
        array=modality_values(frame)[np.newaxis],
        spacing=(NOMINAL_SLICE_SPACING_MM, row_spacing, column_spacing),
        origin=(0.0, 0.0, 0.0),
        row_direction=row_direction,
        column_direction=column_direction,
        unit=volume_unit(ds),
        modality=str(ds.get("Modality", "")),
        sources=(ds,),
        spacing_source=spacing_source,
    )
