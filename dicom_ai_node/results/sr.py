"""PipelineResult measurements and findings -> a TID 1500 Measurement Report (Comprehensive 3D SR).

This is the "full" SR profile; sr_viewer.py lays the same result out for viewers that draw only groups with
image coordinates (the "viewer" profile), from the parts defined here. Layout, in this order:

- one TID 1411 volumetric group per segment that has measurements or findings, referencing the segment in
  the SEG (and sharing its TrackingUID);
- one TID 1501 group for series-level measurements (those of no segment), sourced on the key slice;
- one TID 1501 group per finding of no segment (a classification), with its own tracking identifier and
  UID, its coded answer and probability, sourced on the key slice (for a radiograph: the image);
- one TID 1410 planar group per detection region (box or key point) with its SCOORD on the source image,
  what OHIF draws, and the probability as a NUM measurement.

The observer is the pipeline as a device; the report is left UNVERIFIED and PARTIAL because no person has
reviewed it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Finding, Manifest, Measurement, PipelineResult, Segment
from dicom_ai_node.results.coding import coded
from dicom_ai_node.results.detections import Region, detection_regions
from dicom_ai_node.results.identity import copy_patient_study, no_person_name_warnings
from dicom_ai_node.results.provenance import (
    LO_MAX,
    ResultContext,
    add_provenance,
    device_uid,
    equipment_kwargs,
    series_description,
)
from dicom_ai_node.results.seg import encoding_uid_part
from dicom_ai_node.results.segments import (
    frame_number,
    key_slice_index,
    sorted_segments,
    source_series_uid,
    tracking_uid,
)
from dicom_ai_node.results.uids import derive_result_uid

SR_SERIES_NUMBER = 9002
SERIES_GROUP_IDENTIFIER = "Series-level measurements"
# LOINC "CT Chest"; CID 100 is extensible and its only CT entry is "CT unspecified body region".
CT_CHEST = Code("24627-2", "LN", "CT Chest")
PROCEDURES_BY_MODALITY = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
    "CR": codes.LN.XRUnspecifiedBodyRegion,
    "DX": codes.LN.XRUnspecifiedBodyRegion,
}
PROBABILITY_UNIT = Code("1", "UCUM", "no units")


@dataclass(frozen=True)
class Layout:
    """One SR profile's place among the results: its UID kinds and what its SeriesDescription calls it."""

    series_uid_kind: str
    instance_uid_kind: str
    description: str


# Both layouts share the SR series number (it names the result kind, see kinds.py) but not their series:
# a destination that takes both sees two SR series, told apart by their descriptions.
FULL_LAYOUT = Layout("sr-series", "sr", "SR")

Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


def procedure_reported(source: Dataset) -> Code:
    """TID 1500 Procedure Reported from the source's Modality and BodyPartExamined."""
    modality = str(source.get("Modality", ""))
    if modality == "CT" and str(source.get("BodyPartExamined", "")).upper() in ("CHEST", "LUNG", "THORAX"):
        return CT_CHEST
    return PROCEDURES_BY_MODALITY.get(modality, codes.SCT.ImagingProcedure)


def observation_context(manifest: Manifest, ctx: ResultContext) -> hd.sr.ObservationContext:
    """The pipeline as a device observer (TID 1004), with the same DeviceUID as its Contributing Equipment."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(manifest, ctx),
        name=ctx.node_name,
        manufacturer_name=ctx.manufacturer,
        model_name=manifest.name,
        serial_number=ctx.device_serial,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def measurement(
    m: Measurement, sources: Sequence[hd.sr.SourceImageForMeasurement] | None = None
) -> hd.sr.Measurement:
    """TID 300 measurement of `m`, INFERRED FROM `sources` when given."""
    if m.unit.scheme != "UCUM":
        raise ValueError(f"measurement {m.name.meaning!r}: unit scheme {m.unit.scheme!r} is not UCUM")
    return hd.sr.Measurement(
        name=coded(m.name),
        value=float(m.value),
        unit=coded(m.unit),
        method=coded(m.method) if m.method else None,
        referenced_images=sources,
    )


def finding_probability(finding: Finding) -> float | None:
    """The finding's probability, checked to lie in [0, 1]."""
    if finding.probability is not None and not 0.0 <= finding.probability <= 1.0:
        raise ValueError(f"finding {finding.value.meaning!r}: probability {finding.probability} is not in [0, 1]")
    return finding.probability


