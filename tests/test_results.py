"""Result objects (SEG, TID 1500 SR, key-image SC) meet ARCHITECTURE.md "Standards every result meets".

Sources are a synthetic chest CT phantom with known lung masks and pydicom's real CT_small.dcm. Each
object is checked by the node's own validator, by dciodvfy (a real, independent checker) and by reading
it back with highdicom; negative tests prove the validator catches what it claims to.
"""
from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai_node.imaging.volume import Volume, load_volume
from dicom_ai_node.jobs.readback import ReadBackProcess
from dicom_ai_node.phantom import PHANTOM_PATIENT, ChestPhantom, make_chest_phantom
from dicom_ai_node.pipeline import Concept, Finding, Manifest, Measurement, PipelineResult, Segment, load_manifest
from dicom_ai_node.results.provenance import ResultContext, series_description
from dicom_ai_node.results.sc import build_key_image_sc
from dicom_ai_node.results.seg import build_seg
from dicom_ai_node.results.sr import build_sr
from dicom_ai_node.results.uids import derive_device_uid, derive_result_uid
from dicom_ai_node.results.validate import (
    DeferredCheck,
    ResultValidationError,
    check_result,
    dciodvfy_errors,
    encoded_readback_problems,
    gate,
    result_kind,
)
from dicom_ai_node.results.writer import encode, save, write_results

ORG_ROOT = "1.2.826.0.1.3680043.10.1234."
ANATOMICAL_STRUCTURE = Concept("91723000", "SCT", "Anatomical Structure")
RIGHT_LUNG = Concept("3341006", "SCT", "Right lung")
LEFT_LUNG = Concept("44029006", "SCT", "Left lung")
VOLUME = Concept("118565006", "SCT", "Volume")
ML = Concept("mL", "UCUM", "milliliter")
PERCENT = Concept("%", "UCUM", "percent")
LAA950 = Concept("LAA950", "99DAIN", "Lung volume below -950 HU")  # no standard code exists; a local one
CLINICAL_FINDING = Concept("404684003", "SCT", "Clinical finding")
EMPHYSEMA = Concept("87433001", "SCT", "Pulmonary emphysema")
KEY_SLICE = 20

PIPELINE_YAML = """\
name: ct_lung
version: "{version}"
title: Lung segmentation and emphysema index
intended_use: Research on synthetic phantoms; never for patient care.
entrypoint: pipeline.py:LungPipeline
accepts:
  modality: [CT]
  body_part: [CHEST]
  slice_thickness_mm: {{max: 10}}
outputs: [seg, sr, sc]
gpu_memory_mb: 0
model_card:
  description: Threshold and region growing lung segmentation with LAA-950 emphysema index.
  training_data: None (classical algorithm), checked against synthetic phantoms.
  performance: Exact on phantoms.
  limitations: Not validated on patient data.
  not_for_diagnostic_use: true
"""


def manifest_in(folder: Path, version: str = "1.2.0") -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(PIPELINE_YAML.format(version=version))
    return load_manifest(folder)


def laa950_percent(hu: np.ndarray, mask: np.ndarray) -> float:
    return 100.0 * float((hu[mask] < -950).sum()) / float(mask.sum())


def lung_result(phantom: ChestPhantom, volume: Volume) -> PipelineResult:
    """What a lung pipeline would return, computed from the phantom's truth masks."""
    ml = volume.voxel_volume_ml
    right, left = phantom.right_lung, phantom.left_lung
    return PipelineResult(
        segments=[
            Segment(1, "Right lung", ANATOMICAL_STRUCTURE, RIGHT_LUNG, right, color_rgb=(255, 60, 60)),
            Segment(2, "Left lung", ANATOMICAL_STRUCTURE, LEFT_LUNG, left, color_rgb=(60, 140, 255)),
        ],
        measurements=[
            Measurement(VOLUME, float(right.sum()) * ml, ML, segment_number=1),
            Measurement(VOLUME, float(left.sum()) * ml, ML, segment_number=2),
            Measurement(LAA950, laa950_percent(volume.array, right), PERCENT, segment_number=1),
            Measurement(LAA950, laa950_percent(volume.array, left), PERCENT, segment_number=2),
            Measurement(VOLUME, float((right | left).sum()) * ml, ML, segment_number=None),
            Measurement(LAA950, laa950_percent(volume.array, right | left), PERCENT, segment_number=None),
        ],
        findings=[Finding(CLINICAL_FINDING, EMPHYSEMA, probability=0.87)],
        key_slice=KEY_SLICE,
    )


@dataclass(frozen=True)
class Case:
    volume: Volume
    result: PipelineResult
    manifest: Manifest
    ctx: ResultContext
    objects: dict[str, Dataset]  # by result kind: SEG, SR, SC
    paths: dict[str, Path]


