"""The "viewer" SR profile: a TID 1500 Measurement Report whose every measurement group has image coordinates.

Why: OHIF 3.13's SR viewport reads the image coordinates of every measurement group and crashes on a group
without any (TypeError reading coords[0].ReferencedSOPSequence), which the full report has: TID 1411
volumetric groups reference SEG segments, TID 1501 groups only name a source image. This profile lays the same
result out as TID 1410 planar ROI groups, each with a closed SCOORD POLYLINE SELECTED FROM a source image
(outlines along pixel edges, see outline.py); OHIF draws each and labels it with the group's measurements.

Layout, in this order, with the Tracking UIDs of the full report (a group ties to the same SEG segment,
finding or GSPS graphic, and no two groups share one: OHIF merges groups by Tracking UID):

- one group per segment that has measurements or findings, with the segment's tracking identifier, finding
  type, category and site: the outline of its largest 8-connected component (holes ignored) on the slice
  where the segment's area is largest (of equal ones, the nearest to the key slice). Its own largest slice
  rather than the key slice: OHIF opens the report on the first group's image and steps to each other
  group's image with its arrows, so every segment is shown where it is biggest; and a small segment (a
  nodule) is seldom on the key slice, which is chosen for all segments together, so it would have no outline
  there.
- one group for the series-level measurements (those of no segment), on the key slice: the convex outline
  of all segments there (one POLYLINE cannot outline a union that falls apart, as two lungs do);
- one group per finding of no segment, on the key slice with that same outline: its coded answer a
  qualitative evaluation, its probability a NUM of the group (as for detections), which OHIF labels;
- one group per detection region, as in the full report.

A group with nothing to outline (a result without segments, no segment on the key slice, an empty segment)
gets the whole image's border as its region: its values are about the image, not about a drawn structure.

What the values mean: TID 1410 reads a group's measurements as of its region, but here the region is a
representative outline and the values stay what the pipeline measured: a segment's volume, LAA-950 and
others are of the whole segment in 3D, series-level values of all segments together. DICOM has no concept
for "representative region"; DCM 126030 "Sum of segmented voxel method for volume" would fit a volume only,
and the node does not know how a pipeline measured, so it states no method the pipeline did not give.
Instead each measurement of a segment names its source: INFERRED FROM that segment of the SEG (TID 320
Source of Measurement, an IMAGE item with the Referenced Segment Number), which also keeps the report tied to
the SEG as the full one is. Series-level values have no such single source; read them as of the series.

Seen in OHIF 3.13 (tests/test_ohif.py): it anchors each label at the right end of its region's bounding
box, half-way down, and does not move labels that overlap; on the key slice the label of the outline of all
segments therefore covers that of the rightmost segment when both share their right edge and middle (two
lungs do). The values are all there (and step by step with OHIF's arrows); only that drawing overlaps.
"""
from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Finding, Manifest, Measurement, PipelineResult, Segment
from dicom_ai_node.results.coding import coded
from dicom_ai_node.results.detections import detection_regions
from dicom_ai_node.results.outline import convex_outline, image_border, largest_component, outer_boundary
from dicom_ai_node.results.provenance import LO_MAX, ResultContext
from dicom_ai_node.results.segments import key_slice_index, tracking_uid
from dicom_ai_node.results.sr import (
    SERIES_GROUP_IDENTIFIER,
    Group,
    Layout,
    algorithm_id,
    checked_segments,
    detection_group,
    finding_probability,
    finding_sites,
    finding_tracking_uid,
    measurement,
    of_segment,
    probability_measurement,
    qualitative_evaluation,
    region_source,
    report_document,
)

VIEWER_LAYOUT = Layout("sr-viewer-series", "sr-viewer", "SR viewer")


def binary(segment: Segment) -> np.ndarray:
    """The segment's voxels as the binary SEG and the key slice count them."""
    return segment.mask > 0.5


def largest_area_slice(mask: np.ndarray, key: int) -> int:
    """The slice where `mask` has the most pixels; of equal ones (an empty mask: all) the nearest to `key`."""
    areas = mask.sum(axis=(1, 2))
    return int(min(np.flatnonzero(areas == areas.max()), key=lambda index: (abs(int(index) - key), int(index))))


def union_on_slice(volume: Volume, segments: Sequence[Segment], index: int) -> np.ndarray:
    """The pixels of slice `index` that are in any segment."""
    union = np.zeros(volume.array.shape[1:], dtype=bool)
    for segment in segments:
        union |= binary(segment)[index]
    return union


