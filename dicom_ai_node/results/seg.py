"""PipelineResult segments -> a DICOM Segmentation in the source series' frame of reference.

Three encodings, chosen per destination by `seg_type`:

- ``binary``: one bit per pixel and segment; every viewer and PACS reads it.
- ``fractional``: one byte per pixel and segment, the probability scaled to 0..255 (probability maps).
- ``labelmap``: one value per pixel naming its segment (Label Map Segmentation Storage, 2024); compact for
  many segments, but segments must not overlap and older PACS do not know the SOP class.

A segment whose mask is all zero keeps its SegmentSequence item and gets no frames: the standard asks for a
frame per encoded plane, not per segment, and "looked for, found nothing" is a result. Keeping it also keeps
segment numbers and their TrackingUIDs stable, so SR groups (e.g. a volume of 0 mL) still resolve.

Each encoding is a different object, so it gets its own SOPInstanceUID (BINARY keeps the original one): two
destinations asking for different encodings never receive two objects under one UID.
"""
from __future__ import annotations

from copy import deepcopy

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
from dicom_ai_node.results.segments import derivation_sources, sorted_segments, source_series_uid, tracking_uid
from dicom_ai_node.results.uids import derive_result_uid

SEG_SERIES_NUMBER = 9001
SEG_TYPES = {
    "binary": hd.seg.SegmentationTypeValues.BINARY,
    "fractional": hd.seg.SegmentationTypeValues.FRACTIONAL,
    "labelmap": hd.seg.SegmentationTypeValues.LABELMAP,
}
# `part` of derive_result_uid per encoding; None keeps the UID BINARY SEGs had before encodings were chosen.
ENCODING_UID_PARTS = {"BINARY": None, "FRACTIONAL": 1, "LABELMAP": 2}


def encoding_uid_part(seg: Dataset | None) -> int | None:
    """The UID `part` of objects whose content depends on the SEG encoding (the SEG, the SR referencing it)."""
    return None if seg is None else ENCODING_UID_PARTS[str(seg.SegmentationType)]


def is_fractional(segments: list[Segment]) -> bool:
    """True when any mask holds values strictly between 0 and 1 (probabilities or occupancy)."""
    for segment in segments:
        if segment.mask.dtype != np.bool_:
            values = segment.mask.astype(np.float32)
            if np.any((values > 0) & (values < 1)):
                return True
    return False


def chosen_seg_type(segments: list[Segment], seg_type: str | None) -> hd.seg.SegmentationTypeValues:
    """`seg_type` as highdicom's enum; None chooses FRACTIONAL for probability masks, else BINARY."""
    if seg_type is None:
        return SEG_TYPES["fractional" if is_fractional(segments) else "binary"]
    if seg_type not in SEG_TYPES:
        raise ValueError(f"unknown seg_type {seg_type!r}; known: {', '.join(SEG_TYPES)}")
    return SEG_TYPES[seg_type]


def stacked_masks(segments: list[Segment], fractional: bool) -> np.ndarray:
    """(slices, rows, columns, segments): float in [0, 1] for FRACTIONAL, uint8 0/1 for BINARY."""
    if fractional:
        return np.stack([np.clip(s.mask.astype(np.float32), 0.0, 1.0) for s in segments], axis=-1)
    return np.stack([(s.mask > 0.5).astype(np.uint8) for s in segments], axis=-1)


def label_map(segments: list[Segment]) -> np.ndarray:
    """(slices, rows, columns) of segment numbers (0 background); ValueError where segments overlap."""
    labels = np.zeros(segments[0].mask.shape, dtype=np.uint8 if len(segments) < 256 else np.uint16)
    for segment in segments:
        inside = segment.mask > 0.5
        overlap = inside & (labels > 0)
        if overlap.any():
            other = int(labels[overlap][0])
            raise ValueError(
                f"segments {other} and {segment.number} overlap: a LABELMAP SEG holds one segment per pixel; "
                "ask for seg_type 'binary' or 'fractional'"
            )
        labels[inside] = segment.number
    return labels


