"""Known-answer tests of pipelines/ct_lung on the synthetic chest phantom (exact voxel truth)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dicom_ai_node.imaging.volume import Volume, load_volume
from dicom_ai_node.phantom import ChestPhantom, make_chest_phantom
from dicom_ai_node.pipeline import Concept, Pipeline, PipelineResult, RunContext, instantiate, load_manifest

PIPELINE_FOLDER = Path(__file__).resolve().parents[1] / "pipelines" / "ct_lung"
RIGHT_LUNG = Concept("3341006", "SCT", "Right lung")
LEFT_LUNG = Concept("44029006", "SCT", "Left lung")
VOLUME_CODE = "118565006"
LAA_CODE = "LAA950"

PHANTOMS = {
    "default": {},
    "coarse": dict(slices=60, size=192, pixel_spacing_mm=2.0, slice_thickness_mm=5.0, seed=7, uid_seed="coarse"),
    # the smallest geometry the manifest accepts (3 mm pixels), as the engine tests use it
    "small": dict(slices=40, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, seed=3, uid_seed="small"),
}


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    pipe = instantiate(load_manifest(PIPELINE_FOLDER))
    pipe.load("cpu")
    return pipe


@pytest.fixture(scope="module", params=sorted(PHANTOMS))
def case(request, pipeline, tmp_path_factory) -> tuple[ChestPhantom, PipelineResult]:
    """A phantom written as DICOM, read back with load_volume, and the pipeline's result on it."""
    phantom = make_chest_phantom(**PHANTOMS[request.param])
    volume = load_volume(phantom.write(tmp_path_factory.mktemp(request.param)))
    assert np.array_equal(volume.array, phantom.hu)
    return phantom, pipeline.run(volume, RunContext())


