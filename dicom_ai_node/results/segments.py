"""Segments of a PipelineResult as every result object sees them: ordered, checked, tracked."""
from __future__ import annotations

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Manifest, PipelineResult, Segment
from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.uids import derive_result_uid


def source_series_uid(volume: Volume) -> str:
    return str(volume.sources[0].SeriesInstanceUID)


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
