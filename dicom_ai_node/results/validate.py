"""The "Standards every result meets" of ARCHITECTURE.md as code: a pre-dispatch gate and a test oracle.

`check_result` returns human-readable problems, each naming the tag at fault and never a tag's value (the
values are PHI); an empty list means the object passes. `gate` runs it over all objects of one result,
optionally with dciodvfy, and raises ResultValidationError listing every problem.
"""
from __future__ import annotations

import concurrent.futures as cf
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID

from dicom_ai_node.pipeline import Manifest
from dicom_ai_node.results.identity import PATIENT_STUDY_KEYWORDS, PATIENT_STUDY_TYPE2
from dicom_ai_node.results.provenance import NOT_FOR_DIAGNOSTIC_USE
from dicom_ai_node.results.writer import encode, save

LABEL_MAP_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", LABEL_MAP_SEG_CLASS}
COMPREHENSIVE_3D_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # TID 1500 reports (sr.py, sr_viewer.py)
COMPREHENSIVE_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # "no result" reports (no_result.py), TID 2000
SR_CLASSES = {COMPREHENSIVE_3D_SR_CLASS, COMPREHENSIVE_SR_CLASS}
SC_CLASSES = {"1.2.840.10008.5.1.4.1.1.7"}
PM_CLASSES = {"1.2.840.10008.5.1.4.1.1.30"}
PR_CLASSES = {"1.2.840.10008.5.1.4.1.1.11.1"}  # Grayscale Softcopy Presentation State
KINDS_BY_CLASSES = (("SEG", SEG_CLASSES), ("SR", SR_CLASSES), ("SC", SC_CLASSES), ("PM", PM_CLASSES),
                    ("PR", PR_CLASSES))
SOURCE_IMAGE_FOR_PROCESSING = "121322"
OBSERVER_TYPE, DEVICE, DEVICE_OBSERVER_UID = "121005", "121007", "121012"
REFERENCED_SEGMENT = "121191"
IMAGING_MEASUREMENTS, MEASUREMENT_GROUP = "126010", "125007"
# The no-result report: sections Findings / Conclusions, reasons as Finding TEXT items, and the coded
# statement Summary of Analyses = Not Attempted.
FINDINGS, FINDING, CONCLUSIONS = "59776-5", "121071", "55110-1"  # LN, DCM, LN (CID 7001, 7002)
SUMMARY_OF_ANALYSES, NOT_ATTEMPTED = "111065", "111225"
DCIODVFY_TIMEOUT_S = 120
# dicom3tools 2022 predates Label Map Segmentation (2024). In a label map it finds no IOD and takes the
# background segment 0 for a numbering error; in an SR referencing one it refuses the segment number of a
# class it does not know as a segmentation. Those lines only date dciodvfy; every other line (VRs, value
# multiplicities, the SR's own IOD) still counts.
LABEL_MAP_LINES = (
    re.compile(r"^Error - Information Object Not found$"),
    re.compile(r"SegmentNumber not monotonically increasing from one .* with SegmentNumber of 0$"),
)
LABEL_MAP_REFERENCE_LINES = (
    re.compile(r"ReferencedSegmentNumber\(0062,000b\)> - Shall not be present for Referenced SOP Class that is "
               r"not segmentation$"),
)