def qualitative_evaluation(finding: Finding, with_probability: bool = True) -> hd.sr.QualitativeEvaluation:
    """A coded finding; its probability (unless left to the caller) hangs off the CODE item as a HAS PROPERTIES
    NUM."""
    evaluation = hd.sr.QualitativeEvaluation(name=coded(finding.name), value=coded(finding.value))
    probability = finding_probability(finding)
    if with_probability and probability is not None:
        evaluation[0].ContentSequence = hd.sr.ContentSequence([
            hd.sr.NumContentItem(
                name=codes.DCM.Probability,
                value=float(probability),
                unit=PROBABILITY_UNIT,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            )
        ])
    return evaluation


def probability_measurement(probability: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.DCM.Probability, value=float(probability), unit=PROBABILITY_UNIT)


def algorithm_id(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=manifest.name, version=manifest.version)


def finding_sites(segment: Segment) -> list[hd.sr.FindingSite] | None:
    if segment.anatomic_region is None:
        return None
    laterality = coded(segment.laterality) if segment.laterality else None
    return [hd.sr.FindingSite(coded(segment.anatomic_region), laterality=laterality)]


def finding_tracking_uid(volume: Volume, manifest: Manifest, ctx: ResultContext, number: int) -> str:
    """TrackingUID of the group of finding `number` (1-based among the findings of no segment)."""
    return derive_result_uid(
        ctx.org_root, source_series_uid(volume), manifest.name, manifest.version, "finding-tracking", number
    )


def of_segment(items: Sequence[Measurement | Finding], number: int | None) -> list:
    """The measurements or findings of segment `number` (None: of no segment), in order."""
    return [item for item in items if item.segment_number == number]


def segment_group(
    segment: Segment,
    measurements: Sequence[Measurement],
    findings: Sequence[Finding],
    volume: Volume,
    manifest: Manifest,
    ctx: ResultContext,
    seg: Dataset,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one segment, pointing at that segment of the SEG and at the source series."""
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(volume, manifest, ctx, segment.number), identifier=segment.label[:LO_MAX]
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment.number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid(volume)),
        ),
        finding_type=coded(segment.type),
        finding_category=coded(segment.category),
        finding_sites=finding_sites(segment),
        algorithm_id=algorithm_id(manifest),
        measurements=[measurement(m) for m in measurements] or None,
        qualitative_evaluations=[qualitative_evaluation(f) for f in findings] or None,
    )


def frames_of_slice(volume: Volume, index: int) -> list[int] | None:
    """referenced_frame_numbers of slice `index`: its frame in a multi-frame source, None for single-frame."""
    number = frame_number(volume, index)
    return None if number is None else [number]


def region_source(volume: Volume, index: int) -> hd.sr.SourceImageForRegion:
    """The source image (and frame, of a multi-frame source) a region on slice `index` is SELECTED FROM."""
    source = volume.sources[index]
    return hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID,
                                      referenced_frame_numbers=frames_of_slice(volume, index))


def key_source_image(volume: Volume, result: PipelineResult) -> hd.sr.SourceImageForMeasurementGroup:
    index = key_slice_index(volume, result)
    key = volume.sources[index]
    return hd.sr.SourceImageForMeasurementGroup(key.SOPClassUID, key.SOPInstanceUID,
                                                referenced_frame_numbers=frames_of_slice(volume, index))


def series_group(
    measurements: Sequence[Measurement],
    volume: Volume,
    result: PipelineResult,
    manifest: Manifest,
    ctx: ResultContext,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for measurements of no segment; it names the key slice as its source image."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(volume, manifest, ctx, 0), identifier=SERIES_GROUP_IDENTIFIER
        ),
        algorithm_id=algorithm_id(manifest),
        measurements=[measurement(m) for m in measurements],
        source_images=[key_source_image(volume, result)],
    )


def finding_group(
    finding: Finding,
    number: int,
    volume: Volume,
    result: PipelineResult,
    manifest: Manifest,
    ctx: ResultContext,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of finding `number` (1-based among those of no segment): a tracked classification."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=finding_tracking_uid(volume, manifest, ctx, number), identifier=finding.value.meaning[:LO_MAX]
        ),
        algorithm_id=algorithm_id(manifest),
        qualitative_evaluations=[qualitative_evaluation(finding)],
        source_images=[key_source_image(volume, result)],
    )


def detection_group(
    region: Region, volume: Volume, manifest: Manifest
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one detection region: its SCOORD on the source slice, finding type and probability."""
    probability = region.detection.probability
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=region.tracking_uid, identifier=region.tracking_id),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues(region.graphic_type),
            graphic_data=region.data,
            source_image=region_source(volume, region.detection.slice_index),
        ),
        finding_type=coded(region.detection.finding),
        algorithm_id=algorithm_id(manifest),
        measurements=[probability_measurement(probability)] if probability is not None else None,
    )