def built_case(volume: Volume, result: PipelineResult, manifest: Manifest, out: Path) -> Case:
    ctx = ResultContext(org_root=ORG_ROOT, institution_name="Test Hospital")
    objects = {result_kind(ds): ds for ds in write_results(volume, result, manifest, ctx)}
    paths = {kind: save(ds, out) for kind, ds in objects.items()}
    return Case(volume, result, manifest, ctx, objects, paths)


@pytest.fixture(scope="module")
def phantom() -> ChestPhantom:
    return make_chest_phantom(slices=40, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=7.5)


@pytest.fixture(scope="module")
def lung_case(phantom: ChestPhantom, tmp_path_factory: pytest.TempPathFactory) -> Case:
    root = tmp_path_factory.mktemp("lung")
    volume = load_volume(phantom.write(root / "ct"))
    manifest = manifest_in(root / "pipelines" / "ct_lung")
    return built_case(volume, lung_result(phantom, volume), manifest, root / "out")


@pytest.fixture(scope="module")
def small_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """pydicom's CT_small.dcm (a real GE scan, one slice) with a disc-shaped mask."""
    root = tmp_path_factory.mktemp("small")
    volume = load_volume([get_testdata_file("CT_small.dcm")])
    rows, columns = volume.array.shape[1:]
    yy, xx = np.mgrid[:rows, :columns]
    disc = (((yy - rows / 2) ** 2 + (xx - columns / 2) ** 2) < (rows / 5) ** 2)[None]
    result = PipelineResult(
        segments=[Segment(1, "Region", Concept("85756007", "SCT", "Tissue"), Concept("85756007", "SCT", "Tissue"),
                          disc)],
        measurements=[Measurement(VOLUME, float(disc.sum()) * volume.voxel_volume_ml, ML, segment_number=1)],
    )
    return built_case(volume, result, manifest_in(root / "pipelines" / "ct_lung"), root / "out")


