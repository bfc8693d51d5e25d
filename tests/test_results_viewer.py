"""The "viewer" SR profile (dicom_ai_node/results/sr_viewer.py) and the outlines it draws (outline.py).

Every measurement group of a viewer SR has image coordinates: a TID 1410 planar group per segment with the
outline of the segment where it is largest, series-level values and findings on the key slice, detections
as in the full SR. Outlines enclose exactly their component's pixels whatever the shape; the report passes
the node's validator and dciodvfy from every source and SEG encoding, and highdicom reads its values back.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from scipy import ndimage
from test_results import (
    ANATOMICAL_STRUCTURE,
    CLINICAL_FINDING,
    EMPHYSEMA,
    LAA950,
    LEFT_LUNG,
    ML,
    ORG_ROOT,
    PERCENT,
    RIGHT_LUNG,
    VOLUME,
    laa950_percent,
    manifest_in,
)
from test_results_kinds import LUNG, NODULE, SEG_TYPES, SOURCES, full_result, source_volume

from dicom_ai_node.imaging import Volume, load_volume
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.pipeline import Detection, Finding, Manifest, Measurement, PipelineResult, Segment
from dicom_ai_node.results.outline import convex_outline, image_border, largest_component, outer_boundary
from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.uids import derive_result_uid
from dicom_ai_node.results.validate import check_result, dciodvfy_errors, gate, groups_without_coordinates, result_kind
from dicom_ai_node.results.writer import save, write_results

FINDING_CATEGORY, FINDING, SOURCE_OF_MEASUREMENT, IMAGE_REGION = "276214006", "121071", "121112", "111030"
TRACKING_ID, TRACKING_UID, ALGORITHM_NAME, ALGORITHM_VERSION = "112039", "112040", "111001", "111003"
PROBABILITY, SOURCE = "122157", "260753009"


# --- outlines --------------------------------------------------------------------------------------------


def inside(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Exactly which pixel centres (c + 0.5, r + 0.5) lie inside a closed polygon (even-odd ray casting)."""
    rows, columns = np.mgrid[:shape[0], :shape[1]]
    x, y = columns + 0.5, rows + 0.5
    result = np.zeros(shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon[:-1], polygon[1:]):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        result ^= crosses & (x < at_x)
    return result


def rasterised(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The polygon filled by PIL, an independent rasteriser (it counts integer coordinates as pixel centres,
    so its fill reaches one pixel further right and down than the pixel-edge polygon)."""
    image = Image.new("1", (shape[1], shape[0]), 0)
    ImageDraw.Draw(image).polygon([tuple(point) for point in polygon], fill=1, outline=1)
    return np.array(image, dtype=bool)


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of the mask's edge, inside or out."""
    grown = ndimage.binary_dilation(mask, structure=np.ones((3, 3)))
    return grown & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3)), border_value=0)


def shoelace_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def has_collinear_corners(polygon: np.ndarray) -> bool:
    """Whether any corner (the closing point included) lies on the line through its two neighbours."""
    ring = polygon[:-1]
    before, after = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    into, out = ring - before, after - ring
    cross = into[:, 0] * out[:, 1] - into[:, 1] * out[:, 0]
    return bool(np.any(cross == 0))


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, columns = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(rows - centre[0], columns - centre[1]) <= radius


def l_shape() -> np.ndarray:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:17, 3:7] = True
    mask[13:17, 3:15] = True
    return mask


def ring() -> np.ndarray:
    """A ring: its outline ignores the hole, so it encloses the filled disk."""
    return disk((32, 32), (15, 16), 12) & ~disk((32, 32), (15, 16), 5)


def spiral() -> np.ndarray:
    """A one-pixel-wide square spiral: deeply concave, every corridor one pixel wide."""
    mask = np.zeros((21, 21), dtype=bool)
    top, left, bottom, right = 1, 1, 19, 19
    while top < bottom and left < right:
        mask[top, left:right + 1] = True
        mask[top:bottom + 1, right] = True
        mask[bottom, left:right + 1] = True
        mask[top + 2:bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    return mask


def diagonal_chain() -> np.ndarray:
    """Pixels touching only at corners: one 8-connected component, pinched at every corner."""
    mask = np.zeros((10, 10), dtype=bool)
    for i in range(1, 9):
        mask[i, i] = True
    return mask


def comb_at_the_border() -> np.ndarray:
    """Teeth reaching the image edges (the tracer must read beyond the image as background)."""
    mask = np.zeros((12, 16), dtype=bool)
    mask[:4, :] = True
    mask[:, 0:16:3] = True
    return mask


def random_blob(seed: int) -> np.ndarray:
    """A smoothed random field thresholded: irregular, with spurs, holes and several components."""
    noise = np.random.default_rng(seed).normal(size=(48, 48))
    return ndimage.gaussian_filter(noise, 2.0) > 0.05


def single_pixel() -> np.ndarray:
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 3] = True
    return mask