def disjoint_labels(segments: list[Segment]) -> np.ndarray | None:
    """(slices, rows, columns) of segment numbers (0 background) when no two segments overlap, else None.

    For a BINARY SEG of segments numbered 1..n (sorted_segments), highdicom encodes this array exactly as
    the stack of masks (each frame is `labels == number` instead of `stack[..., number - 1]`, the same bits),
    and knows from its form that the segments do not overlap: it skips summing the stack over the segments,
    the costliest step of building a SEG.
    """
    labels = np.zeros(segments[0].mask.shape, dtype=np.uint8 if len(segments) < 256 else np.uint16)
    covered = np.zeros(labels.shape, dtype=np.bool_)
    for segment in segments:
        inside = segment.mask > 0.5
        if np.logical_and(inside, covered, out=np.empty_like(covered)).any():
            return None
        covered |= inside
        labels[inside] = segment.number
    return labels


def segment_pixels(segments: list[Segment], seg_type: hd.seg.SegmentationTypeValues) -> np.ndarray:
    if seg_type == hd.seg.SegmentationTypeValues.LABELMAP:
        return label_map(segments)
    if seg_type == hd.seg.SegmentationTypeValues.BINARY and len(segments) > 1:
        labels = disjoint_labels(segments)
        if labels is not None:
            return labels
    return stacked_masks(segments, fractional=seg_type == hd.seg.SegmentationTypeValues.FRACTIONAL)


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


def fit_projection_source(seg: Dataset, source: Dataset) -> None:
    """Make the SEG of a source without a frame of reference (a radiograph) what readers expect.

    Such a SEG maps to its source pixel for pixel through DerivationImageSequence. highdicom copies the
    source's PixelSpacing into a Pixel Measures item without SliceThickness, which its own reader refuses
    (and a DX/CR PixelSpacing may even be zero), so the item goes; and PatientOrientation, type 2C without
    a plane orientation, is copied from the source (empty when unknown).
    """
    if "FrameOfReferenceUID" in source:
        return
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared:
        del shared.PixelMeasuresSequence
    if "PatientOrientation" in source:
        seg["PatientOrientation"] = deepcopy(source["PatientOrientation"])
    else:
        seg.PatientOrientation = None


def build_seg(
    volume: Volume,
    result: PipelineResult,
    manifest: Manifest,
    ctx: ResultContext,
    seg_type: str | None = None,
) -> Dataset:
    """The Segmentation of `result`'s segments, one frame per non-empty source slice (and segment).

    `seg_type` is "binary", "fractional" or "labelmap"; None picks fractional for probability masks, else
    binary.
    """
    segments = sorted_segments(result, volume)
    if not segments:
        raise ValueError(f"series {source_series_uid(volume)}: the result has no segments to encode as SEG")
    encoding = chosen_seg_type(segments, seg_type)
    series_uid = source_series_uid(volume)
    source_images, order = derivation_sources(volume)  # a multi-frame source: its frames in stored order
    with no_person_name_warnings():
        seg = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=segment_pixels(segments, encoding)[order],
            segmentation_type=encoding,
            segment_descriptions=[segment_description(s, volume, manifest, ctx) for s in segments],
            series_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, "seg-series"
            ),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, "seg",
                part=ENCODING_UID_PARTS[encoding.value],
            ),
            instance_number=1,
            fractional_type=(
                hd.seg.SegmentationFractionalTypeValues.PROBABILITY
                if encoding == hd.seg.SegmentationTypeValues.FRACTIONAL else None
            ),
            # CS: upper-case letters, digits, space, underscore; pipeline names are [a-z0-9_].
            content_label=manifest.name.upper()[:16],
            content_description=with_use_warning(manifest.title, manifest),
            # Type 2 and meant for a person; the algorithm is named by SegmentAlgorithmName and the equipment.
            content_creator_name=None,
            omit_empty_frames=True,
            series_description=series_description(manifest, "SEG"),
            **equipment_kwargs(manifest, ctx),
        )
    fit_projection_source(seg, volume.sources[0])
    copy_patient_study(seg, volume.sources[0])
    copy_body_part(seg, volume.sources[0])
    add_provenance(seg, manifest, ctx)
    return seg