class ResultValidationError(ValueError):
    """Result objects that must not leave the node; `problems` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s) in result objects:\n" + "\n".join(problems))
        self.problems = problems


def tag_name(keyword: str) -> str:
    """'PatientName (0010,0010)': how every problem names its tag."""
    tag = tag_for_keyword(keyword)
    return f"{keyword} {Tag(tag)}" if tag is not None else keyword


def result_kind(ds: Dataset) -> str:
    """SEG, SR, SC, PM (Parametric Map) or PR (presentation state) by SOPClassUID; '' for another class."""
    sop_class = str(ds.get("SOPClassUID", ""))
    for kind, classes in KINDS_BY_CLASSES:
        if sop_class in classes:
            return kind
    return ""


def encoded_value(ds: Dataset, keyword: str) -> bytes:
    """The element's value as encoded in a file, in `ds`'s character set; b'' when absent."""
    if keyword not in ds:
        return b""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_data_element(fp, ds[keyword], convert_encodings(ds.get("SpecificCharacterSet", "ISO_IR 6")))
    return fp.getvalue()[8:]  # implicit VR: 4 bytes tag, 4 bytes length, then the value


def code_values(sequence: object) -> list[str]:
    return [str(item.get("CodeValue", "")) for item in (sequence or [])]


def content_items(items: Sequence[Dataset]) -> Iterator[Dataset]:
    """Every content item of an SR tree, depth first."""
    for item in items:
        yield item
        yield from content_items(item.get("ContentSequence", []))


def concept_code(item: Dataset) -> str:
    return (code_values(item.get("ConceptNameCodeSequence")) or [""])[0]


# 1. Patient and study tags byte-equal to the source.
def identity_problems(ds: Dataset, source: Dataset) -> list[str]:
    problems = []
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in PATIENT_STUDY_TYPE2 and keyword not in ds:
            problems.append(f"{tag_name(keyword)} is missing (type 2)")
        elif encoded_value(ds, keyword) != encoded_value(source, keyword):
            problems.append(f"{tag_name(keyword)} is not byte-equal to the source's")
    return problems


# 2. New Series/SOP Instance UIDs, valid, equal to the file meta.
def uid_problems(ds: Dataset, sources: Sequence[Dataset]) -> list[str]:
    problems = []
    source_series = {str(s.SeriesInstanceUID) for s in sources}
    source_sops = {str(s.SOPInstanceUID) for s in sources}
    for keyword, taken in (("SeriesInstanceUID", source_series), ("SOPInstanceUID", source_sops)):
        uid = str(ds.get(keyword, ""))
        if not UID(uid).is_valid:
            problems.append(f"{tag_name(keyword)} is missing or not a valid UID")
        elif uid in taken:
            problems.append(f"{tag_name(keyword)} {uid} reuses a source UID")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        problems.append(f"file meta is missing ({tag_name('TransferSyntaxUID')} absent)")
        return problems
    if meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID"):
        problems.append(f"{tag_name('MediaStorageSOPInstanceUID')} differs from {tag_name('SOPInstanceUID')}")
    if meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID"):
        problems.append(f"{tag_name('MediaStorageSOPClassUID')} differs from {tag_name('SOPClassUID')}")
    return problems


# 3. References resolve to the source instances (and, for a multi-frame source, to one of its frames).
def frame_count(source: Dataset) -> int:
    return int(source.get("NumberOfFrames") or 1)


def frame_numbers_named(ref: Dataset) -> list[int]:
    """The ReferencedFrameNumber values of one reference item (none: [])."""
    value = ref.get("ReferencedFrameNumber")
    if value is None or value == "":
        return []
    return [int(v) for v in value] if isinstance(value, MultiValue) else [int(value)]


def source_index(sources: Sequence[Dataset]) -> dict[str, Dataset]:
    """SOPInstanceUID -> the first source instance with it: one lookup per reference, not a scan."""
    index: dict[str, Dataset] = {}
    for source in sources:
        index.setdefault(str(source.SOPInstanceUID), source)
    return index


def frame_problems(
    ref: Dataset, sources: Sequence[Dataset] | Mapping[str, Dataset], where: str, frame_required: bool = False,
) -> list[str]:
    """Problems of the frames `ref` names in the source instance it references: each within 1..NumberOfFrames;
    with `frame_required`, a reference to a multi-frame source must name its frame. A reference to no source
    instance is reported by the caller. `sources` may be given as their source_index."""
    uid = str(ref.get("ReferencedSOPInstanceUID"))
    source = (sources if isinstance(sources, Mapping) else source_index(sources)).get(uid)
    if source is None:
        return []
    count = frame_count(source)
    numbers = frame_numbers_named(ref)
    if frame_required and count > 1 and not numbers:
        return [f"{where}: {tag_name('ReferencedFrameNumber')} is missing for multi-frame source instance {uid}"]
    outside = [n for n in numbers if not 1 <= n <= count]
    if outside:
        return [f"{where}: {tag_name('ReferencedFrameNumber')} {outside[0]} is not a frame of source instance "
                f"{uid} (1..{count})"]
    return []


def referenced_series_problems(ds: Dataset, sources: Sequence[Dataset], instances_keyword: str) -> list[str]:
    """ReferencedSeriesSequence names the source series, and its `instances_keyword` items source instances."""
    problems = []
    series_uid = str(sources[0].SeriesInstanceUID)
    index = source_index(sources)
    series_items = [i for i in ds.get("ReferencedSeriesSequence", []) if i.get("SeriesInstanceUID") == series_uid]
    if not series_items:
        problems.append(f"{tag_name('ReferencedSeriesSequence')} does not reference source series {series_uid}")
    for item in series_items:
        for ref in item.get(instances_keyword, []):
            if ref.get("ReferencedSOPInstanceUID") not in index:
                problems.append(f"{tag_name(instances_keyword)} names "
                                f"{ref.get('ReferencedSOPInstanceUID')}, not a source instance")
            problems += frame_problems(ref, index, tag_name(instances_keyword))
    return problems


def frame_reference_problems(ds: Dataset, sources: Sequence[Dataset]) -> list[str]:
    """SEG and Parametric Map: the series reference, and every frame derived from a source instance."""
    problems = referenced_series_problems(ds, sources, "ReferencedInstanceSequence")
    index = source_index(sources)
    frames = ds.get("PerFrameFunctionalGroupsSequence", [])
    if not frames:
        problems.append(f"{tag_name('PerFrameFunctionalGroupsSequence')} is missing or empty")
    for number, frame in enumerate(frames, start=1):
        refs = [ref for derivation in frame.get("DerivationImageSequence", [])
                for ref in derivation.get("SourceImageSequence", [])]
        if not refs:
            problems.append(f"frame {number}: {tag_name('DerivationImageSequence')} > "
                            f"{tag_name('SourceImageSequence')} is missing")
        for ref in refs:
            if ref.get("ReferencedSOPInstanceUID") not in index:
                problems.append(f"frame {number}: {tag_name('SourceImageSequence')} names "
                                f"{ref.get('ReferencedSOPInstanceUID')}, not a source instance")
            problems += frame_problems(ref, index, f"frame {number}: {tag_name('SourceImageSequence')}",
                                       frame_required=True)
            if SOURCE_IMAGE_FOR_PROCESSING not in code_values(ref.get("PurposeOfReferenceCodeSequence")):
                problems.append(f"frame {number}: {tag_name('PurposeOfReferenceCodeSequence')} is not "
                                f"(DCM {SOURCE_IMAGE_FOR_PROCESSING})")
    return problems


def sr_reference_problems(ds: Dataset, sources: Sequence[Dataset], seg: Dataset | None) -> list[str]:
    keyword = "CurrentRequestedProcedureEvidenceSequence"
    listed: dict[str, set[str]] = {}
    for study in ds.get(keyword, []):
        for series in study.get("ReferencedSeriesSequence", []):
            sops = {str(i.get("ReferencedSOPInstanceUID")) for i in series.get("ReferencedSOPSequence", [])}
            listed.setdefault(str(series.get("SeriesInstanceUID")), set()).update(sops)
    problems = []
    series_uid = str(sources[0].SeriesInstanceUID)
    missing = {str(s.SOPInstanceUID) for s in sources} - listed.get(series_uid, set())
    if series_uid not in listed:
        problems.append(f"{tag_name(keyword)} does not list source series {series_uid}")
    elif missing:
        problems.append(f"{tag_name(keyword)} lacks {len(missing)} instance(s) of source series {series_uid}")
    if seg is not None and str(seg.SOPInstanceUID) not in set().union(*listed.values()):
        problems.append(f"{tag_name(keyword)} does not list the SEG {seg.SOPInstanceUID}")
    return problems


def sr_image_reference_problems(ds: Dataset, sources: Sequence[Dataset], seg: Dataset | None) -> list[str]:
    """Every IMAGE content item (sources of groups, SCOORD regions) names a source instance or the SEG."""
    known = {str(s.SOPInstanceUID) for s in sources} | ({str(seg.SOPInstanceUID)} if seg is not None else set())
    problems = []
    index = source_index(sources)
    for item in content_items(ds.get("ContentSequence", [])):
        if item.get("ValueType") != "IMAGE":
            continue
        for ref in item.get("ReferencedSOPSequence", []):
            if str(ref.get("ReferencedSOPInstanceUID")) not in known:
                problems.append(f"IMAGE content item: {tag_name('ReferencedSOPInstanceUID')} "
                                f"{ref.get('ReferencedSOPInstanceUID')} is not a source instance")
            problems += frame_problems(ref, index, "IMAGE content item")
    return problems


def pr_reference_problems(ds: Dataset, sources: Sequence[Dataset]) -> list[str]:
    """The presentation state applies to source images, and each annotation sits on one of them."""
    problems = referenced_series_problems(ds, sources, "ReferencedImageSequence")
    index = source_index(sources)
    annotations = ds.get("GraphicAnnotationSequence", [])
    if not annotations:
        problems.append(f"{tag_name('GraphicAnnotationSequence')} is missing or empty")
    for number, annotation in enumerate(annotations, start=1):
        refs = annotation.get("ReferencedImageSequence", [])
        if not refs:
            problems.append(f"annotation {number}: {tag_name('ReferencedImageSequence')} is missing or empty")
        problems += [f"annotation {number}: {tag_name('ReferencedImageSequence')} names "
                     f"{ref.get('ReferencedSOPInstanceUID')}, not a source instance"
                     for ref in refs if ref.get("ReferencedSOPInstanceUID") not in index]
        for ref in refs:
            problems += frame_problems(ref, index, f"annotation {number}: {tag_name('ReferencedImageSequence')}")
    return problems


def sc_reference_problems(ds: Dataset, sources: Sequence[Dataset]) -> list[str]:
    refs = ds.get("SourceImageSequence", [])
    if not refs:
        return [f"{tag_name('SourceImageSequence')} is missing or empty"]
    index = source_index(sources)
    problems = [
        f"{tag_name('SourceImageSequence')} names {ref.get('ReferencedSOPInstanceUID')}, not a source instance"
        for ref in refs
        if ref.get("ReferencedSOPInstanceUID") not in index
    ]
    for ref in refs:
        problems += frame_problems(ref, index, tag_name("SourceImageSequence"), frame_required=True)
    return problems


# 4. Derived and machine-made, and said so.
def flag_problems(ds: Dataset, kind: str, manifest: Manifest | None) -> list[str]:
    problems = []
    if kind in ("SEG", "SC", "PM") and (list(ds.get("ImageType", [])) or [""])[0] != "DERIVED":
        problems.append(f"{tag_name('ImageType')} value 1 is not DERIVED")
    if kind == "SR" and ds.get("VerificationFlag") != "UNVERIFIED":
        problems.append(f"{tag_name('VerificationFlag')} is not UNVERIFIED")
    if kind == "SC":
        if ds.get("ConversionType") != "WSD":
            problems.append(f"{tag_name('ConversionType')} is not WSD")
        if ds.get("BurnedInAnnotation") != "YES":
            problems.append(f"{tag_name('BurnedInAnnotation')} is not YES")
    description = str(ds.get("SeriesDescription", ""))
    if not re.search(r"\bAI\b", description):
        problems.append(f"{tag_name('SeriesDescription')} does not say AI")
    if manifest is not None and manifest.model_card.not_for_diagnostic_use \
            and NOT_FOR_DIAGNOSTIC_USE not in description.lower():
        problems.append(f"{tag_name('SeriesDescription')} does not say '{NOT_FOR_DIAGNOSTIC_USE}' "
                        "although the model card does")
    return problems


# 5. Provenance (IHE AI Results).
def is_pipeline_item(item: Dataset, manifest: Manifest | None) -> bool:
    if not UID(str(item.get("DeviceUID", ""))).is_valid:
        return False
    if manifest is None:
        return True
    versions = item.get("SoftwareVersions", [])
    versions = [versions] if isinstance(versions, str) else list(versions)
    return item.get("ManufacturerModelName") == manifest.name and manifest.version in versions


def provenance_problems(ds: Dataset, kind: str, manifest: Manifest | None) -> list[str]:
    problems = [f"{tag_name(k)} is missing or empty"
                for k in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions") if not ds.get(k)]
    if manifest is not None and ds.get("ManufacturerModelName") and ds.ManufacturerModelName != manifest.name:
        problems.append(f"{tag_name('ManufacturerModelName')} is not the pipeline name {manifest.name}")
    if not any(is_pipeline_item(item, manifest) for item in ds.get("ContributingEquipmentSequence", [])):
        problems.append(f"{tag_name('ContributingEquipmentSequence')} has no item for the pipeline "
                        f"(ManufacturerModelName, SoftwareVersions and a valid {tag_name('DeviceUID')})")
    if kind == "SEG":
        for item in ds.get("SegmentSequence", []):
            number = item.get("SegmentNumber")
            if item.get("SegmentAlgorithmType") != "AUTOMATIC":
                problems.append(f"segment {number}: {tag_name('SegmentAlgorithmType')} is not AUTOMATIC")
            name = item.get("SegmentAlgorithmName")
            if not name or (manifest is not None and name != manifest.name):
                problems.append(f"segment {number}: {tag_name('SegmentAlgorithmName')} is not the pipeline name")
    if kind == "SR":
        root = ds.get("ContentSequence", [])
        is_device = any(concept_code(i) == OBSERVER_TYPE and DEVICE in code_values(i.get("ConceptCodeSequence"))
                        for i in root)
        has_uid = any(concept_code(i) == DEVICE_OBSERVER_UID and UID(str(i.get("UID", ""))).is_valid for i in root)
        if not (is_device and has_uid):
            problems.append(f"{tag_name('ContentSequence')}: observer context is not a device "
                            f"(DCM {OBSERVER_TYPE} = DCM {DEVICE} with a DCM {DEVICE_OBSERVER_UID} UID)")
    return problems


# 6. SEG and Parametric Map geometry, SEG coding; SR template and segment references.
def frame_of_reference_problems(ds: Dataset, source: Dataset) -> list[str]:
    if ds.get("FrameOfReferenceUID") != source.get("FrameOfReferenceUID"):
        return [f"{tag_name('FrameOfReferenceUID')} differs from the source's"]
    return []


def seg_content_problems(ds: Dataset, source: Dataset) -> list[str]:
    problems = frame_of_reference_problems(ds, source)
    # A label map's segment 0 is its background, coded DCM "Background" by the standard.
    segments = [item for item in ds.get("SegmentSequence", []) if int(item.get("SegmentNumber", 0)) > 0]
    if not segments:
        problems.append(f"{tag_name('SegmentSequence')} is missing or empty")
    for item in segments:
        for keyword in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
            codes = item.get(keyword, [])
            if not codes or not codes[0].get("CodeValue") or not codes[0].get("CodeMeaning") \
                    or codes[0].get("CodingSchemeDesignator") != "SCT":
                problems.append(f"segment {item.get('SegmentNumber')}: {tag_name(keyword)} is not a SNOMED CT code")
    return problems


def segment_numbers_named(ref: Dataset) -> list[int]:
    """The ReferencedSegmentNumber values of one ReferencedSOPSequence item (none: [])."""
    value = ref.get("ReferencedSegmentNumber")
    if value is None or value == "":
        return []
    return [int(v) for v in value] if isinstance(value, MultiValue) else [int(value)]


def names_segments_of(ref: Dataset, segment_numbers: set[int]) -> bool:
    """Whether a reference to the SEG names at least one segment, and only segments the SEG has."""
    named = set(segment_numbers_named(ref))
    return bool(named) and named <= segment_numbers


def item_name(item: Dataset) -> str:
    """How a problem names an SR content item: its concept code (a code is no PHI; values may be)."""
    code = concept_code(item)
    return "Referenced Segment" if code == REFERENCED_SEGMENT else f"IMAGE item (DCM {code})"


def template_problems(ds: Dataset, template_id: str) -> list[str]:
    templates = ds.get("ContentTemplateSequence", [])
    if not templates or templates[0].get("TemplateIdentifier") != template_id \
            or templates[0].get("MappingResource") != "DCMR":
        return [f"{tag_name('ContentTemplateSequence')} is not DCMR TID {template_id}"]
    return []


def section_items(ds: Dataset, section: str) -> list[Dataset]:
    """The content items of the root's CONTAINER sections with concept code `section`."""
    return [item for container in ds.get("ContentSequence", [])
            if container.get("ValueType") == "CONTAINER" and concept_code(container) == section
            for item in container.get("ContentSequence", [])]


