"""Frames of DICOM images, each with the attributes that apply to it, and their pixels in real units.

A single-frame instance is one frame whose attributes are the dataset itself. A multi-frame instance
(Enhanced / Legacy Converted Enhanced CT, MR, PET) keeps each frame's geometry, rescale and window in
functional groups: the Shared item applies to every frame, the Per-Frame item to one frame and wins over
the shared one. `frame_header` flattens both into single-frame form (ImagePositionPatient, RescaleSlope,
WindowCenter ... at the top level), so the rest of the imaging stage reads one shape of header.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from dicom_ai_node.imaging.errors import instance_error, instance_name, tag_name

# Functional group macros whose contents are the single-frame attributes the imaging stage reads.
FRAME_MACROS = (
    "PlanePositionSequence",  # ImagePositionPatient
    "PlaneOrientationSequence",  # ImageOrientationPatient
    "PixelMeasuresSequence",  # PixelSpacing, SliceThickness
    "PixelValueTransformationSequence",  # RescaleSlope, RescaleIntercept, RescaleType
    "FrameVOILUTSequence",  # WindowCenter, WindowWidth, VOILUTFunction
)
# Instance-level attributes every frame header carries, for checks, units and messages.
INSTANCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Units",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
)


@dataclass(frozen=True)
class Frame:
    dataset: Dataset  # the instance that holds the frame
    number: int | None  # 1-based frame number in a multi-frame instance; None for a single-frame instance
    header: Dataset  # the attributes that apply to this frame, in single-frame form

    @property
    def name(self) -> str:
        return instance_name(self.dataset, self.number)


def has_functional_groups(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def frame_header(ds: Dataset, number: int) -> Dataset:
    """Frame `number` (1-based) of multi-frame `ds` as a single-frame header (per-frame over shared)."""
    header = Dataset()
    for keyword in INSTANCE_KEYWORDS:
        if keyword in ds:
            header[keyword] = ds[keyword]
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else Dataset()
    for group in (shared, ds.PerFrameFunctionalGroupsSequence[number - 1]):
        for macro in FRAME_MACROS:
            if group.get(macro):
                for element in group[macro][0]:
                    header[element.tag] = element
    return header


def frames_of(ds: Dataset) -> list[Frame]:
    """Every frame of `ds`, in stored order."""
    if not has_functional_groups(ds):
        return [Frame(ds, None, ds)]
    count = int(ds.get("NumberOfFrames", 1) or 1)
    items = len(ds.PerFrameFunctionalGroupsSequence)
    if items != count:
        raise instance_error(
            ds, f"has {items} {tag_name('PerFrameFunctionalGroupsSequence')} items for {count} frames "
            f"({tag_name('NumberOfFrames')})"
        )
    return [Frame(ds, number, frame_header(ds, number)) for number in range(1, count + 1)]


def stored_pixels(frame: Frame) -> np.ndarray:
    """The frame's stored values (rows, columns), as encoded; decoding is cached on the dataset."""
    pixels = frame.dataset.pixel_array
    if frame.number is None:
        return pixels
    return pixels.reshape(-1, *pixels.shape[-2:])[frame.number - 1]


def is_monochrome1(header: Dataset) -> bool:
    return str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"


def monochrome1_mirror(header: Dataset) -> float:
    """Sum of the lowest and highest modality values the stored bits can hold.

    A MONOCHROME1 value v is kept as mirror - v: higher is then brighter, as in every other image, while
    the scale, the units of differences and the range stay those of the modality values, and the mapping is
    its own inverse (display_pixels undoes it to apply the source's window, which is in MONOCHROME1 values).
    """
    bits = int(header.BitsStored)
    if int(header.get("PixelRepresentation", 0)) == 1:
        extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    else:
        extremes = np.array([0, 2**bits - 1])
    mapped = apply_modality_lut(extremes, header)
    return float(np.min(mapped) + np.max(mapped))


def modality_values(frame: Frame) -> np.ndarray:
    """The frame in real units (float32): Modality LUT or rescale applied, MONOCHROME1 mirrored."""
    values = np.asarray(apply_modality_lut(stored_pixels(frame), frame.header), dtype=np.float32)
    if is_monochrome1(frame.header):
        values = np.float32(monochrome1_mirror(frame.header)) - values
    return values
