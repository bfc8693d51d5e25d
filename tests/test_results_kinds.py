"""Every result kind (SEG in three encodings, TID 1500 SR, key-image SC, Parametric Map, heatmap SC, GSPS)
from real pydicom images (CT_small, MR_small, a CR chest radiograph) and a generated chest phantom, also as
one Enhanced CT multi-frame instance (references name the source's frames).

Each object passes the node's validator and dciodvfy, and highdicom (or, for the GSPS, highdicom's
validating constructors) reads back the values that went in.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from functools import cache
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from test_imaging import enhanced_ct
from test_results import ANATOMICAL_STRUCTURE, CLINICAL_FINDING, ML, ORG_ROOT, VOLUME, manifest_in

from dicom_ai_node.imaging import Volume, load_series, load_volume
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.pipeline import (
    Concept,
    Detection,
    Finding,
    Heatmap,
    Manifest,
    Measurement,
    PipelineResult,
    Segment,
)
from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.seg import build_seg
from dicom_ai_node.results.sr import build_sr
from dicom_ai_node.results.uids import derive_result_uid
from dicom_ai_node.results.validate import check_result, content_items, dciodvfy_errors, gate, result_kind
from dicom_ai_node.results.writer import RESULT_KINDS, encode, save, write_results

LUNG = Concept("39607008", "SCT", "Lung")
THORAX = Concept("51185008", "SCT", "Thorax")
RIGHT = Concept("24028007", "SCT", "Right")
PNEUMOTHORAX = Concept("36118008", "SCT", "Pneumothorax")
EFFUSION = Concept("60046008", "SCT", "Pleural effusion")
NODULE = Concept("427359005", "SCT", "Solitary nodule of lung")
PROBABILITY_MAP = Concept("{probability}", "UCUM", "probability")
STRIPES = 12  # segments with pixels; one more, all zero, makes 13
ALL_KINDS = tuple(RESULT_KINDS)
SEG_TYPES = ("binary", "fractional", "labelmap")
SOURCES = ("phantom", "ct_small", "mr_small", "cr")
CLASSES = {"SEG": "SEG", "SR": "SR", "SC": "SC", "PM": "PM", "HEATMAP_SC": "SC", "PR": "PR"}


@cache
def source_volume(name: str, root: Path) -> Volume:
    if name == "phantom":
        phantom = make_chest_phantom(slices=12, size=64, pixel_spacing_mm=6.0, slice_thickness_mm=25.0)
        return load_volume(phantom.write(root / "phantom"))
    if name == "cr":
        path = get_testdata_file("RG1_UNCR.dcm")  # pydicom-data: a real CR chest PA, MONOCHROME1, no FoR
        if path is None:
            pytest.skip("pydicom-data's RG1_UNCR.dcm (a CR chest radiograph) is not installed")
        return load_series([path])
    return load_volume([get_testdata_file({"ct_small": "CT_small.dcm", "mr_small": "MR_small.dcm"}[name])])


def soft_blob(volume: Volume, peak_slice: int) -> np.ndarray:
    """A float map in [0.55, 1] peaking at the image centre of `peak_slice` (above 0.5 everywhere)."""
    slices, rows, columns = volume.array.shape
    yy, xx = np.mgrid[:rows, :columns]
    plane = np.exp(-((yy - rows / 2) ** 2 + (xx - columns / 2) ** 2) / (2 * (min(rows, columns) / 6) ** 2))
    weights = np.exp(-((np.arange(slices) - peak_slice) ** 2) / 8.0)
    return (0.55 + 0.45 * weights[:, None, None] * plane[None]).astype(np.float32)


def stripe_masks(volume: Volume) -> list[np.ndarray]:
    """STRIPES disjoint column stripes of soft values, absent from slice 0 of a multi-slice volume."""
    slices, rows, columns = volume.array.shape
    soft = soft_blob(volume, slices // 2)
    column_stripe = (np.arange(columns) * STRIPES) // columns
    first = 1 if slices > 1 else 0
    masks = []
    for number in range(STRIPES):
        mask = np.zeros(volume.array.shape, dtype=np.float32)
        mask[first:, :, column_stripe == number] = soft[first:, :, column_stripe == number]
        masks.append(mask)
    return masks


def detections(volume: Volume) -> list[Detection]:
    slices, rows, columns = volume.array.shape
    middle = slices // 2
    return [
        Detection("Nodule", NODULE, middle, probability=0.8, box=(rows // 4, columns // 4, rows // 2, columns // 2),
                  points=((rows * 3 // 8, columns * 3 // 8),)),
        Detection("Nodule", NODULE, middle, probability=0.35, points=((rows * 3 // 4, columns * 3 // 4),)),
    ]


def full_result(volume: Volume) -> PipelineResult:
    """Thirteen segments (the last empty), measurements, two classifications, a heatmap, two detections."""
    masks = stripe_masks(volume)
    segments = [
        Segment(number, f"Stripe {number}", ANATOMICAL_STRUCTURE, LUNG, mask)
        for number, mask in enumerate(masks, start=1)
    ]
    segments[0] = replace(segments[0], anatomic_region=THORAX, laterality=RIGHT, color_rgb=(255, 0, 0))
    segments.append(Segment(STRIPES + 1, "Nothing found", ANATOMICAL_STRUCTURE, LUNG,
                            np.zeros(volume.array.shape, dtype=bool)))
    return PipelineResult(
        segments=segments,
        measurements=[
            Measurement(VOLUME, float((masks[0] > 0.5).sum()) * volume.voxel_volume_ml, ML, segment_number=1),
            Measurement(VOLUME, 0.0, ML, segment_number=STRIPES + 1),
        ],
        findings=[Finding(CLINICAL_FINDING, PNEUMOTHORAX, 0.91), Finding(CLINICAL_FINDING, EFFUSION, 0.12)],
        heatmaps=[Heatmap("Grad-CAM pneumothorax", soft_blob(volume, volume.array.shape[0] * 2 // 3) - 0.55,
                          PROBABILITY_MAP)],
        detections=detections(volume),
    )


@dataclass(frozen=True)
class Build:
    volume: Volume
    result: PipelineResult
    manifest: Manifest
    ctx: ResultContext
    objects: dict[str, Dataset]  # SEG, SR, SC (key image), PM, HEATMAP_SC, PR
    paths: dict[str, Path]

    @property
    def seg(self) -> Dataset | None:
        return self.objects.get("SEG")


def object_key(ds: Dataset) -> str:
    kind = result_kind(ds)
    return "HEATMAP_SC" if kind == "SC" and ds.SeriesNumber == 9005 else kind


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kinds")


@pytest.fixture(scope="module")
def manifest(root: Path) -> Manifest:
    return manifest_in(root / "pipelines" / "ct_lung")


@pytest.fixture(scope="module")
def ctx() -> ResultContext:
    return ResultContext(org_root=ORG_ROOT, institution_name="Test Hospital")


@pytest.fixture(scope="module")
def build(root: Path, manifest: Manifest, ctx: ResultContext):
    """build(source, seg_type) -> Build, made on first use and kept for the module."""
    builds: dict[tuple[str, str], Build] = {}

    def get(source: str, seg_type: str = "binary") -> Build:
        if (source, seg_type) not in builds:
            volume = source_volume(source, root)
            result = full_result(volume)
            objects = {object_key(ds): ds for ds in write_results(volume, result, manifest, ctx, ALL_KINDS, seg_type)}
            out = root / "out" / source / seg_type
            builds[(source, seg_type)] = Build(volume, result, manifest, ctx, objects,
                                               {k: save(ds, out) for k, ds in objects.items()})
        return builds[(source, seg_type)]
    return get


def kinds_of(source: str) -> list[str]:
    # A Parametric Map needs a frame of reference, which a radiograph has not.
    return [k for k in CLASSES if not (source == "cr" and k == "PM")]


SOURCE_KINDS = [(source, kind) for source in SOURCES for kind in kinds_of(source)]


# --- every kind from every source meets the standards ----------------------------------------------------


@pytest.mark.parametrize(("source", "kind"), SOURCE_KINDS)
def test_object_passes_check_result_and_dciodvfy(build, source: str, kind: str) -> None:
    b = build(source)
    ds = b.objects[kind]
    assert result_kind(ds) == CLASSES[kind]
    assert check_result(ds, b.volume.sources, b.seg, b.manifest) == []
    assert check_result(pydicom.dcmread(b.paths[kind]), b.volume.sources, b.seg, b.manifest) == []
    errors = dciodvfy_errors(b.paths[kind])
    if errors is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    assert errors == []


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seg_type", ["fractional", "labelmap"])
def test_other_encodings_and_their_sr_pass(build, source: str, seg_type: str) -> None:
    b = build(source, seg_type)
    for kind in ("SEG", "SR"):
        assert check_result(b.objects[kind], b.volume.sources, b.seg, b.manifest) == [], kind
        errors = dciodvfy_errors(b.paths[kind])
        assert errors is None or errors == [], kind


@pytest.mark.parametrize("source", SOURCES)
def test_gate_passes_all_objects_with_dciodvfy(build, source: str, tmp_path: Path) -> None:
    b = build(source)
    gate(list(b.objects.values()), b.volume.sources, b.manifest, tmp_path)


def test_radiograph_gets_no_parametric_map_but_a_heatmap_sc(build) -> None:
    b = build("cr")
    assert "PM" not in b.objects and "HEATMAP_SC" in b.objects
    assert "FrameOfReferenceUID" not in b.volume.sources[0]


def enhanced_ct_volume(root: Path) -> Volume:
    """An Enhanced CT Image of the chest phantom (one instance, one frame per slice), loaded: highdicom's
    legacy conversion relabelled as Enhanced CT (test_imaging.enhanced_ct), its frames stored
    superior first so that frame order and slice order differ."""
    phantom = make_chest_phantom(slices=12, size=64, pixel_spacing_mm=6.0, slice_thickness_mm=25.0,
                                 uid_seed="enhanced")
    datasets = [pydicom.dcmread(path) for path in phantom.write(root / "enhanced-singles")]
    datasets.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
    mf = enhanced_ct(datasets, "results enhanced CT")
    folder = root / "enhanced"
    folder.mkdir(parents=True, exist_ok=True)
    mf.save_as(folder / "enhanced.dcm", enforce_file_format=True)
    return load_volume([folder / "enhanced.dcm"])


@pytest.fixture(scope="module")
def enhanced(root: Path, manifest: Manifest, ctx: ResultContext):
    """enhanced(seg_type, sr_profile) -> Build of every kind from the Enhanced CT source."""
    builds: dict[tuple[str, str], Build] = {}
    volume = enhanced_ct_volume(root)

    def get(seg_type: str = "binary", sr_profile: str = "full") -> Build:
        if (seg_type, sr_profile) not in builds:
            result = full_result(volume)
            objects = {object_key(ds): ds for ds in write_results(volume, result, manifest, ctx, ALL_KINDS,
                                                                  seg_type, sr_profile=sr_profile)}
            out = root / "out" / "enhanced" / f"{seg_type}-{sr_profile}"
            builds[(seg_type, sr_profile)] = Build(volume, result, manifest, ctx, objects,
                                                   {k: save(ds, out) for k, ds in objects.items()})
        return builds[(seg_type, sr_profile)]
    return get


def referenced_frames(refs) -> list[tuple[str, list[int]]]:
    """(ReferencedSOPInstanceUID, ReferencedFrameNumber values) of reference items."""
    out = []
    for ref in refs:
        value = ref.get("ReferencedFrameNumber")
        numbers = [] if value is None else [int(v) for v in (value if isinstance(value, MultiValue)
                                                              else [value])]
        out.append((str(ref.ReferencedSOPInstanceUID), numbers))
    return out


def test_enhanced_ct_source_is_one_multiframe_instance(enhanced) -> None:
    volume = enhanced().volume
    assert volume.is_multiframe and len(volume.source_instances) == 1
    assert volume.slices_in_frame_order() != list(range(volume.array.shape[0]))  # frames stored superior first


@pytest.mark.parametrize(("seg_type", "sr_profile"), [("binary", "full"), ("fractional", "viewer"),
                                                       ("labelmap", "full")])
def test_enhanced_multiframe_source_every_kind_passes(enhanced, seg_type: str, sr_profile: str) -> None:
    """Every kind from an Enhanced CT Image Storage source (per-frame references, ReferencedFrameNumber)."""
    b = enhanced(seg_type, sr_profile)
    assert set(b.objects) == set(CLASSES)
    for kind, ds in b.objects.items():
        assert check_result(ds, b.volume.sources, b.seg, b.manifest, sr_profile) == [], kind
        assert check_result(pydicom.dcmread(b.paths[kind]), b.volume.sources, b.seg, b.manifest,
                            sr_profile) == [], kind
        errors = dciodvfy_errors(b.paths[kind])
        assert errors is None or errors == [], (kind, errors)


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_enhanced_seg_frames_reference_their_source_frames(enhanced, seg_type: str) -> None:
    b = enhanced(seg_type)
    (source,) = b.volume.source_instances
    seg = seg_read_back(b)
    assert seg.get_source_image_uids() == [(str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
                                           str(source.SOPInstanceUID))]
    source_positions = {
        number: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for number, item in enumerate(source.PerFrameFunctionalGroupsSequence, start=1)
    }
    frames = b.seg.PerFrameFunctionalGroupsSequence
    assert frames
    for item in frames:
        (ref,) = item.DerivationImageSequence[0].SourceImageSequence
        [(uid, [number])] = referenced_frames([ref])
        assert uid == str(source.SOPInstanceUID)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, source_positions[number], atol=1e-3)


def test_enhanced_parametric_map_frames_reference_their_source_frames(enhanced) -> None:
    b = enhanced()
    (source,) = b.volume.source_instances
    pmap = b.objects["PM"]
    assert int(pmap.NumberOfFrames) == int(source.NumberOfFrames)
    order = b.volume.slices_in_frame_order()
    for number, (item, source_item) in enumerate(zip(pmap.PerFrameFunctionalGroupsSequence,
                                                     source.PerFrameFunctionalGroupsSequence), start=1):
        [(uid, numbers)] = referenced_frames(item.DerivationImageSequence[0].SourceImageSequence)
        assert (uid, numbers) == (str(source.SOPInstanceUID), [number])
        assert np.allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in source_item.PlanePositionSequence[0].ImagePositionPatient], atol=1e-3)
    values = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(b.paths["PM"])).pixel_array
    assert np.allclose(values, b.result.heatmaps[0].array[order])


def test_enhanced_binary_seg_masks_read_back(enhanced) -> None:
    b = enhanced("binary")
    seg = seg_read_back(b)
    (source,) = b.volume.source_instances
    order = b.volume.slices_in_frame_order()
    frame_numbers = [b.volume.frame_numbers[k] for k in order]
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=str(source.SOPInstanceUID), source_frame_numbers=frame_numbers,
        segment_numbers=list(range(1, STRIPES + 2)), assert_missing_frames_are_empty=True,
    )
    for index, segment in enumerate(b.result.segments):
        assert np.array_equal(pixels[..., index] > 0, segment.mask[order] > 0.5), segment.number


def test_enhanced_renderings_and_reports_name_frames(enhanced) -> None:
    b = enhanced("binary", "viewer")
    uid = str(b.volume.source_instances[0].SOPInstanceUID)
    frames = set(b.volume.frame_numbers)
    for kind in ("SC", "HEATMAP_SC"):
        [(ref_uid, numbers)] = referenced_frames(b.objects[kind].SourceImageSequence)
        assert ref_uid == uid and len(numbers) == 1 and numbers[0] in frames, kind
    for sr in (enhanced("binary", "full").objects["SR"], b.objects["SR"]):
        evidence = [ref for study in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
        assert [str(r.ReferencedSOPInstanceUID) for r in evidence].count(uid) == 1
        refs = [ref for item in content_items(sr.ContentSequence) if item.get("ValueType") == "IMAGE"
                for ref in item.ReferencedSOPSequence if str(ref.ReferencedSOPInstanceUID) == uid]
        assert refs
        assert all(len(numbers) == 1 and numbers[0] in frames for _, numbers in referenced_frames(refs))
    gsps = b.objects["PR"]
    for annotation in gsps.GraphicAnnotationSequence:
        [(ref_uid, numbers)] = referenced_frames(annotation.ReferencedImageSequence)
        assert ref_uid == uid and len(numbers) == 1 and numbers[0] in frames
    middle = b.volume.array.shape[0] // 2
    assert referenced_frames(gsps.GraphicAnnotationSequence[0].ReferencedImageSequence)[0][1] == \
        [b.volume.frame_numbers[middle]]


def test_check_catches_frame_number_outside_the_source(enhanced) -> None:
    b = enhanced("binary")
    seg = copy.deepcopy(b.objects["SEG"])
    seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0] \
        .ReferencedFrameNumber = 99
    assert any("ReferencedFrameNumber" in p for p in check_result(seg, b.volume.sources, None, b.manifest))
    sc = copy.deepcopy(b.objects["SC"])
    sc.SourceImageSequence[0].ReferencedFrameNumber = 0
    assert any("ReferencedFrameNumber" in p for p in check_result(sc, b.volume.sources, None, b.manifest))
    del sc.SourceImageSequence[0].ReferencedFrameNumber  # a slice of a multi-frame source names its frame
    assert any("ReferencedFrameNumber" in p for p in check_result(sc, b.volume.sources, None, b.manifest))
    gsps = copy.deepcopy(b.objects["PR"])
    gsps.GraphicAnnotationSequence[0].ReferencedImageSequence[0].ReferencedFrameNumber = 13
    assert any("ReferencedFrameNumber" in p for p in check_result(gsps, b.volume.sources, None, b.manifest))
    sr = copy.deepcopy(b.objects["SR"])
    uid = str(b.volume.source_instances[0].SOPInstanceUID)
    ref = next(ref for item in content_items(sr.ContentSequence) if item.get("ValueType") == "IMAGE"
               for ref in item.ReferencedSOPSequence if str(ref.ReferencedSOPInstanceUID) == uid)
    ref.ReferencedFrameNumber = 13
    assert any("ReferencedFrameNumber" in p for p in check_result(sr, b.volume.sources, b.seg, b.manifest))


def test_several_multiframe_instances_are_refused_for_seg(enhanced, manifest: Manifest, ctx: ResultContext) -> None:
    volume = enhanced().volume
    (source,) = volume.source_instances
    other = copy.deepcopy(source)
    other.SOPInstanceUID = generate_uid(entropy_srcs=["other half"])
    half = volume.array.shape[0] // 2
    split = replace(volume, sources=(*volume.sources[:half], *([other] * (len(volume.sources) - half))))
    with pytest.raises(ValueError, match=str(source.SeriesInstanceUID)):
        build_seg(split, full_result(split), manifest, ctx)


# --- SEG: three encodings, many segments, empty segments, coding, radiographs ----------------------------


def seg_read_back(b: Build) -> hd.seg.Segmentation:
    return hd.seg.Segmentation.from_dataset(pydicom.dcmread(b.paths["SEG"]))


def source_uids(b: Build) -> list[str]:
    return [str(s.SOPInstanceUID) for s in b.volume.sources]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_seg_reads_back_labels_and_types(build, source: str, seg_type: str) -> None:
    b = build(source, seg_type)
    seg = seg_read_back(b)
    assert seg.segmentation_type.value == seg_type.upper()
    numbers = list(range(1, STRIPES + 2))
    assert seg.segment_numbers == numbers  # the empty segment keeps its number and description
    assert [seg.get_segment_description(n).SegmentLabel for n in numbers] == [
        *(f"Stripe {n}" for n in range(1, STRIPES + 1)), "Nothing found"]
    for n in numbers:
        description = seg.get_segment_description(n)
        assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == LUNG.value
        assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == ANATOMICAL_STRUCTURE.value
    assert seg.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.66.7" if seg_type == "labelmap"
                               else "1.2.840.10008.5.1.4.1.1.66.4")


def test_segment_coding_reads_back(build) -> None:
    description = seg_read_back(build("phantom")).get_segment_description(1)
    assert description.AnatomicRegionSequence[0].CodeValue == THORAX.value
    assert description.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == RIGHT.value
    assert "RecommendedDisplayCIELabValue" in description
    assert description.SegmentAlgorithmName == "ct_lung"


@pytest.mark.parametrize("source", SOURCES)
def test_binary_seg_masks_read_back(build, source: str) -> None:
    b = build(source, "binary")
    pixels = seg_read_back(b).get_pixels_by_source_instance(
        source_uids(b), segment_numbers=list(range(1, STRIPES + 2)), assert_missing_frames_are_empty=True,
    )
    for index, segment in enumerate(b.result.segments):
        assert np.array_equal(pixels[..., index] > 0, segment.mask > 0.5), segment.number


@pytest.mark.parametrize("source", SOURCES)
def test_fractional_seg_values_within_one_step(build, source: str) -> None:
    b = build(source, "fractional")
    seg = seg_read_back(b)
    assert seg.SegmentationFractionalType == "PROBABILITY"
    pixels = seg.get_pixels_by_source_instance(
        source_uids(b), segment_numbers=list(range(1, STRIPES + 2)), assert_missing_frames_are_empty=True,
    )
    for index, segment in enumerate(b.result.segments):
        assert np.abs(pixels[..., index] - segment.mask).max() <= 1 / 255 + 1e-6, segment.number


@pytest.mark.parametrize("source", SOURCES)
def test_labelmap_seg_reads_back_as_labels(build, source: str) -> None:
    b = build(source, "labelmap")
    labels = seg_read_back(b).get_pixels_by_source_instance(
        source_uids(b), combine_segments=True, assert_missing_frames_are_empty=True,
    )
    expected = np.zeros(b.volume.array.shape, dtype=int)
    for segment in b.result.segments:
        expected[segment.mask > 0.5] = segment.number
    assert np.array_equal(labels, expected)


def test_empty_segment_is_described_with_no_frames(build) -> None:
    seg = build("phantom", "binary").objects["SEG"]
    referenced = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                  for f in seg.PerFrameFunctionalGroupsSequence}
    assert STRIPES + 1 in {int(s.SegmentNumber) for s in seg.SegmentSequence}
    assert referenced == set(range(1, STRIPES + 1))
    assert seg.NumberOfFrames == STRIPES * (len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) - 1)


def test_seg_of_a_radiograph_maps_pixel_for_pixel(build) -> None:
    seg = build("cr").objects["SEG"]
    source = build("cr").volume.sources[0]
    assert "FrameOfReferenceUID" not in seg
    assert list(seg.PatientOrientation) == list(source.PatientOrientation)
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]  # the CR's 0\0 is not copied
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_labelmap_refuses_overlapping_segments(build) -> None:
    b = build("ct_small")
    overlapping = replace(b.result.segments[1], mask=b.result.segments[0].mask)
    result = replace(b.result, segments=[b.result.segments[0], overlapping, *b.result.segments[2:]])
    with pytest.raises(ValueError, match="segments 1 and 2 overlap"):
        build_seg(b.volume, result, b.manifest, b.ctx, "labelmap")


def test_unknown_seg_type_is_refused(build) -> None:
    b = build("ct_small")
    with pytest.raises(ValueError, match="seg_type"):
        write_results(b.volume, b.result, b.manifest, b.ctx, seg_type="bitmap")


# --- SR: classifications only, detections as planar groups ---------------------------------------------


def classification_result() -> PipelineResult:
    return PipelineResult(findings=[Finding(CLINICAL_FINDING, PNEUMOTHORAX, 0.91),
                                    Finding(CLINICAL_FINDING, EFFUSION, 0.12)])


@pytest.mark.parametrize("source", SOURCES)
def test_classification_only_result_gets_a_valid_sr(build, source: str, tmp_path: Path) -> None:
    b = build(source)
    objects = write_results(b.volume, classification_result(), b.manifest, b.ctx, ("seg", "sr"))
    assert [result_kind(ds) for ds in objects] == ["SR"]
    (sr,) = objects
    assert check_result(sr, b.volume.sources, None, b.manifest) == []
    errors = dciodvfy_errors(save(sr, tmp_path))
    assert errors is None or errors == []
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(save(sr, tmp_path))).content
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Pneumothorax", "Pleural effusion"]
    assert len({g.tracking_uid for g in groups}) == 2
    for group, answer in zip(groups, (PNEUMOTHORAX, EFFUSION)):
        (evaluation,) = group.get_qualitative_evaluations()
        assert (evaluation.name.value, evaluation.value.value) == (CLINICAL_FINDING.value, answer.value)
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid in source_uids(b)


def test_classification_sr_content_tree(build) -> None:
    """Golden structure of a classification-only TID 1500 tree (a radiograph: its one image is the source)."""
    b = build("cr")
    sr = build_sr(b.volume, classification_result(), b.manifest, b.ctx, None)

    def code(item: Dataset) -> str:
        return item.ConceptNameCodeSequence[0].CodeValue

    assert (sr.ContentTemplateSequence[0].TemplateIdentifier, sr.ConceptNameCodeSequence[0].CodeValue) == (
        "1500", "126000")
    root = {code(i): i for i in sr.ContentSequence}
    assert root["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # observer: a device
    assert root["121058"].ConceptCodeSequence[0].CodeValue == "43468-8"  # procedure: XR, unspecified region
    assert [code(i) for i in sr.ContentSequence][-1] == "126010"  # Imaging Measurements last
    groups = list(root["126010"].ContentSequence)
    assert [g.ContentTemplateSequence[0].TemplateIdentifier for g in groups] == ["1501", "1501"]
    source = b.volume.sources[0]
    for group, answer, probability in zip(groups, (PNEUMOTHORAX, EFFUSION), (0.91, 0.12)):
        assert (group.ValueType, code(group)) == ("CONTAINER", "125007")  # Measurement Group
        items = [(i.ValueType, i.RelationshipType, code(i)) for i in group.ContentSequence]
        assert items == [
            ("TEXT", "HAS OBS CONTEXT", "112039"),  # Tracking Identifier
            ("UIDREF", "HAS OBS CONTEXT", "112040"),  # Tracking Unique Identifier
            ("TEXT", "HAS CONCEPT MOD", "111001"),  # Algorithm Name
            ("TEXT", "HAS CONCEPT MOD", "111003"),  # Algorithm Version
            ("CODE", "CONTAINS", CLINICAL_FINDING.value),  # the classification
            ("IMAGE", "CONTAINS", "121112"),  # Source of Measurement
        ]
        by_code = {code(i): i for i in group.ContentSequence}
        assert by_code["112039"].TextValue == answer.meaning
        assert by_code["121112"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        finding = by_code[CLINICAL_FINDING.value]
        assert finding.ConceptCodeSequence[0].CodeValue == answer.value
        (prob,) = finding.ContentSequence
        probability_item = ("NUM", "HAS PROPERTIES", "122157")  # DCM Probability
        assert (prob.ValueType, prob.RelationshipType, code(prob)) == probability_item
        assert float(prob.MeasuredValueSequence[0].NumericValue) == pytest.approx(probability)


@pytest.mark.parametrize("source", SOURCES)
def test_detections_are_planar_groups_with_scoords(build, source: str) -> None:
    b = build(source)
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(b.paths["SR"])).content
    groups = report.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Nodule", "Nodule point 1", "Nodule"]
    rows, columns = b.volume.array.shape[1:]
    key = b.volume.sources[b.volume.array.shape[0] // 2]
    expected = [
        ("POLYLINE", [[columns // 4, rows // 4], [columns // 2, rows // 4], [columns // 2, rows // 2],
                      [columns // 4, rows // 2], [columns // 4, rows // 4]], 0.8),
        ("POINT", [[columns * 3 // 8 + 0.5, rows * 3 // 8 + 0.5]], 0.8),
        ("POINT", [[columns * 3 // 4 + 0.5, rows * 3 // 4 + 0.5]], 0.35),
    ]
    for group, (graphic_type, data, probability) in zip(groups, expected):
        region = group.roi
        assert region.graphic_type.value == graphic_type
        assert np.allclose(region.value, data)
        (image,) = region.ContentSequence  # SELECTED FROM the source image
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
        assert group.finding_type.value == NODULE.value
        (measured,) = group.get_measurements()
        assert (measured.name.meaning, measured.value) == ("Probability", pytest.approx(probability))


def test_detection_outside_the_image_is_refused(build) -> None:
    b = build("ct_small")
    rows = b.volume.array.shape[1]
    outside = Detection("Nodule", NODULE, 0, box=(rows - 4, 0, rows + 4, 8))
    with pytest.raises(ValueError, match="detection 1 .* outside"):
        write_results(b.volume, PipelineResult(detections=[outside]), b.manifest, b.ctx, ("sr",))


# --- Parametric Map ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [s for s in SOURCES if s != "cr"])
def test_parametric_map_reads_back_float_values(build, source: str) -> None:
    b = build(source)
    pmap = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(b.paths["PM"]))
    heatmap = b.result.heatmaps[0]
    index = {uid: i for i, uid in enumerate(source_uids(b))}
    assert pmap.pixel_array.dtype == np.float32 and pmap.NumberOfFrames == len(index)
    for frame, item in zip(pmap.pixel_array.reshape(-1, *heatmap.array.shape[1:]),
                           pmap.PerFrameFunctionalGroupsSequence):
        slice_index = index[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose(frame, heatmap.array[slice_index], atol=1e-6)
    mapping = pmap.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert (mapping.LUTLabel, mapping.LUTExplanation) == ("Grad-CAM pneumot", "Grad-CAM pneumothorax")
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == PROBABILITY_MAP.value
    assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) == pytest.approx(float(heatmap.array.max()))
    assert pmap.FrameOfReferenceUID == b.volume.sources[0].FrameOfReferenceUID
    assert list(pmap.ImageType)[0] == "DERIVED"
    assert pmap.ContributingEquipmentSequence[-1].ManufacturerModelName == "ct_lung"


def test_parametric_map_copies_body_part(build) -> None:
    assert build("phantom").objects["PM"].BodyPartExamined == "CHEST"


# --- heatmap Secondary Capture ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_heatmap_sc_draws_the_max_slice_with_colour_bar(build, source: str) -> None:
    b = build(source)
    ds = pydicom.dcmread(b.paths["HEATMAP_SC"])
    heatmap = b.result.heatmaps[0]
    max_slice = int(np.unravel_index(np.argmax(heatmap.array), heatmap.array.shape)[0])
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == b.volume.sources[max_slice].SOPInstanceUID
    assert (ds.PhotometricInterpretation, ds.ConversionType, ds.BurnedInAnnotation) == ("RGB", "WSD", "YES")
    assert ds.SeriesNumber == 9005 and "heatmap" in ds.SeriesDescription
    pixels = ds.pixel_array.astype(int)
    factor = ds.Rows // b.volume.array.shape[1]
    centre = pixels[ds.Rows // 2 - factor:ds.Rows // 2 + factor, ds.Columns // 2 - factor:ds.Columns // 2 + factor]
    assert (centre[..., 0] - centre[..., 2]).min() > 60  # the peak is drawn red
    colourful = np.abs(pixels[..., 0] - pixels[..., 2]) > 60
    assert colourful[:, -ds.Columns // 8:].sum() > 100  # the colour bar at the right edge


def test_heatmap_sc_follows_key_slice(build) -> None:
    b = build("phantom")
    result = replace(b.result, key_slice=1)
    (sc,) = write_results(b.volume, result, b.manifest, b.ctx, ("heatmap_sc",))
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == b.volume.sources[1].SOPInstanceUID


def test_radiograph_renderings_keep_its_polarity(build) -> None:
    """MONOCHROME1 shows low stored values white: so do the renderings (bone bright, lung dark)."""
    b = build("cr")
    source = b.volume.sources[0]
    assert source.PhotometricInterpretation == "MONOCHROME1"
    stored = source.pixel_array
    low, high = stored < np.percentile(stored, 10), stored > np.percentile(stored, 90)
    for kind in ("SC", "HEATMAP_SC"):
        gray = b.objects[kind].pixel_array.astype(int).mean(axis=-1)
        assert gray[low].mean() > gray[high].mean() + 50, kind


# --- GSPS ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_gsps_draws_detections_on_their_slice(build, source: str) -> None:
    b = build(source)
    ds = pydicom.dcmread(b.paths["PR"])
    key = b.volume.sources[b.volume.array.shape[0] // 2]
    listed = {i.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for i in s.ReferencedImageSequence}
    assert listed == set(source_uids(b))  # the state applies to the whole series
    (annotation,) = ds.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    assert annotation.GraphicLayer == ds.GraphicLayerSequence[0].GraphicLayer
    graphics = [(g.GraphicType, g.GraphicAnnotationUnits, g.TrackingID) for g in annotation.GraphicObjectSequence]
    assert graphics == [("POLYLINE", "PIXEL", "Nodule"), ("POINT", "PIXEL", "Nodule point 1"),
                        ("POINT", "PIXEL", "Nodule")]
    rows, columns = b.volume.array.shape[1:]
    assert list(annotation.GraphicObjectSequence[0].GraphicData)[:4] == [columns // 4, rows // 4, columns // 2,
                                                                         rows // 4]
    texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
    assert texts == ["Nodule 0.80", "Nodule point 1 0.80", "Nodule 0.35"]


@pytest.mark.parametrize("source", SOURCES)
def test_gsps_tracking_uids_match_sr_planar_groups(build, source: str) -> None:
    b = build(source)
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(b.paths["SR"])).content
    (annotation,) = b.objects["PR"].GraphicAnnotationSequence
    assert [g.TrackingUID for g in annotation.GraphicObjectSequence] == [
        g.tracking_uid for g in report.get_planar_roi_measurement_groups()]


@pytest.mark.parametrize(("source", "shape"), [("phantom", "IDENTITY"), ("ct_small", "IDENTITY"),
                                               ("mr_small", "IDENTITY"), ("cr", "INVERSE")])
def test_gsps_keeps_source_window_and_polarity(build, source: str, shape: str) -> None:
    b = build(source)
    ds = b.objects["PR"]
    assert ds.PresentationLUTShape == shape  # a presentation state overrides MONOCHROME1
    source_ds = b.volume.sources[0]
    (voi,) = ds.SoftcopyVOILUTSequence
    if "WindowCenter" in source_ds:  # the source's own window
        assert (voi.WindowCenter, voi.WindowWidth) == (source_ds.WindowCenter, source_ds.WindowWidth)
    else:  # CT_small has none: the key image's lung window
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (-600.0, 1500.0)


def test_gsps_body_part_copied(build) -> None:
    assert build("phantom").objects["PR"].BodyPartExamined == "CHEST"


# --- determinism -----------------------------------------------------------------------------------------


def uids(objects: list[Dataset]) -> dict[str, tuple[str, str]]:
    return {object_key(ds): (ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in objects}


@pytest.mark.parametrize("source", SOURCES)
def test_rebuild_gives_identical_uids(build, source: str) -> None:
    b = build(source)
    again = write_results(b.volume, b.result, b.manifest, b.ctx, ALL_KINDS, "binary")
    assert uids(again) == uids(list(b.objects.values()))


def pydicom_file_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_objects_encode_as_pydicom_encodes_them(build, source: str, seg_type: str) -> None:
    """The node's encoder (results/encoding.py) gives pydicom's bytes for every kind; the saved file too."""
    b = build(source, seg_type)
    for kind, ds in b.objects.items():
        assert encode(copy.deepcopy(ds)) == pydicom_file_bytes(copy.deepcopy(ds)), kind
        assert b.paths[kind].read_bytes() == pydicom_file_bytes(copy.deepcopy(ds)), kind


@pytest.mark.parametrize(("seg_type", "sr_profile"), [("binary", "viewer"), ("fractional", "full")])
def test_multiframe_objects_encode_as_pydicom_encodes_them(enhanced, seg_type: str, sr_profile: str) -> None:
    for kind, ds in enhanced(seg_type, sr_profile).objects.items():
        assert encode(copy.deepcopy(ds)) == pydicom_file_bytes(copy.deepcopy(ds)), kind


def test_all_uids_of_one_build_differ(build) -> None:
    found = [uid for pair in uids(list(build("phantom").objects.values())).values() for uid in pair]
    assert len(set(found)) == len(found) == 12


def test_encodings_get_their_own_seg_and_sr_instances(build) -> None:
    by_type = {t: uids(list(build("ct_small", t).objects.values())) for t in SEG_TYPES}
    for kind in ("SEG", "SR"):
        assert len({by_type[t][kind][1] for t in SEG_TYPES}) == 3, kind  # one object, one UID
    for kind in ("SC", "PM", "HEATMAP_SC", "PR"):
        assert len({by_type[t][kind] for t in SEG_TYPES}) == 1, kind


def test_several_heatmaps_share_a_series_with_own_instances(build) -> None:
    b = build("ct_small")
    second = Heatmap("Grad-CAM effusion", b.result.heatmaps[0].array[::-1].copy())
    result = replace(b.result, heatmaps=[*b.result.heatmaps, second])
    objects = write_results(b.volume, result, b.manifest, b.ctx, ("pmap", "heatmap_sc"))
    assert [(result_kind(ds), int(ds.InstanceNumber)) for ds in objects] == [("PM", 1), ("PM", 2), ("SC", 1),
                                                                            ("SC", 2)]
    assert len({ds.SeriesInstanceUID for ds in objects[:2]}) == 1
    assert len({ds.SOPInstanceUID for ds in objects}) == 4
    for ds in objects:
        assert check_result(ds, b.volume.sources, manifest=b.manifest) == []


# --- the validator catches what it claims to for the new kinds -------------------------------------------


def problems_after(b: Build, kind: str, change) -> list[str]:
    ds = pydicom.dcmread(b.paths[kind])
    change(ds)
    return check_result(ds, b.volume.sources, b.seg, b.manifest)


def test_check_catches_parametric_map_off_the_frame_of_reference(build) -> None:
    def move(ds: Dataset) -> None:
        ds.FrameOfReferenceUID = "1.2.3.4"

    assert any("FrameOfReferenceUID (0020,0052)" in p for p in problems_after(build("phantom"), "PM", move))


def test_check_catches_original_parametric_map(build) -> None:
    def original(ds: Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "QUANTITY"]

    assert any("ImageType (0008,0008)" in p for p in problems_after(build("phantom"), "PM", original))


def test_check_catches_parametric_map_frame_from_elsewhere(build) -> None:
    def dangle(ds: Dataset) -> None:
        ref = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        ref.ReferencedSOPInstanceUID = "1.2.3.4"

    assert any("frame 1" in p for p in problems_after(build("phantom"), "PM", dangle))


def test_check_catches_gsps_annotation_on_another_image(build) -> None:
    def elsewhere(ds: Dataset) -> None:
        ds.GraphicAnnotationSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"

    assert any("annotation 1" in p for p in problems_after(build("phantom"), "PR", elsewhere))


def test_check_catches_gsps_for_another_series(build) -> None:
    def other_series(ds: Dataset) -> None:
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4"

    assert any("ReferencedSeriesSequence (0008,1115)" in p
               for p in problems_after(build("phantom"), "PR", other_series))


def test_check_catches_undrawable_gsps_graphic(build) -> None:
    def break_point(ds: Dataset) -> None:
        ds.GraphicAnnotationSequence[0].GraphicObjectSequence[1].GraphicData = [1.0, 2.0, 3.0, 4.0]

    assert any("cannot read the PR back" in p for p in problems_after(build("phantom"), "PR", break_point))


def test_check_catches_sr_scoord_on_another_image(build) -> None:
    def elsewhere(ds: Dataset) -> None:
        for item in ds.ContentSequence[-1].ContentSequence[-1].ContentSequence:
            for child in item.get("ContentSequence", []):
                if child.ValueType == "IMAGE":
                    child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"

    assert any("IMAGE content item" in p for p in problems_after(build("phantom"), "SR", elsewhere))


def test_dciodvfy_still_counts_real_errors_in_a_labelmap(build, tmp_path: Path) -> None:
    b = build("ct_small", "labelmap")
    if dciodvfy_errors(b.paths["SEG"]) is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    ds = pydicom.dcmread(b.paths["SEG"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.ContentLabel = "not a code string"  # CS allows upper case, digits, space and underscore only
    errors = dciodvfy_errors(save(ds, tmp_path))
    assert errors and all("Information Object Not found" not in e for e in errors)


def test_uid_part_separates_regions_and_keeps_old_uids() -> None:
    without = derive_result_uid(ORG_ROOT, "1.2.3", "ct_lung", "1.0", "seg")
    assert without == derive_result_uid(ORG_ROOT, "1.2.3", "ct_lung", "1.0", "seg", part=None)
    parts = {derive_result_uid(ORG_ROOT, "1.2.3", "ct_lung", "1.0", "seg", part=p) for p in (0, 1, 2)}
    assert len(parts) == 3 and without not in parts
