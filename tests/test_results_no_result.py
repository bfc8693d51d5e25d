"""The "no result" SR (results/no_result.py) meets ARCHITECTURE.md "Standards every result meets".

Sources are a synthetic chest CT phantom (headers only, as when its slices could not be made a volume) and
pydicom's real CT_small.dcm; each report passes the node's validation gate, dciodvfy and highdicom's reader.
"""
from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from conftest import require_tool
from dicom_ai_node.phantom import PHANTOM_PATIENT, make_chest_phantom
from dicom_ai_node.pipeline import Manifest, load_manifest
from dicom_ai_node.results.identity import PATIENT_STUDY_KEYWORDS
from dicom_ai_node.results.kinds import result_kind_of
from dicom_ai_node.results.no_result import (
    NO_RESULT_SR_SERIES_NUMBER,
    build_no_result_sr,
    no_result_reasons,
    read_headers,
)
from dicom_ai_node.results.provenance import ResultContext, device_uid
from dicom_ai_node.results.uids import derive_result_uid
from dicom_ai_node.results.validate import ResultValidationError, check_result, dciodvfy_errors, gate
from dicom_ai_node.results.writer import save

REPO = Path(__file__).resolve().parent.parent
ORG_ROOT = "1.2.826.0.1.3680043.10.1234."
REASONS = ["12 slices, fewer than the 20 required", "slice thickness 7 mm is outside the validated 0.5 to 5 mm"]
NOT_ATTEMPTED = ("111065", "111225")


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(REPO / "pipelines" / "ct_lung")


@pytest.fixture(scope="module")
def ctx() -> ResultContext:
    return ResultContext(org_root=ORG_ROOT, institution_name="Test Hospital")


@pytest.fixture(scope="module")
def headers(tmp_path_factory) -> list[Dataset]:
    phantom = make_chest_phantom(slices=12, size=48, pixel_spacing_mm=3.0, slice_thickness_mm=7.0, uid_seed="no-result")
    paths = phantom.write(tmp_path_factory.mktemp("source"))
    not_dicom = paths[0].parent / "notes.txt"
    not_dicom.write_text("not a DICOM file")
    return read_headers([*reversed(paths), not_dicom])


@pytest.fixture(scope="module")
def sr(headers, manifest, ctx) -> Dataset:
    return build_no_result_sr(headers, manifest, ctx, REASONS)


def content(ds: Dataset) -> list[tuple[str, str, str]]:
    """(value type, concept code, value) of every content item under the root, depth first."""
    items = []

    def walk(sequence):
        for item in sequence:
            value = item.get("TextValue") or (item.ConceptCodeSequence[0].CodeValue if "ConceptCodeSequence" in item
                                               else "")
            items.append((item.ValueType, item.ConceptNameCodeSequence[0].CodeValue, str(value)))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return items


def test_headers_are_read_in_instance_order_without_pixels(headers):
    assert len(headers) == 12  # the text file is left out
    assert [int(h.InstanceNumber) for h in headers] == sorted(int(h.InstanceNumber) for h in headers)
    assert all("PixelData" not in h for h in headers)


def test_report_lists_every_reason_and_says_in_code_that_nothing_was_produced(sr, manifest):
    assert no_result_reasons(sr) == REASONS
    items = content(sr)
    assert ("CODE", *NOT_ATTEMPTED) in items
    [conclusion] = [value for kind, code, value in items if (kind, code) == ("TEXT", "121077")]
    assert conclusion.startswith(f"No AI result was produced: ct_lung {manifest.version}")
    assert [value for kind, code, value in items if (kind, code) == ("TEXT", "121071")] == REASONS
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"  # Diagnostic Imaging Report
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"


def test_report_carries_no_phi_in_its_content(sr):
    text = " ".join(value for _, _, value in content(sr))
    for value in PHANTOM_PATIENT.values():
        assert value not in text


def test_report_passes_the_gate_with_dciodvfy(sr, headers, manifest, tmp_path):
    require_tool("dciodvfy")
    gate([sr], headers, manifest, tmp_path)
    path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
    assert dciodvfy_errors(path) == []
    assert check_result(pydicom.dcmread(path), headers, manifest=manifest) == []
    report = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(path))
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"