CASES = ["lung_case", "small_case"]
KINDS = ["SEG", "SR", "SC"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(request.param)


def problems_of(case: Case, ds: Dataset) -> list[str]:
    return check_result(ds, case.volume.sources, case.objects.get("SEG"), case.manifest)


# --- every object of both sources meets the standards ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_result_passes_check_result(case: Case, kind: str) -> None:
    assert problems_of(case, case.objects[kind]) == []


@pytest.mark.parametrize("kind", KINDS)
def test_result_file_passes_check_result_when_read_back(case: Case, kind: str) -> None:
    assert problems_of(case, pydicom.dcmread(case.paths[kind])) == []


@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_reports_no_errors(case: Case, kind: str) -> None:
    errors = dciodvfy_errors(case.paths[kind])
    if errors is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    assert errors == []


@pytest.mark.parametrize("kind", KINDS)
def test_file_meta_matches_dataset(case: Case, kind: str) -> None:
    ds = pydicom.dcmread(case.paths[kind])
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert case.paths[kind].name == f"{ds.SOPInstanceUID}.dcm"


@pytest.mark.parametrize("kind", KINDS)
def test_patient_and_study_elements_are_byte_equal_on_disk(case: Case, kind: str) -> None:
    source = pydicom.dcmread(case.volume.sources[0].filename)
    result = pydicom.dcmread(case.paths[kind])
    for keyword in ("StudyInstanceUID", "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        tag = pydicom.datadict.tag_for_keyword(keyword)
        in_source = source.get_item(tag)
        in_result = result.get_item(tag)
        source_bytes = in_source.value if in_source is not None else None
        result_bytes = in_result.value if in_result is not None else None
        assert result_bytes == source_bytes, keyword


def test_phantom_result_keeps_issuer_of_patient_id(lung_case: Case) -> None:
    # SCImage.from_ref_dataset drops it; the phantom has one, so every object must carry it.
    for ds in lung_case.objects.values():
        assert ds.IssuerOfPatientID == PHANTOM_PATIENT["IssuerOfPatientID"]


@pytest.mark.parametrize("kind", KINDS)
def test_result_uids_are_new_and_series_number_fixed(case: Case, kind: str) -> None:
    ds = case.objects[kind]
    assert ds.SeriesInstanceUID != case.volume.sources[0].SeriesInstanceUID
    assert ds.SOPInstanceUID not in {s.SOPInstanceUID for s in case.volume.sources}
    assert ds.SeriesNumber == {"SEG": 9001, "SR": 9002, "SC": 9003}[kind]
    assert "AI" in ds.SeriesDescription and "not for diagnostic use" in ds.SeriesDescription
    assert len(ds.SeriesDescription) <= 64


@pytest.mark.parametrize("kind", KINDS)
def test_provenance_names_pipeline_with_device_uid(lung_case: Case, kind: str) -> None:
    ds = lung_case.objects[kind]
    manifest, ctx = lung_case.manifest, lung_case.ctx
    assert ds.Manufacturer == ctx.manufacturer
    assert ds.ManufacturerModelName == "ct_lung"
    assert list(ds.SoftwareVersions)[0] == "1.2.0"
    items = list(ds.ContributingEquipmentSequence)
    ours = items[-1]
    assert ours.DeviceUID == derive_device_uid(ORG_ROOT, ctx.node_name, manifest.name, manifest.version)
    assert ours.ManufacturerModelName == "ct_lung"
    assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert "ContributionDateTime" in ours and ours.DeviceSerialNumber == ctx.device_serial
    assert any(item.get("ManufacturerModelName") == "highdicom" for item in items[:-1])  # highdicom's kept


# --- read back with highdicom: same labels, masks and values -------------------------------------------


def test_seg_reads_back_with_labels_masks_and_geometry(lung_case: Case, phantom: ChestPhantom) -> None:
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(lung_case.paths["SEG"]))
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert [seg.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["Right lung", "Left lung"]
    assert seg.get_segment_description(1).SegmentedPropertyTypeCodeSequence[0].CodeValue == "3341006"
    assert seg.get_segment_description(2).SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    assert all(seg.get_segment_description(n).SegmentAlgorithmType == "AUTOMATIC" for n in (1, 2))
    assert seg.get_segment_description(1).SegmentAlgorithmName == "ct_lung"
    assert "RecommendedDisplayCIELabValue" in seg.get_segment_description(1)
    assert seg.FrameOfReferenceUID == lung_case.volume.sources[0].FrameOfReferenceUID
    assert seg.BodyPartExamined == "CHEST"
    frames_with_lung = int(phantom.right_lung.any(axis=(1, 2)).sum() + phantom.left_lung.any(axis=(1, 2)).sum())
    assert frames_with_lung < 2 * len(lung_case.volume.sources)  # the phantom has lung-free slices...
    assert seg.NumberOfFrames == frames_with_lung  # ...whose empty frames are omitted
    pixels = seg.get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in lung_case.volume.sources], segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(pixels[..., 0] > 0, phantom.right_lung)
    assert np.array_equal(pixels[..., 1] > 0, phantom.left_lung)


def test_seg_and_sr_share_tracking_uids(lung_case: Case) -> None:
    seg = lung_case.objects["SEG"]
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(lung_case.paths["SR"])).content
    by_segment = {
        int(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber): g.tracking_uid
        for g in report.get_volumetric_roi_measurement_groups()
    }
    assert by_segment == {int(s.SegmentNumber): s.TrackingUID for s in seg.SegmentSequence}


def test_sr_reads_back_measurement_values(lung_case: Case) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(lung_case.paths["SR"]))
    report = sr.content
    expected = {
        (m.segment_number, m.name.value): m.value for m in lung_case.result.measurements
    }
    found: dict[tuple[int | None, str], float] = {}
    for group in report.get_volumetric_roi_measurement_groups():
        number = int(group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
        for m in group.get_measurements():
            found[(number, m.name.value)] = m.value
            assert m.unit.scheme_designator == "UCUM"
    series_group, finding_group = report.get_image_measurement_groups()
    assert series_group.tracking_identifier == "Series-level measurements"
    for m in series_group.get_measurements():
        found[(None, m.name.value)] = m.value
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-9), key
    assert finding_group.tracking_identifier == EMPHYSEMA.meaning  # each finding is tracked on its own
    (evaluation,) = finding_group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.value.value) == (CLINICAL_FINDING.value, EMPHYSEMA.value)
    # highdicom's QualitativeEvaluation keeps name and value only; the probability is read from the tree.
    (finding,) = [i for i in finding_group[0].ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == CLINICAL_FINDING.value]
    probability = finding.ContentSequence[0]
    assert probability.ConceptNameCodeSequence[0].CodeMeaning == "Probability"
    assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.87)


def test_sr_volumes_match_phantom_truth(lung_case: Case, phantom: ChestPhantom) -> None:
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(lung_case.paths["SR"])).content
    volumes = {
        int(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber):
            g.get_measurements(name=hd.sr.CodedConcept(VOLUME.value, VOLUME.scheme, VOLUME.meaning))[0].value
        for g in report.get_volumetric_roi_measurement_groups()
    }
    assert volumes[1] == pytest.approx(phantom.right_lung_ml, rel=1e-9)
    assert volumes[2] == pytest.approx(phantom.left_lung_ml, rel=1e-9)