def no_result_content_problems(ds: Dataset) -> list[str]:
    """A no-result report (Comprehensive SR, TID 2000) states in code that the analysis was not attempted,
    and gives at least one reason as a Finding TEXT item."""
    problems = template_problems(ds, "2000")
    statement = [item for item in section_items(ds, CONCLUSIONS)
                 if concept_code(item) == SUMMARY_OF_ANALYSES and item.get("ValueType") == "CODE"
                 and NOT_ATTEMPTED in code_values(item.get("ConceptCodeSequence"))]
    if not statement:
        problems.append(f"Conclusions (LN {CONCLUSIONS}) lack Summary of Analyses (DCM {SUMMARY_OF_ANALYSES}) = "
                        f"Not Attempted (DCM {NOT_ATTEMPTED})")
    reasons = [item for item in section_items(ds, FINDINGS)
               if concept_code(item) == FINDING and item.get("ValueType") == "TEXT" and str(item.get("TextValue", ""))]
    if not reasons:
        problems.append(f"Findings (LN {FINDINGS}) give no reason as a Finding (DCM {FINDING}) TEXT item")
    return problems


def sr_content_problems(ds: Dataset, seg: Dataset | None) -> list[str]:
    """TID 1500; every Referenced Segment names the SEG, and every IMAGE item naming the SEG (a Referenced
    Segment, or a measurement's Source of Measurement in the viewer profile) names segments it has. A
    Comprehensive SR is the node's no-result report, checked as one (no_result_content_problems)."""
    if ds.get("SOPClassUID") == COMPREHENSIVE_SR_CLASS:
        return no_result_content_problems(ds)
    problems = template_problems(ds, "1500")
    if seg is None:
        return problems
    segment_numbers = {int(s.SegmentNumber) for s in seg.get("SegmentSequence", [])}
    for item in content_items(ds.get("ContentSequence", [])):
        if item.get("ValueType") != "IMAGE":
            continue
        for ref in item.get("ReferencedSOPSequence", []):
            names_seg = ref.get("ReferencedSOPInstanceUID") == seg.SOPInstanceUID
            if concept_code(item) == REFERENCED_SEGMENT and not names_seg:
                problems.append(f"Referenced Segment: {tag_name('ReferencedSOPInstanceUID')} "
                                f"{ref.get('ReferencedSOPInstanceUID')} is not the SEG {seg.SOPInstanceUID}")
            elif names_seg and not names_segments_of(ref, segment_numbers):
                problems.append(f"{item_name(item)}: {tag_name('ReferencedSegmentNumber')} "
                                f"{ref.get('ReferencedSegmentNumber')} is not a segment of the SEG")
    return problems