def volume_from_array(phantom: ChestPhantom, hu: np.ndarray) -> Volume:
    """A Volume with the phantom's geometry but other pixels (phantom slices are in ascending z)."""
    first = phantom.datasets[0]
    row_mm, column_mm = (float(v) for v in first.PixelSpacing)
    return Volume(
        array=hu.astype(np.float32),
        spacing=(float(first.SliceThickness), row_mm, column_mm),
        origin=tuple(float(v) for v in first.ImagePositionPatient),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        unit="HU",
        modality="CT",
        sources=tuple(phantom.datasets),
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def measurement(result: PipelineResult, code: str, segment_number: int | None) -> float:
    (found,) = [m for m in result.measurements if m.name.value == code and m.segment_number == segment_number]
    return found.value


def lung_masks(result: PipelineResult) -> tuple[np.ndarray, np.ndarray]:
    by_number = {s.number: s for s in result.segments}
    return by_number[1].mask, by_number[2].mask


def test_manifest_validates_and_instantiates(pipeline):
    manifest = load_manifest(PIPELINE_FOLDER)
    assert manifest.name == "ct_lung"
    assert manifest.entrypoint == "pipeline.py:LungSegmentation"
    assert manifest.accepts.modality == ["CT"]
    assert set(manifest.accepts.body_part) == {"CHEST", "LUNG", "THORAX"}
    assert manifest.accepts.slice_thickness_mm.contains(2.5) and manifest.accepts.slice_thickness_mm.contains(5.0)
    assert manifest.accepts.pixel_spacing_mm.contains(1.5) and manifest.accepts.pixel_spacing_mm.contains(2.0)
    assert manifest.outputs == ["seg", "sr", "sc"]
    assert manifest.gpu_memory_mb == 0
    assert manifest.model_card.not_for_diagnostic_use
    assert isinstance(pipeline, Pipeline)


def test_segments_are_coded_right_and_left_lung(case):
    _, result = case
    assert [s.number for s in result.segments] == [1, 2]
    assert [s.label for s in result.segments] == ["Right lung", "Left lung"]
    assert [s.type for s in result.segments] == [RIGHT_LUNG, LEFT_LUNG]
    for segment in result.segments:
        assert segment.category.value == "123037004" and segment.category.scheme == "SCT"
        assert segment.mask.dtype == bool


def test_lung_volumes_within_3_percent(case):
    phantom, result = case
    for number, truth_ml in ((1, phantom.right_lung_ml), (2, phantom.left_lung_ml)):
        assert measurement(result, VOLUME_CODE, number) == pytest.approx(truth_ml, rel=0.03)
    total_ml = phantom.right_lung_ml + phantom.left_lung_ml
    assert measurement(result, VOLUME_CODE, None) == pytest.approx(total_ml, rel=0.03)


def test_laa950_within_1_point(case):
    phantom, result = case
    assert measurement(result, LAA_CODE, None) == pytest.approx(phantom.laa950_percent, abs=1.0)
    for number, truth in ((1, phantom.right_lung), (2, phantom.left_lung)):
        truth_percent = 100.0 * float((phantom.hu[truth] < -950).sum()) / float(truth.sum())
        assert measurement(result, LAA_CODE, number) == pytest.approx(truth_percent, abs=1.0)


def test_measurement_units(case):
    _, result = case
    units = {(m.name.value, m.unit.value, m.unit.scheme) for m in result.measurements}
    assert units == {(VOLUME_CODE, "mL", "UCUM"), (LAA_CODE, "%", "UCUM")}
    assert len(result.measurements) == 6


def test_dice_at_least_097_and_sides_not_swapped(case):
    phantom, result = case
    right, left = lung_masks(result)
    assert dice(right, phantom.right_lung) >= 0.97
    assert dice(left, phantom.left_lung) >= 0.97
    assert not (right & phantom.left_lung).any()
    assert not (left & phantom.right_lung).any()


def assert_airways_are_not_lung(phantom: ChestPhantom, result: PipelineResult) -> None:
    assert phantom.airway.sum() * phantom.voxel_volume_ml > 10.0  # the trachea alone is about 20 mL
    right, left = lung_masks(result)
    lungs = right | left
    # The trachea and the bronchi outside the lungs are never lung. Where a bronchus ends inside a lung,
    # and on the lumen's partial-volume rim, a voxel is ambiguous, so only the core away from lungs counts.
    near_lungs = ndimage.binary_dilation(phantom.right_lung | phantom.left_lung, iterations=2)
    assert not (lungs & ndimage.binary_erosion(phantom.airway) & ~near_lungs).any()
    assert (lungs & phantom.airway).sum() <= 0.1 * phantom.airway.sum()
    assert any(note.startswith("Airways of") for note in result.notes)


def test_airways_are_not_lung(case):
    phantom, result = case
    assert_airways_are_not_lung(phantom, result)


def test_airways_are_not_lung_on_a_softer_noisier_scan(pipeline):
    """A softer kernel (1.5 mm blur) and twice the noise on thick slices: oblique bronchi must still be grown.

    Seed 6 is a noise draw where growing through face neighbours only lost a main bronchus.
    """
    phantom = make_chest_phantom(**dict(PHANTOMS["coarse"], blur_mm=1.5, noise_hu=30.0, seed=6))
    result = pipeline.run(volume_from_array(phantom, phantom.hu), RunContext())
    assert_airways_are_not_lung(phantom, result)
    right, left = lung_masks(result)
    assert dice(right, phantom.right_lung) >= 0.97
    assert dice(left, phantom.left_lung) >= 0.97


def test_key_slice_has_the_largest_lung_area(case):
    phantom, result = case
    truth_area = (phantom.right_lung | phantom.left_lung).sum(axis=(1, 2))
    assert truth_area[result.key_slice] >= 0.98 * truth_area.max()


@pytest.fixture(scope="module")
def coarse_phantom() -> ChestPhantom:
    return make_chest_phantom(**PHANTOMS["coarse"])


def lps_grid(phantom: ChestPhantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z, y, x (LPS mm) of every voxel; the phantom's rows and columns share one grid (IPP x = IPP y)."""
    first = phantom.datasets[0]
    xy = float(first.ImagePositionPatient[0]) + float(first.PixelSpacing[0]) * np.arange(phantom.hu.shape[2])
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in phantom.datasets])
    return np.meshgrid(z, xy, xy, indexing="ij")