def test_sr_is_unverified_partial_device_report(lung_case: Case) -> None:
    sr = lung_case.objects["SR"]
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "PARTIAL")
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(lung_case.paths["SR"])).content
    (observer,) = report.get_observer_contexts()
    assert observer.observer_type == hd.sr.CodedConcept("121007", "DCM", "Device")
    assert observer.observer_identifying_attributes.uid == derive_device_uid(
        ORG_ROOT, lung_case.ctx.node_name, "ct_lung", "1.2.0"
    )
    assert observer.observer_identifying_attributes.model_name == "ct_lung"


def test_sr_evidence_lists_source_series_and_seg(lung_case: Case) -> None:
    sr, seg = lung_case.objects["SR"], lung_case.objects["SEG"]
    listed = {
        series.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence}
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert listed[lung_case.volume.sources[0].SeriesInstanceUID] == {
        s.SOPInstanceUID for s in lung_case.volume.sources
    }
    assert listed[seg.SeriesInstanceUID] == {seg.SOPInstanceUID}


def test_sc_is_rgb_key_image_with_burned_in_outlines(lung_case: Case) -> None:
    ds = pydicom.dcmread(lung_case.paths["SC"])
    hd.Image.from_dataset(ds)
    key = lung_case.volume.sources[KEY_SLICE]
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert (ds.ConversionType, ds.BurnedInAnnotation) == ("WSD", "YES")
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    assert ds.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert ds.BodyPartExamined == "CHEST"
    assert ds.Rows >= 512 and ds.Columns >= 512
    factor = ds.Rows // key.Rows
    assert float(ds.PixelSpacing[0]) == pytest.approx(float(key.PixelSpacing[0]) / factor)
    pixels = ds.pixel_array
    for colour in ((255, 60, 60), (60, 140, 255)):
        assert np.all(pixels == colour, axis=-1).sum() > 100, colour  # outline and legend swatch


def test_sc_key_slice_defaults_to_largest_mask_area(lung_case: Case) -> None:
    result = replace(lung_case.result, key_slice=None)
    sc = build_key_image_sc(lung_case.volume, result, lung_case.manifest, lung_case.ctx)
    areas = sum(s.mask.sum(axis=(1, 2)) for s in result.segments)
    largest = lung_case.volume.sources[int(np.argmax(areas))]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == largest.SOPInstanceUID


def test_sr_content_tree_structure(lung_case: Case) -> None:
    """Golden structure of the TID 1500 tree: what viewers and the validator rely on."""
    sr, seg = lung_case.objects["SR"], lung_case.objects["SEG"]
    template = sr.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report

    def code(item: Dataset) -> str:
        return item.ConceptNameCodeSequence[0].CodeValue

    root = {code(i): i for i in sr.ContentSequence}
    assert root["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # observer type: device
    assert root["121012"].UID == lung_case.objects["SEG"].ContributingEquipmentSequence[-1].DeviceUID
    assert root["121058"].ConceptCodeSequence[0].CodeValue == "24627-2"  # procedure reported: CT chest
    groups = list(root["126010"].ContentSequence)  # Imaging Measurements
    assert [g.ContentTemplateSequence[0].TemplateIdentifier for g in groups] == ["1411", "1411", "1501", "1501"]
    for number, group in enumerate(groups[:2], start=1):
        items = {code(i): i for i in group.ContentSequence}
        assert items["112039"].TextValue == ("Right lung", "Left lung")[number - 1]  # tracking identifier
        assert items["112040"].UID == seg.SegmentSequence[number - 1].TrackingUID
        assert items["121071"].ConceptCodeSequence[0].CodeValue == ("3341006", "44029006")[number - 1]
        ref = items["121191"].ReferencedSOPSequence[0]  # Referenced Segment
        assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSegmentNumber) == (seg.SOPInstanceUID, number)
        assert items["121232"].UID == lung_case.volume.sources[0].SeriesInstanceUID  # source series
        names = [code(i) for i in group.ContentSequence if i.ValueType == "NUM"]
        assert names == ["118565006", "LAA950"]
    series_items = [code(i) for i in groups[2].ContentSequence]
    assert "121191" not in series_items and series_items.count("118565006") == 1
    assert "121112" in series_items  # source of measurement: the key slice
    finding_items = {code(i): i for i in groups[3].ContentSequence}
    assert finding_items["112039"].TextValue == EMPHYSEMA.meaning
    assert finding_items[CLINICAL_FINDING.value].ConceptCodeSequence[0].CodeValue == EMPHYSEMA.value
    assert "121112" in finding_items and "118565006" not in finding_items


# --- determinism: a re-run replaces, a new version coexists --------------------------------------------