def segment_outline(plane: np.ndarray) -> np.ndarray:
    return outer_boundary(largest_component(plane)) if plane.any() else image_border(*plane.shape)


def all_segments_outline(plane: np.ndarray) -> np.ndarray:
    return convex_outline(plane) if plane.any() else image_border(*plane.shape)


def region_on(volume: Volume, index: int, outline: np.ndarray) -> hd.sr.ImageRegion:
    """The closed POLYLINE `outline` SELECTED FROM source image `index`."""
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=region_source(volume, index),
    )


def segment_source(seg: Dataset, number: int) -> hd.sr.SourceImageForMeasurement:
    """Source of Measurement: segment `number` of the SEG, what a segment's values are of."""
    source = hd.sr.SourceImageForMeasurement(seg.SOPClassUID, seg.SOPInstanceUID)
    source.ReferencedSOPSequence[0].ReferencedSegmentNumber = number
    return source


def viewer_segment_group(
    segment: Segment,
    measurements: Sequence[Measurement],
    findings: Sequence[Finding],
    volume: Volume,
    key: int,
    manifest: Manifest,
    ctx: ResultContext,
    seg: Dataset,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one segment: its outline where it is largest, its values inferred from the SEG."""
    mask = binary(segment)
    index = largest_area_slice(mask, key)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(volume, manifest, ctx, segment.number), identifier=segment.label[:LO_MAX]
        ),
        referenced_region=region_on(volume, index, segment_outline(mask[index])),
        finding_type=coded(segment.type),
        finding_category=coded(segment.category),
        finding_sites=finding_sites(segment),
        algorithm_id=algorithm_id(manifest),
        measurements=[measurement(m, [segment_source(seg, segment.number)]) for m in measurements] or None,
        qualitative_evaluations=[qualitative_evaluation(f) for f in findings] or None,
    )


def viewer_series_group(
    measurements: Sequence[Measurement], region: hd.sr.ImageRegion, volume: Volume, manifest: Manifest,
    ctx: ResultContext,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of the measurements of no segment, on `region` (the key slice's outline of all segments)."""
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(volume, manifest, ctx, 0), identifier=SERIES_GROUP_IDENTIFIER
        ),
        referenced_region=region,
        algorithm_id=algorithm_id(manifest),
        measurements=[measurement(m) for m in measurements],
    )


def viewer_finding_group(
    finding: Finding, number: int, region: hd.sr.ImageRegion, volume: Volume, manifest: Manifest,
    ctx: ResultContext,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of finding `number` (1-based among those of no segment), on `region`."""
    probability = finding_probability(finding)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=finding_tracking_uid(volume, manifest, ctx, number), identifier=finding.value.meaning[:LO_MAX]
        ),
        referenced_region=region,
        algorithm_id=algorithm_id(manifest),
        measurements=[probability_measurement(probability)] if probability is not None else None,
        qualitative_evaluations=[qualitative_evaluation(finding, with_probability=False)],
    )


def viewer_measurement_groups(
    volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext, seg: Dataset | None
) -> list[Group]:
    segments = checked_segments(volume, result, seg)
    key = key_slice_index(volume, result)
    groups: list[Group] = []
    for segment in segments:
        ms, fs = of_segment(result.measurements, segment.number), of_segment(result.findings, segment.number)
        if ms or fs:
            groups.append(viewer_segment_group(segment, ms, fs, volume, key, manifest, ctx, seg))
    outline = all_segments_outline(union_on_slice(volume, segments, key))
    ms = of_segment(result.measurements, None)
    if ms:
        groups.append(viewer_series_group(ms, region_on(volume, key, outline), volume, manifest, ctx))
    groups += [
        viewer_finding_group(f, number, region_on(volume, key, outline), volume, manifest, ctx)
        for number, f in enumerate(of_segment(result.findings, None), start=1)
    ]
    groups += [detection_group(region, volume, manifest) for region in detection_regions(volume, result, manifest, ctx)]
    return groups


def build_viewer_sr(
    volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext, seg: Dataset | None
) -> Dataset:
    """The "viewer" TID 1500 report of `result`; `seg` is the SEG of its segments (None only when there are none).

    Its own series and SOP Instance UIDs (kinds sr-viewer-series and sr-viewer, the instance following the
    SEG's encoding), so a destination never gets the full and the viewer report under one UID.
    """
    groups = viewer_measurement_groups(volume, result, manifest, ctx, seg)
    return report_document(volume, result, groups, manifest, ctx, seg, VIEWER_LAYOUT)