def groups_without_coordinates(ds: Dataset) -> list[int]:
    """1-based positions of the measurement groups without an SCOORD or SCOORD3D of their own (what OHIF 3.13
    crashes on)."""
    measurements = [i for i in ds.get("ContentSequence", []) if concept_code(i) == IMAGING_MEASUREMENTS]
    groups = [g for m in measurements for g in m.get("ContentSequence", []) if concept_code(g) == MEASUREMENT_GROUP]
    return [number for number, group in enumerate(groups, start=1)
            if not any(i.get("ValueType") in ("SCOORD", "SCOORD3D") for i in group.get("ContentSequence", []))]


def sr_profile_problems(ds: Dataset, sr_profile: str) -> list[str]:
    """The "viewer" profile's promise: every measurement group has image coordinates."""
    if sr_profile != "viewer":
        return []
    return [f"measurement group {number} has no image coordinates (SCOORD), which every group of a viewer SR has"
            for number in groups_without_coordinates(ds)]


# 7a. highdicom reads it back from its encoded bytes.
def read_presentation_state(ds: Dataset) -> list[Dataset]:
    """highdicom 0.28 has no reader for presentation states: rebuild every graphic and text object with its
    validating constructors instead, which refuse what a viewer could not draw."""
    rebuilt: list[Dataset] = []
    for annotation in ds.GraphicAnnotationSequence:
        for item in annotation.get("GraphicObjectSequence", []):
            rebuilt.append(hd.pr.GraphicObject(
                graphic_type=item.GraphicType,
                graphic_data=np.array(item.GraphicData, dtype=float).reshape(-1, 2),
                units=item.GraphicAnnotationUnits,
                is_filled=item.get("GraphicFilled") == "Y",
                tracking_id=item.get("TrackingID"),
                tracking_uid=item.get("TrackingUID"),
            ))
        for item in annotation.get("TextObjectSequence", []):
            rebuilt.append(hd.pr.TextObject(
                text_value=item.UnformattedTextValue,
                units=item.get("AnchorPointAnnotationUnits") or item.BoundingBoxAnnotationUnits,
                bounding_box=(
                    (*item.BoundingBoxTopLeftHandCorner, *item.BoundingBoxBottomRightHandCorner)
                    if "BoundingBoxTopLeftHandCorner" in item else None
                ),
                anchor_point=tuple(item.AnchorPoint) if "AnchorPoint" in item else None,
                tracking_id=item.get("TrackingID"),
                tracking_uid=item.get("TrackingUID"),
            ))
    return rebuilt


