"""DICOM series -> Volume in real units with its patient geometry.

Array axes are (slice, row, column), numpy order. Geometry follows DICOM LPS: `origin` is the
ImagePositionPatient of slice 0, `row_direction`/`column_direction` are the two ImageOrientationPatient
cosines, and slices are sorted along their normal so that slice k sits at origin + k * spacing[0] * normal.

Slices come from single-frame instances (CT/MR/PET Image Storage: one instance per slice) or from the
frames of multi-frame instances (Enhanced / Legacy Converted Enhanced CT/MR/PET, geometry in functional
groups): both are loaded here by `load_volume`. Projection images (CR, DX, MG, IO, secondary capture) are
loaded by imaging.projection; imaging.series.load_series picks the loader for any series.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.errors import VolumeError, instance_error, tag_name
from dicom_ai_node.imaging.frames import Frame, frames_of, modality_values
from dicom_ai_node.imaging.instances import image_series_uid, instance_kind, read_instances

__all__ = ["Volume", "VolumeError", "load_volume", "volume_unit"]

GEOMETRY_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
SAME_KEYWORDS = ("ImageOrientationPatient", "Rows", "Columns", "PixelSpacing")  # one value for the whole volume
SAME_TOLERANCE = 1e-4  # direction cosines and mm: DS rounding, not a different geometry
DUPLICATE_GAP_MM = 1e-3
# Positions off the slice normal shear the volume (gantry tilt); under a tenth of a pixel it cannot be seen.
IN_PLANE_TOLERANCE_PIXELS = 0.1


@dataclass(frozen=True)
class Volume:
    array: np.ndarray  # float32 (slices, rows, columns) in `unit`
    spacing: tuple[float, float, float]  # mm between slices, rows, columns (numpy axis order)
    origin: tuple[float, float, float]  # LPS mm of the first voxel of slice 0
    row_direction: tuple[float, float, float]  # direction of increasing column index (IOP[0:3])
    column_direction: tuple[float, float, float]  # direction of increasing row index (IOP[3:6])
    unit: str  # "HU" for CT, "Bq/mL" for PET (SUV: later), "1" when unitless or unspecified
    modality: str
    # The source instance of each slice, in slice order (headers + pixels as received). A multi-frame
    # instance appears once per slice it holds, so sources[k] is always the instance of slice k.
    sources: tuple[Dataset, ...]
    # The 1-based frame number of slice k within sources[k]; None when every source is a single-frame image.
    frame_numbers: tuple[int, ...] | None = None
    # The attribute the in-plane spacing came from: "PixelSpacing" (patient plane), "ImagerPixelSpacing"
    # (detector plane: projection sizes include the geometric magnification), "NominalScannedPixelSpacing"
    # (digitized film), or "" when the source states none and spacing is a nominal 1 mm per pixel.
    spacing_source: str = "PixelSpacing"

    def __post_init__(self) -> None:
        if self.frame_numbers is not None and len(self.frame_numbers) != len(self.sources):
            raise ValueError(f"{len(self.frame_numbers)} frame numbers for {len(self.sources)} sources")

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_direction), np.asarray(self.column_direction))

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def is_multiframe(self) -> bool:
        """True when slices are frames of multi-frame instances: references must name the frame."""
        return self.frame_numbers is not None

    @property
    def source_frames(self) -> tuple[tuple[Dataset, int], ...]:
        """(source instance, 1-based frame number) of each slice; frame 1 for single-frame instances."""
        numbers = self.frame_numbers if self.frame_numbers is not None else (1,) * len(self.sources)
        return tuple(zip(self.sources, numbers))

    @property
    def source_instances(self) -> tuple[Dataset, ...]:
        """Each source instance once (by SOPInstanceUID), in the order of its first slice."""
        unique: dict[str, Dataset] = {}
        for ds in self.sources:
            unique.setdefault(str(ds.SOPInstanceUID), ds)
        return tuple(unique.values())

    def slices_in_frame_order(self) -> list[int]:
        """Slice indices ordered by (source instance, frame number): array[order][i] is the i-th stored frame.

        A highdicom Segmentation of one multi-frame source wants its frames in the source's frame order.
        """
        rank = {str(ds.SOPInstanceUID): i for i, ds in enumerate(self.source_instances)}
        keys = [(rank[str(ds.SOPInstanceUID)], number) for ds, number in self.source_frames]
        return sorted(range(len(keys)), key=keys.__getitem__)

    def to_sitk(self):
        """The volume as a SimpleITK image (x=column, y=row, z=slice) with the same LPS geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing((self.spacing[2], self.spacing[1], self.spacing[0]))
        image.SetOrigin(self.origin)
        direction = np.column_stack([self.row_direction, self.column_direction, self.normal])
        image.SetDirection(tuple(float(v) for v in direction.ravel()))
        return image


