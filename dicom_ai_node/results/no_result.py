"""The "no result" report: a Comprehensive SR saying that a pipeline produced nothing for a series, and why.

Input QC refuses a series outside the range its pipeline was validated on (imaging/qc.py), or one that is not
a consistent volume (missing or unevenly spaced slices, duplicates: imaging/volume.py). Rather than leave the
sender with silence, the node can send this report to the job's destinations. It is built from the source
instances' headers only (the pixels may be what is wrong) and carries no PHI beyond the patient/study tags
copied from the source: the reasons name tags, values of acquisition parameters and UIDs.

Content (DCMR TID 2000 Basic Diagnostic Imaging Report, the closest template for a text report):

    CONTAINER Diagnostic Imaging Report (LN 18748-4)
      HAS CONCEPT MOD  Language of Content Item and Descendants = English (United States)
      HAS OBS CONTEXT  the pipeline as a device observer (the same as in its TID 1500 reports)
      CONTAINS CONTAINER Findings (LN 59776-5)
        CONTAINS TEXT Finding (DCM 121071) = one reason, one item per reason
      CONTAINS CONTAINER Conclusions (LN 55110-1)
        CONTAINS CODE Summary of Analyses (DCM 111065) = Not Attempted (DCM 111225)   (CID 6042)
        CONTAINS TEXT Conclusion (DCM 121077) = "No AI result was produced ..."

Like every result it is UNVERIFIED, labelled AI (and "not for diagnostic use" where the model card says so),
names the pipeline in General Equipment and Contributing Equipment, and has deterministic UIDs: its series
from (source series, pipeline, version), its instance from those and the series revision, so a retry of one
version of the series re-sends the same object and a series re-opened by late instances gets a new report.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from dicom_ai_node.pipeline import Manifest
from dicom_ai_node.results.identity import copy_patient_study, no_person_name_warnings
from dicom_ai_node.results.provenance import ResultContext, add_provenance, equipment_kwargs, with_use_warning
from dicom_ai_node.results.sr import observation_context
from dicom_ai_node.results.uids import derive_result_uid
from dicom_ai_node.results.writer import sync_file_meta

NO_RESULT_SR_SERIES_NUMBER = 9009
TEMPLATE_ID = "2000"  # DCMR Basic Diagnostic Imaging Report
TITLE = codes.cid7000.DiagnosticImagingReport
FINDINGS, FINDING = codes.cid7001.Findings, codes.DCM.Finding
CONCLUSIONS, CONCLUSION = codes.cid7001.Conclusions, codes.DCM.Conclusion
SUMMARY_OF_ANALYSES, NOT_ATTEMPTED = codes.DCM.SummaryOfAnalyses, codes.DCM.NotAttempted
ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
OUTSIDE_RANGE = "the series is outside the input range the pipeline was validated on"
NOT_A_VOLUME = ("the series is not one consistent volume (missing, unevenly spaced or duplicate slices, "
                "or mixed images)")


def read_headers(paths: Sequence[Path | str]) -> list[Dataset]:
    """The headers (no pixel data) of the readable DICOM files among `paths`, ordered by InstanceNumber and
    SOPInstanceUID; files that are not DICOM or lack a SOPInstanceUID are left out."""
    headers = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "SOPInstanceUID" in ds and "SeriesInstanceUID" in ds:
            headers.append(ds)

    def order(ds: Dataset) -> tuple[int, str]:
        try:
            number = int(ds.get("InstanceNumber") or 0)
        except (TypeError, ValueError):
            number = 0
        return number, str(ds.SOPInstanceUID)

    return sorted(headers, key=order)


def conclusion_text(manifest: Manifest, why: str = OUTSIDE_RANGE) -> str:
    return (f"No AI result was produced: {manifest.name} {manifest.version} ({manifest.title}) did not run "
            f"because {why}. The findings list every reason.")


def no_result_content(reasons: Sequence[str], conclusion: str, manifest: Manifest,
                      ctx: ResultContext) -> hd.sr.ContainerContentItem:
    """The root CONTAINER of the report (TID 2000), one Finding TEXT item per reason."""
    root = hd.sr.ContainerContentItem(name=TITLE, template_id=TEMPLATE_ID)
    findings = hd.sr.ContainerContentItem(name=FINDINGS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    findings.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=FINDING, value=reason, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for reason in reasons
    ])
    conclusions = hd.sr.ContainerContentItem(name=CONCLUSIONS,
                                             relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    conclusions.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(name=SUMMARY_OF_ANALYSES, value=NOT_ATTEMPTED,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        hd.sr.TextContentItem(name=CONCLUSION, value=conclusion,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
    ])
    root.ContentSequence = hd.sr.ContentSequence([
        *hd.sr.LanguageOfContentItemAndDescendants(ENGLISH),
        *observation_context(manifest, ctx),
        findings,
        conclusions,
    ], is_root=False)
    return root


def checked_reasons(reasons: Sequence[str]) -> list[str]:
    cleaned = [" ".join(str(reason).split()) for reason in reasons]
    if not cleaned or not all(cleaned):
        raise ValueError("a no-result report needs at least one reason, and no empty one")
    return cleaned


def build_no_result_sr(
    headers: Sequence[Dataset],
    manifest: Manifest,
    ctx: ResultContext,
    reasons: Sequence[str],
    revision: int = 1,
    why: str = OUTSIDE_RANGE,
) -> Dataset:
    """The "no result" Comprehensive SR of `manifest`'s pipeline for the series of `headers` (its instances,
    pixel data not needed), listing every one of `reasons`; `revision` is the series revision the job ran on,
    `why` completes the conclusion "... did not run because <why>"."""
    if not headers:
        raise ValueError("a no-result report needs the headers of the source instances")
    reasons = checked_reasons(reasons)
    source = headers[0]
    series_uid = str(source.SeriesInstanceUID)
    if any(str(ds.SeriesInstanceUID) != series_uid for ds in headers):
        raise ValueError(f"series {series_uid}: the headers of a no-result report must all be of one series")
    content = no_result_content(reasons, conclusion_text(manifest, why), manifest, ctx)
    with no_person_name_warnings():
        sr = hd.sr.ComprehensiveSR(
            evidence=list(headers),  # source first: highdicom takes patient/study from evidence[0]
            content=content,
            series_instance_uid=derive_result_uid(ctx.org_root, series_uid, manifest.name, manifest.version,
                                                  "no-result-sr-series"),
            series_number=NO_RESULT_SR_SERIES_NUMBER,
            sop_instance_uid=derive_result_uid(ctx.org_root, series_uid, manifest.name, manifest.version,
                                               "no-result-sr", index=revision),
            instance_number=revision,
            is_complete=True,  # nothing more will be added: the pipeline did not run
            is_final=False,
            is_verified=False,
            series_description=with_use_warning(f"AI no result: {manifest.name} {manifest.version}", manifest),
            **equipment_kwargs(manifest, ctx),
        )
    copy_patient_study(sr, source)
    add_provenance(sr, manifest, ctx)
    sync_file_meta(sr)
    return sr


def no_result_reasons(sr: Dataset) -> list[str]:
    """The reasons a no-result report lists (its Finding TEXT items), in order; for readers and tests."""
    reasons = []
    for section in sr.get("ContentSequence", []):
        if section.ConceptNameCodeSequence[0].CodeValue != FINDINGS.value:
            continue
        for item in section.get("ContentSequence", []):
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == FINDING.value:
                reasons.append(str(item.TextValue))
    return reasons