SHAPES = {"L": l_shape, "ring": ring, "spiral": spiral, "diagonal": diagonal_chain, "comb": comb_at_the_border,
          "pixel": single_pixel, **{f"blob{seed}": (lambda seed=seed: random_blob(seed)) for seed in range(6)}}


@pytest.mark.parametrize("name", SHAPES)
def test_outline_encloses_exactly_the_largest_component(name: str) -> None:
    mask = SHAPES[name]()
    component = largest_component(mask)
    filled = ndimage.binary_fill_holes(component)  # holes are ignored: the outline is the outer edge
    polygon = outer_boundary(component)
    assert polygon.shape[1] == 2 and np.array_equal(polygon[0], polygon[-1])  # closed
    assert np.array_equal(inside(polygon, mask.shape), filled)  # exactly its pixels' centres
    assert shoelace_area(polygon) == filled.sum()  # along pixel edges: the area is the pixel count
    drawn = rasterised(polygon, mask.shape)
    assert not np.any((drawn ^ filled) & ~boundary_band(filled))  # PIL agrees up to one boundary pixel
    assert not has_collinear_corners(polygon)


def test_largest_component_is_eight_connected_and_the_biggest() -> None:
    mask = diagonal_chain()
    mask[0, 9] = True  # a lone pixel, smaller than the chain
    assert largest_component(mask).sum() == 8
    assert not largest_component(np.zeros((4, 4), dtype=bool)).any()


def test_outline_of_an_l_shape_is_its_six_corners() -> None:
    assert outer_boundary(l_shape()).tolist() == [[3, 2], [7, 2], [7, 13], [15, 13], [15, 17], [3, 17], [3, 2]]


def test_outline_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        outer_boundary(np.zeros((4, 4), dtype=bool))


def test_convex_outline_holds_every_component() -> None:
    mask = disk((40, 60), (20, 15), 8) | disk((40, 60), (20, 44), 6)  # two lungs apart
    polygon = convex_outline(mask)
    assert np.array_equal(polygon[0], polygon[-1]) and not has_collinear_corners(polygon)
    assert np.all(inside(polygon, mask.shape)[mask])
    # Nothing outside the pixels' own extent: the hull touches the outermost pixel edges.
    rows, columns = np.nonzero(mask)
    assert (polygon[:, 0].min(), polygon[:, 0].max()) == (columns.min(), columns.max() + 1)
    assert (polygon[:, 1].min(), polygon[:, 1].max()) == (rows.min(), rows.max() + 1)


def test_image_border_is_the_whole_image() -> None:
    assert np.array_equal(inside(image_border(6, 9), (6, 9)), np.ones((6, 9), dtype=bool))


# --- the viewer SR of a chest phantom ------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    volume: Volume
    result: PipelineResult
    manifest: Manifest
    ctx: ResultContext
    seg: Dataset
    sr: Dataset
    full_sr: Dataset
    path: Path