def volume_unit(header: Dataset) -> str:
    """The unit of the modality values of an image header (single-frame form)."""
    modality = str(header.get("Modality", ""))
    if modality == "CT":
        # Rescale Type is HU when absent (CT Image); derived Enhanced CT frames may say US (unspecified).
        return "HU" if str(header.get("RescaleType", "HU")).strip().upper() in ("HU", "") else "1"
    if modality == "PT":
        # PET stays in its stored Units (BQML: activity concentration). SUV body weight is a later issue: it
        # converts here, from PatientWeight, RadiopharmaceuticalInformationSequence (total dose, start time,
        # half-life) and DecayCorrection, and then returns "g/mL".
        return "Bq/mL" if str(header.get("Units", "")).strip().upper() == "BQML" else "1"
    return "1"


def header_values(frame: Frame, keyword: str) -> np.ndarray:
    return np.atleast_1d(np.asarray(frame.header[keyword].value, dtype=float))


def multi_value(values: np.ndarray) -> str:
    """Values as DICOM writes them: 1\\0\\0, 64."""
    return "\\".join(f"{v:g}" for v in values)


def check_geometry_present(frame: Frame) -> None:
    for keyword in GEOMETRY_KEYWORDS:
        if frame.header.get(keyword) in (None, ""):
            raise instance_error(frame.dataset, f"lacks {tag_name(keyword)}", frame.number)
    spacing = header_values(frame, "PixelSpacing")
    if spacing.size != 2 or not np.all(spacing > 0):
        raise instance_error(
            frame.dataset, f"has {tag_name('PixelSpacing')} {multi_value(spacing)}: two positive values needed",
            frame.number,
        )


def check_same_geometry(frames: Sequence[Frame]) -> None:
    """Raise when orientation, matrix size or pixel spacing differ between frames (mixed stacks)."""
    reference = frames[0]
    for keyword in SAME_KEYWORDS:
        expected = header_values(reference, keyword)
        for frame in frames[1:]:
            found = header_values(frame, keyword)
            if found.shape != expected.shape or not np.allclose(found, expected, rtol=0, atol=SAME_TOLERANCE):
                raise instance_error(
                    frame.dataset,
                    f"has {tag_name(keyword)} {multi_value(found)}, unlike {multi_value(expected)} of {reference.name}",
                    frame.number,
                )


def position(frame: Frame) -> np.ndarray:
    return header_values(frame, "ImagePositionPatient")


def even_slice_spacing(frames: Sequence[Frame], heights: np.ndarray, series_uid: str, tolerance_mm: float) -> float:
    """The gap between consecutive sorted frames; raise on duplicates or uneven gaps (missing slices)."""
    if len(frames) == 1:
        return float(frames[0].header.get("SliceThickness", 1.0) or 1.0)
    gaps = np.diff(heights)
    duplicates = np.flatnonzero(gaps < DUPLICATE_GAP_MM)
    if duplicates.size:
        first, second = frames[duplicates[0]], frames[duplicates[0] + 1]
        raise instance_error(
            second.dataset,
            f"has the same {tag_name('ImagePositionPatient')} as {first.name}: duplicate positions "
            "(another stack, echo or time point, or a slice re-sent under a new UID)",
            second.number,
        )
    slice_spacing = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - slice_spacing)))
    if abs(gaps[worst] - slice_spacing) > tolerance_mm:
        raise VolumeError(
            f"series {series_uid}: uneven slice spacing ({tag_name('ImagePositionPatient')} gap "
            f"{gaps[worst]:.3f} mm between {frames[worst].name} and {frames[worst + 1].name}, median "
            f"{slice_spacing:.3f} mm): missing or extra slices"
        )
    return slice_spacing


