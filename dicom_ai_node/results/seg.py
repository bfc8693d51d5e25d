"""PipelineResult segments -> a DICOM Segmentation in the source series' frame of reference."""
from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Manifest, PipelineResult, Segment
from dicom_ai_node.results.coding import coded
from dicom_ai_node.results.identity import copy_body_part, copy_patient_study, no_person_name_warnings
from dicom_ai_node.results.provenance import (
    LO_MAX,
    ResultContext,
    add_provenance,
    equipment_kwargs,
    series_description,
    with_use_warning,
)
from dicom_ai_node.results.segments import sorted_segments, source_series_uid, tracking_uid
from dicom_ai_node.results.uids import derive_result_uid

SEG_SERIES_NUMBER = 9001


def is_fractional(segments: list[Segment]) -> bool:
    """True when any mask holds values strictly between 0 and 1 (probabilities or occupancy)."""
    for segment in segments:
        if segment.mask.dtype != np.bool_:
            values = segment.mask.astype(np.float32)
            if np.any((values > 0) & (values < 1)):
                return True
    return False


def stacked_masks(segments: list[Segment], fractional: bool) -> np.ndarray:
    """(slices, rows, columns, segments): float in [0, 1] for FRACTIONAL, uint8 0/1 for BINARY."""
    if fractional:
        return np.stack([np.clip(s.mask.astype(np.float32), 0.0, 1.0) for s in segments], axis=-1)
    return np.stack([(s.mask > 0.5).astype(np.uint8) for s in segments], axis=-1)


def segment_description(
    segment: Segment, volume: Volume, manifest: Manifest, ctx: ResultContext
) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=manifest.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=manifest.version,
        source=ctx.manufacturer,
    )
    description = hd.seg.SegmentDescription(
        segment_number=segment.number,
        segment_label=segment.label[:LO_MAX],
        segmented_property_category=coded(segment.category),
        segmented_property_type=coded(segment.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=tracking_uid(volume, manifest, ctx, segment.number),
        tracking_id=segment.label[:LO_MAX],
        anatomic_regions=[coded(segment.anatomic_region)] if segment.anatomic_region else None,
        display_color=hd.color.CIELabColor.from_rgb(*segment.color_rgb) if segment.color_rgb else None,
    )
    if segment.laterality is not None:
        # Laterality qualifies the segmented property type (e.g. Lung + Right), CID 244.
        description.SegmentedPropertyTypeModifierCodeSequence = [coded(segment.laterality)]
    return description


def build_seg(volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext) -> Dataset:
    """The Segmentation of `result`'s segments, one frame per non-empty source slice and segment."""
    segments = sorted_segments(result, volume)
    if not segments:
        raise ValueError(f"series {source_series_uid(volume)}: the result has no segments to encode as SEG")
    fractional = is_fractional(segments)
    series_uid = source_series_uid(volume)
    with no_person_name_warnings():
        seg = hd.seg.Segmentation(
            source_images=list(volume.sources),
            pixel_array=stacked_masks(segments, fractional),
            segmentation_type=(
                hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY
            ),
            segment_descriptions=[segment_description(s, volume, manifest, ctx) for s in segments],
            series_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, "seg-series"
            ),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=derive_result_uid(ctx.org_root, series_uid, manifest.name, manifest.version, "seg"),
            instance_number=1,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY if fractional else None,
            # CS: upper-case letters, digits, space, underscore; pipeline names are [a-z0-9_].
            content_label=manifest.name.upper()[:16],
            content_description=with_use_warning(manifest.title, manifest),
            # Type 2 and meant for a person; the algorithm is named by SegmentAlgorithmName and the equipment.
            content_creator_name=None,
            omit_empty_frames=True,
            series_description=series_description(manifest, "SEG"),
            **equipment_kwargs(manifest, ctx),
        )
    copy_patient_study(seg, volume.sources[0])
    copy_body_part(seg, volume.sources[0])
    add_provenance(seg, manifest, ctx)
    return seg