# The readers get a data set parsed for them alone, so highdicom need not deep-copy it (copy=False).
READERS: dict[str, Callable[[Dataset], object]] = {
    "SEG": partial(hd.seg.Segmentation.from_dataset, copy=False),
    "SR": partial(hd.sr.Comprehensive3DSR.from_dataset, copy=False),
    "SC": partial(hd.Image.from_dataset, copy=False),
    "PM": partial(hd.pm.ParametricMap.from_dataset, copy=False),
    "PR": read_presentation_state,
}


def reader_of(sop_class_uid: str, kind: str) -> Callable[[Dataset], object]:
    if sop_class_uid == COMPREHENSIVE_SR_CLASS:
        return partial(hd.sr.ComprehensiveSR.from_dataset, copy=False)
    return READERS[kind]


def readback_problems(ds: Dataset, kind: str, encoded: bytes | None = None) -> list[str]:
    """highdicom reads `ds` back from its file bytes: `encoded` (see writer.encode), else encoded here."""
    try:
        data = encode(ds) if encoded is None else encoded
    except Exception as exc:  # noqa: BLE001 - an object that cannot be encoded cannot be read back either
        return [cannot_read_back(kind, exc)]
    return encoded_readback_problems(kind, str(ds.get("SOPClassUID", "")), data)


