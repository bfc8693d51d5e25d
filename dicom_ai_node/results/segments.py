"""Segments of a PipelineResult as every result object sees them: ordered, checked, tracked."""
from __future__ import annotations

from pydicom.dataset import Dataset

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Manifest, PipelineResult, Segment
from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.uids import derive_result_uid


def source_series_uid(volume: Volume) -> str:
    return str(volume.sources[0].SeriesInstanceUID)


def frame_number(volume: Volume, index: int) -> int | None:
    """The 1-based frame of slice `index` within its multi-frame source; None for a single-frame source."""
    return volume.frame_numbers[index] if volume.frame_numbers is not None else None


def derivation_sources(volume: Volume) -> tuple[list[Dataset], list[int]]:
    """(source_images, slice order) for highdicom's SEG and Parametric Map constructors.

    Single-frame sources: every slice's instance, in slice order. A multi-frame source: its one instance and
    the slices in its stored frame order (highdicom maps frame i of the pixel array to source frame i + 1);
    highdicom takes exactly one multi-frame source image, so a series of several is refused.
    """
    if not volume.is_multiframe:
        return list(volume.sources), list(range(len(volume.sources)))
    instances = volume.source_instances
    if len(instances) > 1:
        raise ValueError(
            f"series {source_series_uid(volume)} holds its slices in {len(instances)} multi-frame instances: "
            "a SEG or Parametric Map derives from exactly one multi-frame source image"
        )
    order = volume.slices_in_frame_order()
    if [volume.frame_numbers[k] for k in order] != list(range(1, int(instances[0].NumberOfFrames) + 1)):
        raise ValueError(
            f"series {source_series_uid(volume)}: the volume does not hold every frame of its multi-frame source "
            "once, which a SEG or Parametric Map of it needs"
        )
    return list(instances), order


def tracking_uid(volume: Volume, manifest: Manifest, ctx: ResultContext, segment_number: int) -> str:
    """TrackingUID shared by a SEG segment and its SR measurement group (0: series-level group)."""
    return derive_result_uid(
        ctx.org_root, source_series_uid(volume), manifest.name, manifest.version, "tracking", segment_number
    )


def sorted_segments(result: PipelineResult, volume: Volume) -> list[Segment]:
    """Segments by number, checked to be numbered 1..n and shaped like the volume (highdicom's rules)."""
    segments = sorted(result.segments, key=lambda s: s.number)
    numbers = [s.number for s in segments]
    if numbers != list(range(1, len(segments) + 1)):
        raise ValueError(f"segment numbers {numbers} must be 1..{len(segments)} without gaps")
    for segment in segments:
        if segment.mask.shape != volume.array.shape:
            raise ValueError(
                f"segment {segment.number} mask shape {segment.mask.shape} differs from the volume "
                f"{volume.array.shape} of series {source_series_uid(volume)}"
            )
    return segments


def key_slice_index(volume: Volume, result: PipelineResult) -> int:
    """result.key_slice, else the slice with the largest total mask area, else the middle slice."""
    if result.key_slice is not None:
        if not 0 <= result.key_slice < volume.array.shape[0]:
            raise ValueError(f"key_slice {result.key_slice} outside 0..{volume.array.shape[0] - 1}")
        return result.key_slice
    areas = sum((s.mask > 0.5).sum(axis=(1, 2)) for s in result.segments) if result.segments else None
    if areas is None or not areas.any():
        return volume.array.shape[0] // 2
    return int(areas.argmax())
