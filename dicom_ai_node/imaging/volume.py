"""DICOM series -> Volume in real units with its patient geometry.

Array axes are (slice, row, column), numpy order. Geometry follows DICOM LPS: `origin` is the
ImagePositionPatient of slice 0, `row_direction`/`column_direction` are the two ImageOrientationPatient
cosines, and slices are sorted along their normal so that slice k sits at origin + k * spacing[0] * normal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset


class VolumeError(ValueError):
    """A series cannot be made into a volume; the message names the series/instance and the tag at fault."""


@dataclass(frozen=True)
class Volume:
    array: np.ndarray  # float32 (slices, rows, columns) in `unit`
    spacing: tuple[float, float, float]  # mm between slices, rows, columns (numpy axis order)
    origin: tuple[float, float, float]  # LPS mm of the first voxel of slice 0
    row_direction: tuple[float, float, float]  # direction of increasing column index (IOP[0:3])
    column_direction: tuple[float, float, float]  # direction of increasing row index (IOP[3:6])
    unit: str  # "HU" for CT, "1" when unitless
    modality: str
    sources: tuple[Dataset, ...]  # source instances in slice order (headers + pixels as received)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_direction), np.asarray(self.column_direction))

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def to_sitk(self):
        """The volume as a SimpleITK image (x=column, y=row, z=slice) with the same LPS geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing((self.spacing[2], self.spacing[1], self.spacing[0]))
        image.SetOrigin(self.origin)
        direction = np.column_stack([self.row_direction, self.column_direction, self.normal])
        image.SetDirection(tuple(float(v) for v in direction.ravel()))
        return image


def _real_units(ds: Dataset) -> np.ndarray:
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def load_volume(paths: list[Path] | list[str], spacing_tolerance_mm: float = 0.05) -> Volume:
    """Read a single-frame cross-sectional series (CT/MR) into a Volume.

    Raises VolumeError when the files are not one geometrically consistent series: mixed series or
    orientations, missing ImagePositionPatient, duplicate positions, or uneven slice spacing (missing slices).
    """
    if not paths:
        raise VolumeError("no instances to load")
    datasets = [pydicom.dcmread(p) for p in paths]
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise VolumeError(f"instances belong to {len(series_uids)} series (SeriesInstanceUID differs)")
    series_uid = series_uids.pop()
    for ds in datasets:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if keyword not in ds:
                raise VolumeError(f"series {series_uid}: instance {ds.get('SOPInstanceUID', '?')} lacks {keyword}")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    for ds in datasets[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise VolumeError(f"series {series_uid}: ImageOrientationPatient differs between instances")
    shape = (int(datasets[0].Rows), int(datasets[0].Columns))
    for ds in datasets[1:]:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise VolumeError(f"series {series_uid}: Rows/Columns differ between instances")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    datasets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))
    positions = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)) for ds in datasets])
    if len(datasets) > 1:
        gaps = np.diff(positions)
        if np.any(gaps < 1e-3):
            raise VolumeError(f"series {series_uid}: two instances share one ImagePositionPatient")
        slice_spacing = float(np.median(gaps))
        if np.max(np.abs(gaps - slice_spacing)) > spacing_tolerance_mm:
            worst = int(np.argmax(np.abs(gaps - slice_spacing)))
            raise VolumeError(
                f"series {series_uid}: uneven slice spacing (ImagePositionPatient gap {gaps[worst]:.3f} mm "
                f"after slice {worst}, median {slice_spacing:.3f} mm): missing or extra slices"
            )
    else:
        slice_spacing = float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    array = np.stack([_real_units(ds) for ds in datasets]).astype(np.float32, copy=False)
    modality = str(datasets[0].get("Modality", ""))
    return Volume(
        array=array,
        spacing=(slice_spacing, row_spacing, column_spacing),
        origin=tuple(float(v) for v in datasets[0].ImagePositionPatient),
        row_direction=tuple(float(v) for v in row_dir),
        column_direction=tuple(float(v) for v in col_dir),
        unit="HU" if modality == "CT" else "1",
        modality=modality,
        sources=tuple(datasets),
    )
