"""Checks on the instances of one series before any loader reads their pixels, and which loader fits them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    SegmentationStorage,
    UID,
)

from dicom_ai_node.imaging.errors import VolumeError, instance_error, tag_name
from dicom_ai_node.imaging.frames import has_functional_groups

MULTIFRAME = "multi-frame"  # frames positioned by functional groups
SLICES = "slices"  # single-frame cross-sectional images positioned by ImagePositionPatient
PROJECTION = "projection"  # one 2D image without a position in space (CR, DX, MG, IO, secondary capture)

FUNCTIONAL_GROUP_SOP_CLASSES = frozenset({
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
})
CROSS_SECTIONAL_SOP_CLASSES = frozenset({CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage})
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Images with pixels that are results, not acquisitions: a PACS may route the node's own SEG back to it.
DERIVED_RESULT_SOP_CLASSES = frozenset({SegmentationStorage})
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def read_instances(paths: Sequence[Path | str]) -> list[Dataset]:
    if not paths:
        raise VolumeError("no instances to load")
    return [pydicom.dcmread(p) for p in paths]


def sop_class_name(ds: Dataset) -> str:
    uid = UID(str(ds.get("SOPClassUID", "")))
    return uid.name if uid else "(no SOPClassUID)"


def check_is_source_image(ds: Dataset) -> None:
    """Raise unless `ds` is an image the node can analyse (pixels, not a result object)."""
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        raise instance_error(ds, f"({sop_class_name(ds)}) is not an image: it has no {tag_name('PixelData')}")
    if str(ds.get("SOPClassUID", "")) in DERIVED_RESULT_SOP_CLASSES:
        raise instance_error(ds, f"({sop_class_name(ds)}) is a result object, not a source image")
    if str(ds.get("PhotometricInterpretation", "")).strip() not in MONOCHROME:
        raise instance_error(
            ds, f"has {tag_name('PhotometricInterpretation')} {ds.get('PhotometricInterpretation', '')!s}: "
            "only MONOCHROME1/MONOCHROME2 images make a volume"
        )


def image_series_uid(datasets: Sequence[Dataset]) -> str:
    """The one SeriesInstanceUID of `datasets`, once every instance is checked to be a source image."""
    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(series_uids) != 1:
        raise VolumeError(
            f"instances belong to {len(series_uids)} series ({tag_name('SeriesInstanceUID')} differs: "
            f"{', '.join(series_uids)})"
        )
    for ds in datasets:
        check_is_source_image(ds)
    return series_uids[0]


def instance_kind(ds: Dataset) -> str:
    """MULTIFRAME, SLICES or PROJECTION: the loader `ds` needs, by its SOP class and frames."""
    if has_functional_groups(ds):
        return MULTIFRAME
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 or str(ds.get("SOPClassUID", "")) in FUNCTIONAL_GROUP_SOP_CLASSES:
        # Cine, NM, multi-frame secondary captures and stripped enhanced objects give no position per frame.
        raise instance_error(
            ds, f"has {frames} frame(s) ({tag_name('NumberOfFrames')}) but no "
            f"{tag_name('PerFrameFunctionalGroupsSequence')} to place them"
        )
    if "ImagePositionPatient" in ds or str(ds.get("SOPClassUID", "")) in CROSS_SECTIONAL_SOP_CLASSES:
        return SLICES
    return PROJECTION