def check_along_normal(frames: Sequence[Frame], row_direction: np.ndarray, column_direction: np.ndarray) -> None:
    """Raise when a slice is shifted within its plane from the first one (gantry tilt, sheared stack)."""
    row_spacing, column_spacing = header_values(frames[0], "PixelSpacing")
    origin = position(frames[0])
    for frame in frames[1:]:
        offset = position(frame) - origin
        shift_pixels = max(abs(offset @ row_direction) / column_spacing, abs(offset @ column_direction) / row_spacing)
        if shift_pixels > IN_PLANE_TOLERANCE_PIXELS:
            raise instance_error(
                frame.dataset,
                f"has an {tag_name('ImagePositionPatient')} {shift_pixels:.2f} pixels off the slice normal through "
                f"{frames[0].name}: gantry tilt or a sheared stack, which a volume cannot hold",
                frame.number,
            )


def stacked_volume(frames: list[Frame], series_uid: str, spacing_tolerance_mm: float) -> Volume:
    """The Volume of positioned frames: checked to be one evenly spaced stack, sorted along the normal."""
    for frame in frames:
        check_geometry_present(frame)
    check_same_geometry(frames)
    iop = header_values(frames[0], "ImageOrientationPatient")
    row_direction, column_direction = iop[:3], iop[3:]
    normal = np.cross(row_direction, column_direction)
    frames = sorted(frames, key=lambda f: float(normal @ position(f)))
    heights = np.array([normal @ position(f) for f in frames])
    slice_spacing = even_slice_spacing(frames, heights, series_uid, spacing_tolerance_mm)
    check_along_normal(frames, row_direction, column_direction)
    row_spacing, column_spacing = (float(v) for v in header_values(frames[0], "PixelSpacing"))
    multiframe = frames[0].number is not None
    return Volume(
        array=np.stack([modality_values(f) for f in frames]),
        spacing=(slice_spacing, row_spacing, column_spacing),
        origin=tuple(float(v) for v in position(frames[0])),
        row_direction=tuple(float(v) for v in row_direction),
        column_direction=tuple(float(v) for v in column_direction),
        unit=volume_unit(frames[0].header),
        modality=str(frames[0].header.get("Modality", "")),
        sources=tuple(f.dataset for f in frames),
        frame_numbers=tuple(int(f.number) for f in frames) if multiframe else None,
    )


def check_one_kind(datasets: Sequence[Dataset]) -> None:
    """Raise when a series mixes single-frame slices, multi-frame instances or projection images."""
    first_of_kind: dict[str, Dataset] = {}
    for ds in datasets:
        first_of_kind.setdefault(instance_kind(ds), ds)
    if len(first_of_kind) > 1:
        named = ", ".join(f"{kind} ({ds.SOPInstanceUID})" for kind, ds in first_of_kind.items())
        raise VolumeError(f"series {datasets[0].SeriesInstanceUID} mixes image kinds: {named}")


def cross_sectional_volume(datasets: Sequence[Dataset], series_uid: str, spacing_tolerance_mm: float) -> Volume:
    """The Volume of checked source images of one series that are slices or multi-frame stacks."""
    check_one_kind(datasets)
    return stacked_volume([f for ds in datasets for f in frames_of(ds)], series_uid, spacing_tolerance_mm)


def load_volume(paths: Sequence[Path | str], spacing_tolerance_mm: float = 0.05) -> Volume:
    """Read a cross-sectional series into a Volume: single-frame CT/MR/PET slices, or multi-frame instances.

    Raises VolumeError when the files are not one geometrically consistent series: non-image instances,
    mixed series, kinds, orientations, matrix sizes or pixel spacings, missing ImagePositionPatient,
    duplicate positions, uneven slice spacing (missing slices) or positions off the normal (gantry tilt).
    imaging.series.load_series takes projection images too.
    """
    datasets = read_instances(paths)
    return cross_sectional_volume(datasets, image_series_uid(datasets), spacing_tolerance_mm)