def test_report_is_a_machine_made_unverified_ai_object(sr, manifest, ctx):
    assert (sr.Modality, sr.VerificationFlag, sr.CompletionFlag) == ("SR", "UNVERIFIED", "COMPLETE")
    assert sr.SeriesDescription == f"AI no result: ct_lung {manifest.version} - not for diagnostic use"
    assert (sr.Manufacturer, sr.ManufacturerModelName) == (ctx.manufacturer, "ct_lung")
    assert any(item.get("DeviceUID") == device_uid(manifest, ctx) for item in sr.ContributingEquipmentSequence)
    assert result_kind_of(sr) == "no_result_sr" and sr.SeriesNumber == NO_RESULT_SR_SERIES_NUMBER


def test_identity_is_copied_byte_equal_from_a_real_ct(manifest, ctx, tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    report = build_no_result_sr([source], manifest, ctx, ["modality CT refused for the test"])
    written = pydicom.dcmread(save(report, tmp_path))
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            assert written[keyword].value == source[keyword].value, keyword
    assert check_result(written, [source], manifest=manifest) == []
    [study] = written.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID
    assert study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_uids_are_derived_from_series_pipeline_and_revision(sr, headers, manifest, ctx, tmp_path):
    series_uid = str(headers[0].SeriesInstanceUID)
    assert sr.SOPInstanceUID == derive_result_uid(ORG_ROOT, series_uid, "ct_lung", manifest.version,
                                                  "no-result-sr", index=1)
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    again = build_no_result_sr(list(reversed(headers)), manifest, ResultContext(org_root=ORG_ROOT), REASONS[:1])
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (sr.SeriesInstanceUID, sr.SOPInstanceUID)
    revised = build_no_result_sr(headers, manifest, ctx, REASONS, revision=2)
    assert revised.SeriesInstanceUID == sr.SeriesInstanceUID and revised.SOPInstanceUID != sr.SOPInstanceUID
    assert revised.InstanceNumber == 2
    other = manifest.model_copy(update={"version": "9.9.9"})
    assert build_no_result_sr(headers, other, ctx, REASONS).SOPInstanceUID != sr.SOPInstanceUID
    source_uids = {str(h.SOPInstanceUID) for h in headers} | {series_uid}
    assert not {str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID)} & source_uids


def test_a_report_needs_reasons_and_one_series(headers, manifest, ctx):
    with pytest.raises(ValueError, match="at least one reason"):
        build_no_result_sr(headers, manifest, ctx, [])
    with pytest.raises(ValueError, match="at least one reason"):
        build_no_result_sr(headers, manifest, ctx, ["ok", "  "])
    with pytest.raises(ValueError, match="headers"):
        build_no_result_sr([], manifest, ctx, REASONS)
    stranger = deepcopy(headers[1])
    stranger.SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="one series"):
        build_no_result_sr([headers[0], stranger], manifest, ctx, REASONS)


def test_the_gate_refuses_a_report_without_reasons_or_coded_statement(sr, headers, manifest):
    broken = deepcopy(sr)
    findings, conclusions = [item for item in broken.ContentSequence if item.ValueType == "CONTAINER"]
    del findings.ContentSequence
    conclusions.ContentSequence = [item for item in conclusions.ContentSequence if item.ValueType != "CODE"]
    with pytest.raises(ResultValidationError) as raised:
        gate([broken], headers, manifest)
    text = str(raised.value)
    assert "give no reason as a Finding (DCM 121071) TEXT item" in text
    assert "lack Summary of Analyses (DCM 111065) = Not Attempted (DCM 111225)" in text


def test_the_gate_still_checks_identity_and_evidence_of_a_report(sr, headers, manifest):
    broken = deepcopy(sr)
    broken.PatientID = "SOMEONE-ELSE"
    broken.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence.pop()
    problems = check_result(broken, headers, manifest=manifest)
    assert "PatientID (0010,0020) is not byte-equal to the source's" in problems
    assert any("lacks 1 instance(s) of source series" in p for p in problems)