def test_right_and_left_come_from_physical_x_not_column_index(pipeline, coarse_phantom):
    """Columns run toward patient right (-x) and slices toward the feet: the pipeline must still get the sides."""
    phantom = coarse_phantom
    volume = volume_from_array(phantom, phantom.hu)
    last_column_x = volume.origin[0] + volume.spacing[2] * (phantom.hu.shape[2] - 1)
    top_z = volume.origin[2] + volume.spacing[0] * (phantom.hu.shape[0] - 1)
    mirrored = dataclasses.replace(
        volume,
        array=np.ascontiguousarray(phantom.hu[::-1, :, ::-1]),
        origin=(last_column_x, volume.origin[1], top_z),
        row_direction=(-1.0, 0.0, 0.0),  # with column direction +y the slice normal is -z
    )
    result = pipeline.run(mirrored, RunContext())
    right, left = lung_masks(result)
    assert dice(right, phantom.right_lung[::-1, :, ::-1]) >= 0.97
    assert dice(left, phantom.left_lung[::-1, :, ::-1]) >= 0.97
    assert any(note.startswith("Airways of") for note in result.notes)


def test_touching_lungs_are_split(pipeline, coarse_phantom):
    phantom = coarse_phantom
    zz, yy, xx = lps_grid(phantom)
    # An anterior band of parenchyma from one lung to the other, below the carina.
    bridge = (np.abs(xx) <= 36) & (yy >= -52) & (yy <= -42) & (np.abs(zz - zz.mean()) <= 20)
    bridge &= ~phantom.right_lung & ~phantom.left_lung
    hu = phantom.hu.copy()
    hu[bridge] = -850.0
    result = pipeline.run(volume_from_array(phantom, hu), RunContext())
    assert any("touched" in note for note in result.notes)
    right, left = lung_masks(result)
    assert dice(right & ~bridge, phantom.right_lung) >= 0.97
    assert dice(left & ~bridge, phantom.left_lung) >= 0.97
    assert ((right | left) & bridge).sum() == bridge.sum()


def test_airway_growing_that_leaks_is_reported(pipeline, coarse_phantom):
    phantom = coarse_phantom
    zz, yy, xx = lps_grid(phantom)
    # Bullous emphysema of pure air around the right main bronchus's tip: growing from the trachea floods it.
    carina_z = zz.mean() + 0.55 * 110.0
    bulla = ((xx + 35) ** 2 + (yy + 10) ** 2 + (zz - carina_z + 15) ** 2 <= 55.0**2) & phantom.right_lung
    hu = phantom.hu.copy()
    hu[bulla] = np.minimum(hu[bulla], -1000.0) + np.random.default_rng(1).normal(0.0, 15.0, int(bulla.sum()))
    result = pipeline.run(volume_from_array(phantom, hu), RunContext())
    assert any("leaked" in note for note in result.notes)
    right, left = lung_masks(result)
    assert dice(right, phantom.right_lung) >= 0.97
    assert dice(left, phantom.left_lung) >= 0.97


def test_one_lung_is_reported_as_one_segment_with_a_note(pipeline, coarse_phantom):
    phantom = coarse_phantom
    hu = phantom.hu.copy()
    hu[phantom.left_lung] = 40.0  # as after a left pneumonectomy
    result = pipeline.run(volume_from_array(phantom, hu), RunContext())
    assert len(result.segments) == 1
    assert result.segments[0].type.value == "39607008"
    assert any("could not split" in note for note in result.notes)
    assert measurement(result, VOLUME_CODE, None) == pytest.approx(phantom.right_lung_ml, rel=0.03)


@pytest.mark.parametrize("hu_value", [40.0, -1000.0], ids=["soft-tissue-block", "all-air"])
def test_no_lungs_gives_an_empty_result_with_a_note(pipeline, coarse_phantom, hu_value):
    block = np.full((30, 64, 64), hu_value, dtype=np.float32)
    result = pipeline.run(volume_from_array(coarse_phantom, block), RunContext())
    assert result.segments == [] and result.measurements == []
    assert result.key_slice is None
    assert any("no lungs segmented" in note for note in result.notes)


def test_non_hu_volume_is_refused(pipeline, coarse_phantom):
    volume = volume_from_array(coarse_phantom, coarse_phantom.hu)
    with pytest.raises(ValueError, match="Hounsfield"):
        pipeline.run(dataclasses.replace(volume, unit="1"), RunContext())