def uids_of(objects: list[Dataset]) -> dict[str, tuple[str, str]]:
    return {result_kind(ds): (ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in objects}


def test_rebuild_gives_identical_uids(lung_case: Case) -> None:
    again = write_results(lung_case.volume, lung_case.result, lung_case.manifest, lung_case.ctx)
    assert uids_of(again) == uids_of(list(lung_case.objects.values()))


def test_new_pipeline_version_gives_new_uids(lung_case: Case, tmp_path: Path) -> None:
    manifest = manifest_in(tmp_path / "ct_lung", version="1.3.0")
    other = uids_of(write_results(lung_case.volume, lung_case.result, manifest, lung_case.ctx))
    before = uids_of(list(lung_case.objects.values()))
    seen = {uid for pair in before.values() for uid in pair}
    assert all(uid not in seen for pair in other.values() for uid in pair)


def test_all_result_uids_differ_from_each_other(lung_case: Case) -> None:
    uids = [uid for pair in uids_of(list(lung_case.objects.values())).values() for uid in pair]
    assert len(set(uids)) == len(uids) == 6


def test_derive_result_uid_is_deterministic_and_valid() -> None:
    series = "1.2.3.4.5"
    first = derive_result_uid(ORG_ROOT, series, "ct_lung", "1.0", "seg")
    assert first == derive_result_uid(ORG_ROOT, series, "ct_lung", "1.0", "seg")
    assert first.startswith(ORG_ROOT) and len(first) <= 64 and pydicom.uid.UID(first).is_valid
    others = {
        derive_result_uid(ORG_ROOT, series, "ct_lung", "1.0", "seg", index=1),
        derive_result_uid(ORG_ROOT, series, "ct_lung", "1.0", "seg-series"),
        derive_result_uid(ORG_ROOT, series, "ct_lung", "1.1", "seg"),
        derive_result_uid(ORG_ROOT, "1.2.3.4.6", "ct_lung", "1.0", "seg"),
        derive_result_uid(ORG_ROOT, series, "ct_lun", "g1.0", "seg"),  # no ambiguity from concatenation
    }
    assert first not in others and len(others) == 5


TOO_LONG_ROOT = "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18."


@pytest.mark.parametrize("root", ["1.2.3", "1.02.3.", "1..2.", "abc.", "", TOO_LONG_ROOT])
def test_derive_result_uid_rejects_bad_org_root(root: str) -> None:
    with pytest.raises(ValueError, match="org_root"):
        derive_result_uid(root, "1.2.3", "ct_lung", "1.0", "seg")


def test_derive_result_uid_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        derive_result_uid(ORG_ROOT, "1.2.3", "ct_lung", "1.0", "segmentation")


def test_result_context_validates_org_root() -> None:
    with pytest.raises(ValueError, match="org_root"):
        ResultContext(org_root="1.2.3")


# --- builders' other behaviours -------------------------------------------------------------------------


def test_float_mask_gives_fractional_seg(small_case: Case) -> None:
    rows, columns = small_case.volume.array.shape[1:]
    yy, xx = np.mgrid[:rows, :columns]
    soft = np.exp(-((yy - rows / 2) ** 2 + (xx - columns / 2) ** 2) / 300.0).astype(np.float32)[None]
    segment = replace(small_case.result.segments[0], mask=soft)
    seg = build_seg(small_case.volume, PipelineResult(segments=[segment]), small_case.manifest, small_case.ctx)
    assert (seg.SegmentationType, seg.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert check_result(seg, small_case.volume.sources, manifest=small_case.manifest) == []


def test_series_description_keeps_warning_within_lo_limit(lung_case: Case) -> None:
    long = lung_case.manifest.model_copy(update={"title": "A very long title " * 8})
    text = series_description(long, "SEG")
    assert len(text) <= 64 and text.startswith("AI SEG") and text.endswith("not for diagnostic use")


def test_sr_without_seg_for_segmented_result_is_refused(lung_case: Case) -> None:
    with pytest.raises(ValueError, match="SEG"):
        build_sr(lung_case.volume, lung_case.result, lung_case.manifest, lung_case.ctx, None)
    with pytest.raises(ValueError, match="seg"):
        write_results(lung_case.volume, lung_case.result, lung_case.manifest, lung_case.ctx, kinds=("sr",))


def test_result_without_segments_gives_series_level_sr(lung_case: Case) -> None:
    result = PipelineResult(measurements=[m for m in lung_case.result.measurements if m.segment_number is None],
                            findings=lung_case.result.findings)
    objects = write_results(lung_case.volume, result, lung_case.manifest, lung_case.ctx)
    assert [result_kind(ds) for ds in objects] == ["SR", "SC"]
    for ds in objects:
        assert check_result(ds, lung_case.volume.sources, None, lung_case.manifest) == []


def test_single_component_patient_name_is_kept_and_never_quoted(small_case: Case) -> None:
    # highdicom warns about names without '^' and quotes the name in the warning: PHI in logs.
    source = deepcopy(small_case.volume.sources[0])
    source.PatientName = "Anonymized"
    volume = replace(small_case.volume, sources=(source,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objects = write_results(volume, small_case.result, small_case.manifest, small_case.ctx)
    assert not [w for w in caught if "Anonymized" in str(w.message)]
    for ds in objects:
        assert ds.PatientName == "Anonymized"
        assert check_result(ds, volume.sources, objects[0], small_case.manifest) == []


def test_save_is_atomic_and_replaces(lung_case: Case, tmp_path: Path) -> None:
    ds = lung_case.objects["SR"]
    first = save(ds, tmp_path)
    second = save(ds, tmp_path)
    assert first == second and [p.name for p in tmp_path.iterdir()] == [first.name]
    assert pydicom.dcmread(first).SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_save_refuses_invalid_uid_as_file_name(lung_case: Case, tmp_path: Path) -> None:
    ds = deepcopy(lung_case.objects["SR"])
    ds.SOPInstanceUID = "../../etc/passwd"
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        save(ds, tmp_path)


# --- the validator catches what it claims to ------------------------------------------------------------


def broken(case: Case, kind: str, change) -> list[str]:
    ds = deepcopy(case.objects[kind])
    change(ds)
    return problems_of(case, ds)


def test_check_catches_altered_patient_name_without_quoting_it(lung_case: Case) -> None:
    def rename(ds: Dataset) -> None:
        ds.PatientName = "Someone^Else"

    problems = broken(lung_case, "SEG", rename)
    assert any("PatientName (0010,0010)" in p for p in problems)
    assert not any("Someone" in p or "Phantom" in p for p in problems)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_check_catches_reencoded_date(lung_case: Case) -> None:
    def reencode(ds: Dataset) -> None:
        ds.StudyDate = ds.StudyDate + " "  # same date to a lenient reader, different bytes

    assert any("StudyDate (0008,0020)" in p for p in broken(lung_case, "SR", reencode))


def test_check_catches_missing_issuer_of_patient_id(lung_case: Case) -> None:
    def drop(ds: Dataset) -> None:
        del ds.IssuerOfPatientID

    assert any("IssuerOfPatientID (0010,0021)" in p for p in broken(lung_case, "SC", drop))


@pytest.mark.parametrize("kind", KINDS)
def test_check_catches_missing_pipeline_equipment_item(lung_case: Case, kind: str) -> None:
    def drop_ours(ds: Dataset) -> None:
        ds.ContributingEquipmentSequence = list(ds.ContributingEquipmentSequence)[:-1]

    assert any("ContributingEquipmentSequence (0018,A001)" in p for p in broken(lung_case, kind, drop_ours))


def test_check_catches_wrong_frame_of_reference(lung_case: Case) -> None:
    def move(ds: Dataset) -> None:
        ds.FrameOfReferenceUID = "1.2.3.4"

    assert any("FrameOfReferenceUID (0020,0052)" in p for p in broken(lung_case, "SEG", move))


def test_check_catches_reused_source_series_uid(lung_case: Case) -> None:
    def reuse(ds: Dataset) -> None:
        ds.SeriesInstanceUID = lung_case.volume.sources[0].SeriesInstanceUID

    assert any("SeriesInstanceUID (0020,000E)" in p for p in broken(lung_case, "SC", reuse))


def test_check_catches_file_meta_mismatch(lung_case: Case) -> None:
    def desync(ds: Dataset) -> None:
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"

    assert any("MediaStorageSOPInstanceUID (0002,0003)" in p for p in broken(lung_case, "SEG", desync))


def test_check_catches_dangling_frame_reference(lung_case: Case) -> None:
    def dangle(ds: Dataset) -> None:
        ref = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        ref.ReferencedSOPInstanceUID = "1.2.3.4"

    assert any("frame 1" in p and "SourceImageSequence" in p for p in broken(lung_case, "SEG", dangle))


def test_check_catches_verified_sr_and_missing_warning(lung_case: Case) -> None:
    def verify(ds: Dataset) -> None:
        ds.VerificationFlag = "VERIFIED"
        ds.SeriesDescription = "AI SR Lung segmentation"

    problems = broken(lung_case, "SR", verify)
    assert any("VerificationFlag (0040,A493)" in p for p in problems)
    assert any("SeriesDescription (0008,103E)" in p and "not for diagnostic use" in p for p in problems)


def test_check_catches_digitized_film_sc(lung_case: Case) -> None:
    def film(ds: Dataset) -> None:
        ds.ConversionType = "DI"
        ds.BurnedInAnnotation = "NO"

    problems = broken(lung_case, "SC", film)
    assert any("ConversionType (0008,0064)" in p for p in problems)
    assert any("BurnedInAnnotation (0028,0301)" in p for p in problems)


def test_check_catches_manual_segment(lung_case: Case) -> None:
    def manual(ds: Dataset) -> None:
        ds.SegmentSequence[0].SegmentAlgorithmType = "MANUAL"

    assert any("SegmentAlgorithmType (0062,0008)" in p for p in broken(lung_case, "SEG", manual))


def test_check_catches_uncoded_segment(lung_case: Case) -> None:
    def uncode(ds: Dataset) -> None:
        ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator = "99LOCAL"

    assert any("segment 2" in p and "SegmentedPropertyTypeCodeSequence" in p
               for p in broken(lung_case, "SEG", uncode))


def test_check_catches_sr_reference_to_missing_segment(lung_case: Case) -> None:
    def point_elsewhere(ds: Dataset) -> None:
        (measurements,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
        for item in measurements.ContentSequence[0].ContentSequence:
            if item.ConceptNameCodeSequence[0].CodeValue == "121191":
                item.ReferencedSOPSequence[0].ReferencedSegmentNumber = 7

    assert any("ReferencedSegmentNumber (0062,000B)" in p for p in broken(lung_case, "SR", point_elsewhere))


def test_check_catches_sr_evidence_missing_source(lung_case: Case) -> None:
    def forget(ds: Dataset) -> None:
        for study in ds.CurrentRequestedProcedureEvidenceSequence:
            for series in study.ReferencedSeriesSequence:
                series.ReferencedSOPSequence = list(series.ReferencedSOPSequence)[1:]

    assert any("CurrentRequestedProcedureEvidenceSequence (0040,A375)" in p
               for p in broken(lung_case, "SR", forget))


def test_check_catches_person_observer(lung_case: Case) -> None:
    def person(ds: Dataset) -> None:
        for item in ds.ContentSequence:
            if item.ConceptNameCodeSequence[0].CodeValue == "121005":
                item.ConceptCodeSequence[0].CodeValue = "121006"  # Person

    assert any("observer context is not a device" in p for p in broken(lung_case, "SR", person))


def test_check_catches_wrong_template(lung_case: Case) -> None:
    def retemplate(ds: Dataset) -> None:
        ds.ContentTemplateSequence[0].TemplateIdentifier = "2000"

    assert any("ContentTemplateSequence (0040,A504)" in p for p in broken(lung_case, "SR", retemplate))


def test_check_catches_unreadable_seg(lung_case: Case) -> None:
    def unreadable(ds: Dataset) -> None:
        del ds.SegmentSequence

    assert any("highdicom cannot read the SEG back" in p for p in broken(lung_case, "SEG", unreadable))


def test_gate_passes_good_results_with_dciodvfy(lung_case: Case, tmp_path: Path) -> None:
    gate(list(lung_case.objects.values()), lung_case.volume.sources, lung_case.manifest, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.dcm")) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in lung_case.objects.values()
    )


def test_gate_raises_listing_every_problem(lung_case: Case) -> None:
    seg, sr = deepcopy(lung_case.objects["SEG"]), deepcopy(lung_case.objects["SR"])
    seg.FrameOfReferenceUID = "1.2.3.4"
    sr.VerificationFlag = "VERIFIED"
    with pytest.raises(ResultValidationError) as raised:
        gate([seg, sr, lung_case.objects["SC"]], lung_case.volume.sources, lung_case.manifest)
    problems = raised.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(f"SEG {seg.SOPInstanceUID}: ") and "FrameOfReferenceUID" in problems[0]
    assert problems[1].startswith(f"SR {sr.SOPInstanceUID}: ") and "VerificationFlag" in problems[1]


def test_gate_reports_dciodvfy_errors(lung_case: Case, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    sc = deepcopy(lung_case.objects["SC"])
    del sc.BodyPartExamined  # without it dciodvfy wants Laterality, which the phantom does not have
    assert "Laterality" not in sc and check_result(sc, lung_case.volume.sources, manifest=lung_case.manifest) == []
    with pytest.raises(ResultValidationError) as raised:
        gate([sc], lung_case.volume.sources, lung_case.manifest, tmp_path)
    assert any("dciodvfy: Error" in p and "Laterality" in p for p in raised.value.problems)


# -- the gate with its read-back in a helper process, on objects built as they are checked --------------------


@pytest.fixture(scope="module")
def read_back_helper() -> Iterator[ReadBackProcess]:
    helper = ReadBackProcess()
    yield helper
    helper.shutdown()


def test_gate_with_the_read_back_elsewhere_finds_an_unreadable_seg_and_saves_nothing_it_passes(
        lung_case: Case, read_back_helper: ReadBackProcess, tmp_path: Path) -> None:
    seg = deepcopy(lung_case.objects["SEG"])
    del seg.SegmentSequence
    with pytest.raises(ResultValidationError) as raised:
        gate([seg, lung_case.objects["SR"], lung_case.objects["SC"]], lung_case.volume.sources, lung_case.manifest,
             tmp_path, read_back=read_back_helper)
    assert any(p.startswith(f"SEG {seg.SOPInstanceUID}: ") and "highdicom cannot read the SEG back" in p
               for p in raised.value.problems)
    # An SR the helper is too busy to take (it reads back the SEG) is read back in this process: still checked.
    sr = deepcopy(lung_case.objects["SR"])
    del sr.ContentSequence
    with pytest.raises(ResultValidationError) as raised:
        gate([lung_case.objects["SEG"], sr, lung_case.objects["SC"]], lung_case.volume.sources, lung_case.manifest,
             tmp_path / "sr", read_back=read_back_helper)
    assert any(p.startswith(f"SR {sr.SOPInstanceUID}: ") and "highdicom cannot read the SR back" in p
               for p in raised.value.problems)
    good = gate(iter(lung_case.objects.values()), lung_case.volume.sources, lung_case.manifest, tmp_path / "good",
                read_back=read_back_helper)
    assert [ds.SOPInstanceUID for ds in good] == [ds.SOPInstanceUID for ds in lung_case.objects.values()]


def test_while_the_helper_reads_back_an_object_the_next_is_read_back_here(
        lung_case: Case, read_back_helper: ReadBackProcess) -> None:
    """An object does not wait behind the SEG the helper is reading back: it is checked in the worker, when
    its answer is asked for; both answers are the read-back's own."""
    seg, sr = lung_case.objects["SEG"], lung_case.objects["SR"]
    broken = deepcopy(sr)
    del broken.ContentSequence
    helper_answer = read_back_helper("SEG", str(seg.SOPClassUID), encode(seg))
    here = read_back_helper("SR", str(sr.SOPClassUID), encode(broken))
    assert isinstance(here, DeferredCheck) and not here.done()  # made when asked for, in this process
    assert here.result() == encoded_readback_problems("SR", str(sr.SOPClassUID), encode(broken)) != []
    assert helper_answer.result(timeout=60) == []
    later = read_back_helper("SR", str(sr.SOPClassUID), encode(sr))  # the helper is free again
    assert later.result(timeout=60) == []


def test_a_failed_read_back_helper_leaves_the_read_back_to_the_worker(lung_case: Case, tmp_path: Path) -> None:
    helper = ReadBackProcess()
    for process in list(helper._pool._processes.values()):
        process.kill()
        process.join()
    seg = deepcopy(lung_case.objects["SEG"])
    del seg.SegmentSequence
    with pytest.raises(ResultValidationError) as raised:
        gate([seg], lung_case.volume.sources, lung_case.manifest, read_back=helper)
    assert any("highdicom cannot read the SEG back" in p for p in raised.value.problems)
    assert helper._pool is None  # read back here from now on
    gate([lung_case.objects["SC"]], lung_case.volume.sources, lung_case.manifest, read_back=helper)


def test_a_job_whose_result_fails_validation_fails_and_returns_no_file_to_send(tmp_path: Path, monkeypatch) -> None:
    """The objects are checked as they are built: a bad one fails the job, whatever was saved before it."""
    import dicom_ai_node.results.writer as writer
    from conftest import free_port, node_config
    from dicom_ai_node.jobs.executor import JobRunner, JobSpec
    from dicom_ai_node.pipeline import discover

    config = node_config(tmp_path / "node", free_port())
    runner = JobRunner(config, discover([Path(__file__).resolve().parent.parent / "pipelines"]), "cpu",
                       ReadBackProcess())
    build_sr = writer.SR_BUILDERS["full"]

    def verified_sr(*args, **kwargs):
        sr = build_sr(*args, **kwargs)
        sr.VerificationFlag = "VERIFIED"  # a machine-made report must say UNVERIFIED
        return sr

    monkeypatch.setitem(writer.SR_BUILDERS, "full", verified_sr)
    paths = make_chest_phantom(slices=24, size=48, pixel_spacing_mm=3.0, slice_thickness_mm=5.0,
                               uid_seed="gate-job").write(tmp_path / "series")
    with pytest.raises(ResultValidationError, match="VerificationFlag"):
        runner.run(JobSpec(1, "ct_lung", tuple(str(p) for p in paths)))
    runner.read_back.shutdown()