def checked_segments(volume: Volume, result: PipelineResult, seg: Dataset | None) -> list[Segment]:
    """The result's segments in order, once every measurement and finding names one of them (or none) and
    their SEG is at hand for the report to reference."""
    segments = sorted_segments(result, volume)
    numbers = {s.number for s in segments}
    for item in (*result.measurements, *result.findings):
        if item.segment_number is not None and item.segment_number not in numbers:
            raise ValueError(f"{item.name.meaning!r} refers to segment {item.segment_number}, which does not exist")
    if segments and seg is None:
        raise ValueError("the result has segments: the SR must reference their SEG, so pass it")
    return segments


def measurement_groups(
    volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext, seg: Dataset | None
) -> list[Group]:
    segments = checked_segments(volume, result, seg)
    groups: list[Group] = []
    for segment in segments:
        ms, fs = of_segment(result.measurements, segment.number), of_segment(result.findings, segment.number)
        if ms or fs:
            groups.append(segment_group(segment, ms, fs, volume, manifest, ctx, seg))
    ms = of_segment(result.measurements, None)
    if ms:
        groups.append(series_group(ms, volume, result, manifest, ctx))
    fs = of_segment(result.findings, None)
    groups += [finding_group(f, number, volume, result, manifest, ctx) for number, f in enumerate(fs, start=1)]
    groups += [detection_group(region, volume, manifest) for region in detection_regions(volume, result, manifest, ctx)]
    return groups


def has_report_content(result: PipelineResult) -> bool:
    """Whether TID 1500 has a group to hold (it needs at least one)."""
    return bool(result.measurements or result.findings or result.detections)


def build_sr(
    volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext, seg: Dataset | None
) -> Dataset:
    """The TID 1500 report of `result`; `seg` is the SEG of its segments (None only when there are none)."""
    return report_document(volume, result, measurement_groups(volume, result, manifest, ctx, seg), manifest, ctx,
                           seg, FULL_LAYOUT)


def report_document(
    volume: Volume,
    result: PipelineResult,
    groups: Sequence[Group],
    manifest: Manifest,
    ctx: ResultContext,
    seg: Dataset | None,
    layout: Layout,
) -> Dataset:
    """The Comprehensive 3D SR holding `groups`, in the series and under the UIDs of `layout`.

    Its SOPInstanceUID follows the SEG's encoding, as the SEG's own does: the report names that SEG.
    """
    if not has_report_content(result):
        raise ValueError(
            f"series {source_series_uid(volume)}: the result has no measurements, findings or detections to report"
        )
    source = volume.sources[0]
    series_uid = source_series_uid(volume)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(manifest, ctx),
        procedure_reported=procedure_reported(source),
        imaging_measurements=list(groups),
        title=codes.cid7021.ImagingMeasurementReport,
    )
    with no_person_name_warnings():
        sr = hd.sr.Comprehensive3DSR(
            # Sources first: highdicom takes patient/study from evidence[0] and its acquisition equipment. Each
            # instance once: a multi-frame source holds many slices.
            evidence=[*volume.source_instances, *([seg] if seg is not None else [])],
            content=report[0],
            series_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, layout.series_uid_kind
            ),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, layout.instance_uid_kind,
                part=encoding_uid_part(seg),
            ),
            instance_number=1,
            is_complete=False,
            is_final=False,
            is_verified=False,
            series_description=series_description(manifest, layout.description),
            **equipment_kwargs(manifest, ctx),
        )
    copy_patient_study(sr, source)
    add_provenance(sr, manifest, ctx)
    return sr