def encoded_readback_problems(kind: str, sop_class_uid: str, encoded: bytes) -> list[str]:
    """readback_problems of an object given only as its file bytes (runs in a helper process, see gate)."""
    try:
        reader_of(sop_class_uid, kind)(pydicom.dcmread(BytesIO(encoded)))
    except Exception as exc:  # noqa: BLE001 - any failure to read back is the finding
        return [cannot_read_back(kind, exc)]
    return []


def cannot_read_back(kind: str, exc: Exception) -> str:
    # Only the exception type: messages of readers can quote element values (PHI).
    return f"highdicom cannot read the {kind} back ({type(exc).__name__})"


def reference_problems(ds: Dataset, kind: str, sources: Sequence[Dataset], seg: Dataset | None) -> list[str]:
    if kind in ("SEG", "PM"):
        return frame_reference_problems(ds, sources)
    if kind == "SR":
        return sr_reference_problems(ds, sources, seg) + sr_image_reference_problems(ds, sources, seg)
    if kind == "PR":
        return pr_reference_problems(ds, sources)
    return sc_reference_problems(ds, sources)


def check_result(
    ds: Dataset, sources: Sequence[Dataset], seg: Dataset | None = None, manifest: Manifest | None = None,
    sr_profile: str = "full", encoded: bytes | None = None, read_back: bool = True,
) -> list[str]:
    """Problems of result object `ds` made from `sources` (the source series); [] when it meets the standards.

    `seg` is the SEG an SR references (needed to check its segment references); `manifest` enables the
    checks that depend on the pipeline (name, version, the model card's diagnostic-use flag); `sr_profile`
    "viewer" adds that an SR's every measurement group has image coordinates. Heatmap Secondary Captures are
    checked as SCs. `encoded` is `ds` as already encoded for its file (writer.encode): the read-back reads
    those bytes instead of encoding `ds` again. `read_back` False leaves the read-back to the caller (gate
    runs it elsewhere, on the same bytes); every other check is made.
    """
    if not sources:
        return ["no source instances to check against"]
    kind = result_kind(ds)
    if not kind:
        return [f"{tag_name('SOPClassUID')} {ds.get('SOPClassUID', '')} is not a SEG, SR, SC, Parametric Map "
                "or presentation state the node produces"]
    problems = identity_problems(ds, sources[0]) + uid_problems(ds, sources)
    problems += reference_problems(ds, kind, sources, seg)
    problems += flag_problems(ds, kind, manifest) + provenance_problems(ds, kind, manifest)
    if kind == "SEG":
        problems += seg_content_problems(ds, sources[0])
    elif kind == "PM":
        problems += frame_of_reference_problems(ds, sources[0])
    elif kind == "SR":
        problems += sr_content_problems(ds, seg) + sr_profile_problems(ds, sr_profile)
    return problems + (readback_problems(ds, kind, encoded) if read_back else [])