def cavitating_nodule(volume: Volume) -> np.ndarray:
    """A ring in the right lung on three slices, widest in the middle one: non-convex, with a hole."""
    slices, rows, columns = volume.array.shape
    centre = (rows * 0.45, columns * 0.3)
    mask = np.zeros(volume.array.shape, dtype=bool)
    for offset, outer in ((-1, 4), (0, 6), (1, 4)):
        mask[slices // 4 + offset] = disk((rows, columns), centre, outer) & ~disk((rows, columns), centre, 2.5)
    return mask


def chest_result(volume: Volume, right: np.ndarray, left: np.ndarray) -> PipelineResult:
    """Two lungs, a ring off the key slice, an empty segment, series-level values, a finding, a detection."""
    ml = volume.voxel_volume_ml
    ring_mask = cavitating_nodule(volume)
    slices, rows, columns = volume.array.shape
    return PipelineResult(
        segments=[
            Segment(1, "Right lung", ANATOMICAL_STRUCTURE, RIGHT_LUNG, right),
            Segment(2, "Left lung", ANATOMICAL_STRUCTURE, LEFT_LUNG, left),
            Segment(3, "Cavitating nodule", ANATOMICAL_STRUCTURE, NODULE, ring_mask),
            Segment(4, "Nothing found", ANATOMICAL_STRUCTURE, LUNG, np.zeros(volume.array.shape, dtype=bool)),
        ],
        measurements=[
            Measurement(VOLUME, float(right.sum()) * ml, ML, segment_number=1),
            Measurement(LAA950, laa950_percent(volume.array, right), PERCENT, segment_number=1),
            Measurement(VOLUME, float(left.sum()) * ml, ML, segment_number=2),
            Measurement(VOLUME, float(ring_mask.sum()) * ml, ML, segment_number=3),
            Measurement(VOLUME, 0.0, ML, segment_number=4),
            Measurement(VOLUME, float((right | left).sum()) * ml, ML),
            Measurement(LAA950, laa950_percent(volume.array, right | left), PERCENT),
        ],
        findings=[Finding(CLINICAL_FINDING, EMPHYSEMA, probability=0.87)],
        detections=[Detection("Nodule", NODULE, slices // 2, probability=0.6,
                              box=(rows // 4, columns // 4, rows // 2, columns // 2))],
    )


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Viewer:
    root = tmp_path_factory.mktemp("viewer")
    phantom = make_chest_phantom(slices=24, size=64, pixel_spacing_mm=6.0, slice_thickness_mm=10.0)
    volume = load_volume(phantom.write(root / "source"))
    result = chest_result(volume, phantom.right_lung, phantom.left_lung)
    manifest = manifest_in(root / "pipelines" / "ct_lung")
    ctx = ResultContext(org_root=ORG_ROOT, institution_name="Test Hospital")
    seg, sr = write_results(volume, result, manifest, ctx, ("seg", "sr"), sr_profile="viewer")
    (_, full_sr) = write_results(volume, result, manifest, ctx, ("seg", "sr"))
    return Viewer(volume, result, manifest, ctx, seg, sr, full_sr, save(sr, root / "out"))


def code(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue


def groups(sr: Dataset) -> list[Dataset]:
    (measurements,) = [i for i in sr.ContentSequence if code(i) == "126010"]
    return list(measurements.ContentSequence)


def tree(group: Dataset) -> list[tuple]:
    """(value type, relationship, concept) of each item of a group, with those of each item's children."""
    return [(i.ValueType, i.RelationshipType, code(i),
             [(c.ValueType, c.RelationshipType, code(c)) for c in i.get("ContentSequence", [])])
            for i in group.ContentSequence]


def by_code(group: Dataset) -> dict[str, Dataset]:
    return {code(i): i for i in group.ContentSequence}


def region_of(group: Dataset) -> tuple[np.ndarray, str]:
    """A group's polygon (N x 2) and the SOP Instance UID of the image it is SELECTED FROM."""
    region = by_code(group)[IMAGE_REGION]
    assert (region.ValueType, region.GraphicType) == ("SCOORD", "POLYLINE")
    (image,) = region.ContentSequence
    polygon = np.array(region.GraphicData, dtype=float).reshape(-1, 2)
    return polygon, image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID


def slice_of(v: Viewer, sop_uid: str) -> int:
    return [str(s.SOPInstanceUID) for s in v.volume.sources].index(sop_uid)


def key_slice(v: Viewer) -> int:
    """The slice with the largest total segment area (chest_result names no key slice)."""
    return int(sum(s.mask for s in v.result.segments).sum(axis=(1, 2)).argmax())


HEADER = [("TEXT", "HAS OBS CONTEXT", TRACKING_ID, []), ("UIDREF", "HAS OBS CONTEXT", TRACKING_UID, [])]
ALGORITHM = [("TEXT", "HAS CONCEPT MOD", ALGORITHM_NAME, []), ("TEXT", "HAS CONCEPT MOD", ALGORITHM_VERSION, [])]
SEGMENT_HEADER = [*HEADER, ("CODE", "CONTAINS", FINDING_CATEGORY, []), ("CODE", "CONTAINS", FINDING, []), *ALGORITHM]
FROM_SEGMENT = [("IMAGE", "INFERRED FROM", SOURCE_OF_MEASUREMENT)]
REGION = ("SCOORD", "CONTAINS", IMAGE_REGION, [("IMAGE", "SELECTED FROM", SOURCE)])


def test_viewer_sr_content_tree(viewer: Viewer) -> None:
    """Golden structure: TID 1500 with a device observer, and only TID 1410 groups, each with an Image Region."""
    sr = viewer.sr
    assert (sr.ContentTemplateSequence[0].TemplateIdentifier, code(sr)) == ("1500", "126000")
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "PARTIAL"
    root = {code(i): i for i in sr.ContentSequence}
    assert root["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # observer: a device
    all_groups = groups(sr)
    assert [g.ContentTemplateSequence[0].TemplateIdentifier for g in all_groups] == ["1410"] * 7
    assert [by_code(g)[TRACKING_ID].TextValue for g in all_groups] == [
        "Right lung", "Left lung", "Cavitating nodule", "Nothing found", "Series-level measurements",
        "Pulmonary emphysema", "Nodule"]  # no group without coordinates, and none left out
    right, left, spine, nothing, series, finding, nodule = all_groups
    assert tree(right) == [*SEGMENT_HEADER, ("NUM", "CONTAINS", VOLUME.value, FROM_SEGMENT),
                           ("NUM", "CONTAINS", LAA950.value, FROM_SEGMENT), REGION]
    for group in (left, spine, nothing):
        assert tree(group) == [*SEGMENT_HEADER, ("NUM", "CONTAINS", VOLUME.value, FROM_SEGMENT), REGION]
    assert tree(series) == [*HEADER, *ALGORITHM, ("NUM", "CONTAINS", VOLUME.value, []),
                            ("NUM", "CONTAINS", LAA950.value, []), REGION]
    # A finding's probability is a NUM of its group (what OHIF labels), its answer a qualitative evaluation.
    assert tree(finding) == [*HEADER, *ALGORITHM, ("NUM", "CONTAINS", PROBABILITY, []),
                             ("CODE", "CONTAINS", CLINICAL_FINDING.value, []), REGION]
    assert by_code(finding)[CLINICAL_FINDING.value].ConceptCodeSequence[0].CodeValue == EMPHYSEMA.value
    assert tree(nodule) == tree(groups(viewer.full_sr)[-1])  # detections as in the full SR
    assert groups_without_coordinates(sr) == []
    assert groups_without_coordinates(viewer.full_sr) == [1, 2, 3, 4, 5, 6]  # why OHIF crashes on the full SR


def test_tracking_uids_are_the_full_srs(viewer: Viewer) -> None:
    def uids(sr: Dataset) -> list[str]:
        return [by_code(g)[TRACKING_UID].UID for g in groups(sr)]

    assert uids(viewer.sr) == uids(viewer.full_sr)
    assert len(set(uids(viewer.sr))) == len(uids(viewer.sr))  # OHIF merges groups that share one
    segment_uids = {int(s.SegmentNumber): s.TrackingUID for s in viewer.seg.SegmentSequence}
    assert uids(viewer.sr)[:4] == [segment_uids[n] for n in (1, 2, 3, 4)]


def test_segment_groups_outline_the_segment_where_it_is_largest(viewer: Viewer) -> None:
    key = key_slice(viewer)
    for group, segment in zip(groups(viewer.sr)[:3], viewer.result.segments[:3]):
        polygon, sop_uid = region_of(group)
        index = slice_of(viewer, sop_uid)
        areas = segment.mask.sum(axis=(1, 2))
        assert areas[index] == areas.max()
        assert index == min(np.flatnonzero(areas == areas.max()), key=lambda i: (abs(i - key), i))
        component = ndimage.binary_fill_holes(largest_component(segment.mask[index]))
        assert np.array_equal(inside(polygon, component.shape), component), segment.label
    # The ring is off the key slice and keeps its own slice; its hole is not outlined.
    ring_polygon, ring_uid = region_of(groups(viewer.sr)[2])
    assert slice_of(viewer, ring_uid) == viewer.volume.array.shape[0] // 4 != key
    assert shoelace_area(ring_polygon) > viewer.result.segments[2].mask[slice_of(viewer, ring_uid)].sum()


def test_groups_of_no_segment_sit_on_the_key_slice(viewer: Viewer) -> None:
    key = key_slice(viewer)
    union = np.any([s.mask[key] for s in viewer.result.segments], axis=0)
    series, finding = groups(viewer.sr)[4:6]
    for group in (series, finding):
        polygon, sop_uid = region_of(group)
        assert slice_of(viewer, sop_uid) == key
        assert np.all(inside(polygon, union.shape)[union])  # the outline of all segments holds both lungs
        assert np.array_equal(polygon, convex_outline(union))


def test_empty_segment_gets_the_image_border_on_the_key_slice(viewer: Viewer) -> None:
    polygon, sop_uid = region_of(groups(viewer.sr)[3])
    assert slice_of(viewer, sop_uid) == key_slice(viewer)
    assert np.array_equal(polygon, image_border(*viewer.volume.array.shape[1:]))


def test_highdicom_reads_back_values_and_their_segments(viewer: Viewer) -> None:
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(viewer.path)).content
    planar = report.get_planar_roi_measurement_groups()
    assert len(planar) == 7 and not report.get_volumetric_roi_measurement_groups()
    for group, segment in zip(planar[:4], viewer.result.segments):
        expected = [m for m in viewer.result.measurements if m.segment_number == segment.number]
        read = group.get_measurements()
        assert [(m.name.value, m.value, m.unit.value) for m in read] == [
            (m.name.value, pytest.approx(m.value), m.unit.value) for m in expected]
        for m in read:
            (source,) = m.referenced_images
            ref = source.ReferencedSOPSequence[0]
            assert (ref.ReferencedSOPInstanceUID, int(ref.ReferencedSegmentNumber)) == (
                viewer.seg.SOPInstanceUID, segment.number)
        assert group.finding_type.value == segment.type.value
    series = planar[4].get_measurements()
    assert [(m.name.value, m.value) for m in series] == [
        (m.name.value, pytest.approx(m.value)) for m in viewer.result.measurements if m.segment_number is None]
    (probability,) = planar[5].get_measurements()
    assert (probability.name.meaning, probability.value) == ("Probability", pytest.approx(0.87))
    (evaluation,) = planar[5].get_qualitative_evaluations()
    assert evaluation.value.value == EMPHYSEMA.value


def test_viewer_sr_passes_check_result_and_dciodvfy(viewer: Viewer) -> None:
    sources = viewer.volume.sources
    assert check_result(viewer.sr, sources, viewer.seg, viewer.manifest, sr_profile="viewer") == []
    assert check_result(pydicom.dcmread(viewer.path), sources, viewer.seg, viewer.manifest, "viewer") == []
    errors = dciodvfy_errors(viewer.path)
    if errors is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    assert errors == []


def test_viewer_sr_has_its_own_uids(viewer: Viewer) -> None:
    series = str(viewer.volume.sources[0].SeriesInstanceUID)
    name, version = viewer.manifest.name, viewer.manifest.version
    assert viewer.sr.SeriesInstanceUID == derive_result_uid(ORG_ROOT, series, name, version, "sr-viewer-series")
    assert viewer.sr.SOPInstanceUID == derive_result_uid(ORG_ROOT, series, name, version, "sr-viewer")
    assert viewer.sr.SeriesInstanceUID != viewer.full_sr.SeriesInstanceUID
    assert viewer.sr.SOPInstanceUID != viewer.full_sr.SOPInstanceUID
    assert viewer.sr.SeriesNumber == viewer.full_sr.SeriesNumber  # the SR kind's number (results/kinds.py)
    assert "SR viewer" in viewer.sr.SeriesDescription and "not for diagnostic use" in viewer.sr.SeriesDescription
    again = write_results(viewer.volume, viewer.result, viewer.manifest, viewer.ctx, ("seg", "sr"), sr_profile="viewer")
    assert [ds.SOPInstanceUID for ds in again] == [viewer.seg.SOPInstanceUID, viewer.sr.SOPInstanceUID]


def test_unknown_sr_profile_is_refused(viewer: Viewer) -> None:
    with pytest.raises(ValueError, match="sr_profile"):
        write_results(viewer.volume, viewer.result, viewer.manifest, viewer.ctx, sr_profile="ohif")


# --- the validator knows the viewer profile ------------------------------------------------------------


def test_check_catches_a_group_without_coordinates(viewer: Viewer) -> None:
    ds = pydicom.dcmread(viewer.path)
    group = groups(ds)[1]
    group.ContentSequence = [i for i in group.ContentSequence if code(i) != IMAGE_REGION]
    problems = check_result(ds, viewer.volume.sources, viewer.seg, viewer.manifest, sr_profile="viewer")
    assert any("measurement group 2 has no image coordinates" in p for p in problems)
    # The full profile makes no such promise.
    assert check_result(viewer.full_sr, viewer.volume.sources, viewer.seg, viewer.manifest) == []
    assert len(check_result(viewer.full_sr, viewer.volume.sources, viewer.seg, viewer.manifest, "viewer")) == 6


def test_check_catches_a_source_of_measurement_naming_no_segment(viewer: Viewer) -> None:
    ds = pydicom.dcmread(viewer.path)
    (image,) = by_code(groups(ds)[0])[VOLUME.value].ContentSequence
    image.ReferencedSOPSequence[0].ReferencedSegmentNumber = 9
    problems = check_result(ds, viewer.volume.sources, viewer.seg, viewer.manifest, sr_profile="viewer")
    assert any(f"IMAGE item (DCM {SOURCE_OF_MEASUREMENT}): ReferencedSegmentNumber (0062,000B)" in p for p in problems)


def test_gate_passes_a_viewer_profile_result(viewer: Viewer, tmp_path: Path) -> None:
    objects = write_results(viewer.volume, viewer.result, viewer.manifest, viewer.ctx, ("seg", "sr", "sc", "gsps"),
                            sr_profile="viewer")
    gate(objects, viewer.volume.sources, viewer.manifest, tmp_path, sr_profile="viewer")


# --- every source and SEG encoding ---------------------------------------------------------------------


@cache
def viewer_sr_of(source: str, seg_type: str, root: Path) -> tuple[Volume, Manifest, Dataset, Dataset, Path]:
    volume = source_volume(source, root)
    manifest = manifest_in(root / "pipelines" / "ct_lung")
    ctx = ResultContext(org_root=ORG_ROOT, institution_name="Test Hospital")
    seg, sr = write_results(volume, full_result(volume), manifest, ctx, ("seg", "sr"), seg_type, sr_profile="viewer")
    return volume, manifest, seg, sr, save(sr, root / "out" / source / seg_type)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("viewer-kinds")


@pytest.mark.parametrize("seg_type", SEG_TYPES)
@pytest.mark.parametrize("source", SOURCES)
def test_viewer_sr_of_every_source_and_encoding_passes(root: Path, source: str, seg_type: str) -> None:
    volume, manifest, seg, sr, path = viewer_sr_of(source, seg_type, root)
    assert result_kind(sr) == "SR" and groups_without_coordinates(sr) == []
    assert check_result(pydicom.dcmread(path), volume.sources, seg, manifest, sr_profile="viewer") == []
    errors = dciodvfy_errors(path)
    assert errors is None or errors == []


def test_each_encoding_gets_its_own_viewer_sr_instance(root: Path) -> None:
    built = [viewer_sr_of("ct_small", seg_type, root)[3] for seg_type in SEG_TYPES]
    assert len({sr.SeriesInstanceUID for sr in built}) == 1
    assert len({sr.SOPInstanceUID for sr in built}) == len(SEG_TYPES)  # each names its own SEG


def test_classification_of_a_radiograph_is_drawn_on_the_whole_image(root: Path) -> None:
    volume = source_volume("cr", root)
    manifest = manifest_in(root / "pipelines" / "ct_lung")
    result = PipelineResult(findings=[Finding(CLINICAL_FINDING, EMPHYSEMA, 0.4)])
    (sr,) = write_results(volume, result, manifest, ResultContext(org_root=ORG_ROOT), ("seg", "sr"),
                          sr_profile="viewer")
    (group,) = groups(sr)
    polygon, sop_uid = region_of(group)
    assert sop_uid == volume.sources[0].SOPInstanceUID
    assert np.array_equal(polygon, image_border(*volume.array.shape[1:]))
    assert check_result(sr, volume.sources, None, manifest, sr_profile="viewer") == []


def test_fractional_masks_are_outlined_above_one_half(root: Path) -> None:
    volume = source_volume("ct_small", root)
    manifest = manifest_in(root / "pipelines" / "ct_lung")
    soft = np.zeros(volume.array.shape, dtype=np.float32)
    soft[0, 10:20, 10:30] = 0.4  # below one half: not part of the segment
    soft[0, 12:18, 12:16] = 0.9
    segment = Segment(1, "Soft", ANATOMICAL_STRUCTURE, RIGHT_LUNG, soft)
    result = PipelineResult(segments=[segment], measurements=[Measurement(VOLUME, 1.0, ML, segment_number=1)])
    _, sr = write_results(volume, result, manifest, ResultContext(org_root=ORG_ROOT), ("seg", "sr"),
                          sr_profile="viewer")
    polygon, _ = region_of(groups(sr)[0])
    assert polygon.tolist() == [[12, 12], [16, 12], [16, 18], [12, 18], [12, 12]]