def lines_predating_dciodvfy(ds: Dataset) -> tuple[re.Pattern[str], ...]:
    """The dciodvfy Error lines that `ds` draws only because dicom3tools 2022 predates its IOD or references."""
    if ds.get("SOPClassUID") == LABEL_MAP_SEG_CLASS:
        return LABEL_MAP_LINES
    if any(element.VR == "UI" and element.value == LABEL_MAP_SEG_CLASS for element in ds.iterall()):
        return LABEL_MAP_REFERENCE_LINES
    return ()


def dciodvfy_errors(path: Path, ds: Dataset | None = None) -> list[str] | None:
    """The Error lines of `dciodvfy -new path` (values redacted), or None when dciodvfy is not installed.

    dciodvfy can print Error lines and still exit 0, so the lines count, not the exit status. The lines that
    only say the installed dciodvfy predates Label Map Segmentation do not count. `ds` is the object saved
    at `path`, when the caller has it (else the file's header is read for that).
    """
    executable = shutil.which("dciodvfy")
    if executable is None:
        return None
    header = ds if ds is not None else pydicom.dcmread(path, stop_before_pixels=True)
    return run_dciodvfy(executable, path, lines_predating_dciodvfy(header))


def run_dciodvfy(executable: str, path: Path, unknown_iod_lines: tuple[re.Pattern[str], ...]) -> list[str]:
    """dciodvfy_errors once the lines to ignore are known (runs no Python on the object: thread-safe)."""
    run = subprocess.run([executable, "-new", str(path)], capture_output=True, text=True,
                         errors="replace", timeout=DCIODVFY_TIMEOUT_S, check=False)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if re.search(r"\bError\b", line)]
    errors = [
        re.sub(r"= <[^>]*>", "= <redacted>", line)  # dciodvfy quotes values; they may be PHI
        for line in lines
        if not any(pattern.search(line) for pattern in unknown_iod_lines)
    ]
    if not lines and run.returncode != 0:
        errors.append(f"dciodvfy exited with status {run.returncode} without an Error line")
    return errors


class DeferredCheck(cf.Future):
    """A check made in the thread that first asks for its answer (result()), not when it is handed out."""

    def __init__(self, check: Callable[[], list[str]]) -> None:
        super().__init__()
        self._check: Callable[[], list[str]] | None = check

    def result(self, timeout: float | None = None) -> list[str]:
        check, self._check = self._check, None
        if check is not None:
            try:
                self.set_result(check())
            except Exception as exc:  # noqa: BLE001 - raised to the caller, as a failed future's would be
                self.set_exception(exc)
        return super().result(timeout)


# Starts highdicom's read-back of an object from its file bytes elsewhere: (kind, SOP class UID, bytes) -> the
# problems (encoded_readback_problems), as a future.
ReadBack = Callable[[str, str, bytes], "cf.Future[list[str]]"]


def gate(
    datasets: Iterable[Dataset],
    sources: Sequence[Dataset],
    manifest: Manifest | None,
    folder_for_dciodvfy: Path | None = None,
    sr_profile: str = "full",
    timings: dict[str, float] | None = None,
    read_back: ReadBack | None = None,
) -> list[Dataset]:
    """Raise ResultValidationError listing every problem of the result objects, else return them.

    With `folder_for_dciodvfy`, each object is saved there (as `save` names it) and checked by dciodvfy
    too, where it is installed. `sr_profile` is the one the objects were written with (see check_result).
    With `timings`, the seconds spent encoding and saving are added to timings["save"] (the rest is
    validation).

    Each object is encoded once: those bytes are saved, and read back by highdicom (check_result), so the
    read-back checks exactly the file that is sent. dciodvfy runs on each saved file in a thread while the
    other checks go on; with `read_back`, so does the highdicom read-back (in a helper process: it is pure
    Python, and would otherwise take turns with the next object on the GIL). Problems are listed in the same
    order whatever finishes first, and nothing is returned before every check has answered.

    `datasets` may be an iterator that builds each object as it is asked for (writer.build_results): each
    is then checked while the next is built. The SR's SEG is the first SEG among the objects, which the
    writer makes before the SR that references it.
    """
    seg = next((ds for ds in datasets if result_kind(ds) == "SEG"), None) if isinstance(datasets, Sequence) else None
    executable = shutil.which("dciodvfy") if folder_for_dciodvfy is not None else None
    # Per object: its label, the problems found in this thread, and the checks still running (each a future
    # of problems: the read-back, or None when check_result made it; dciodvfy, or None when not run).
    checked: list[tuple[str, list[str], cf.Future[list[str]] | None, cf.Future[list[str]] | None]] = []
    objects: list[Dataset] = []
    with cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="dciodvfy") as pool:
        for ds in datasets:
            objects.append(ds)
            kind = result_kind(ds)
            if seg is None and kind == "SEG":
                seg = ds
            label = f"{kind or 'object'} {ds.get('SOPInstanceUID', '?')}"
            t = time.perf_counter()
            try:
                encoded: bytes | None = encode(ds)
            except Exception:  # noqa: BLE001 - check_result reports an object that cannot be encoded
                encoded = None
            encoding_s = time.perf_counter() - t
            # The read-back (the last check to answer, for a SEG) starts first; it needs the bytes, not the file.
            # An object check_result refuses before reading it back (no known kind, not encodable) is not sent off.
            readback = (read_back(kind, str(ds.SOPClassUID), encoded) if read_back and kind and encoded and sources
                        else None)
            dciodvfy = None
            if folder_for_dciodvfy is not None:
                saving = time.perf_counter()
                path = save(ds, Path(folder_for_dciodvfy), encoded)
                if timings is not None:
                    timings["save"] = timings.get("save", 0.0) + encoding_s + time.perf_counter() - saving
                if executable is not None:
                    dciodvfy = pool.submit(run_dciodvfy, executable, path, lines_predating_dciodvfy(ds))
            found = check_result(ds, sources, seg, manifest, sr_profile, encoded=encoded, read_back=readback is None)
            checked.append((label, [f"{label}: {p}" for p in found], readback, dciodvfy))
        for _, _, readback, _ in checked:  # this thread's own checks first, while the helper may still be busy
            if isinstance(readback, DeferredCheck):
                readback.result()
        uids = [str(ds.get("SOPInstanceUID", "")) for ds in objects]
        problems = [f"SOPInstanceUID {uid} is used by more than one result object"
                    for uid in sorted({u for u in uids if uids.count(u) > 1})]
        for label, found, readback, dciodvfy in checked:
            problems += found
            if readback is not None:
                problems += [f"{label}: {line}" for line in readback.result()]
            if dciodvfy is not None:
                problems += [f"{label}: dciodvfy: {line}" for line in dciodvfy.result()]
    if problems:
        raise ResultValidationError(problems)
    return objects
