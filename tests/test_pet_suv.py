"""pet_suv and imaging.suv: SUVbw factor by hand, and lesion metrics on the synthetic PET phantom."""
from __future__ import annotations

import datetime as dt
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.qc import input_problems
from dicom_ai_node.imaging.series import load_series
from dicom_ai_node.imaging.suv import SUV_UNIT, scan_datetime, suv_bw_factor, to_suv
from dicom_ai_node.phantom_pet import F18_HALF_LIFE_S, Lesion, make_pet_phantom
from dicom_ai_node.pipeline import RunContext, instantiate, load_manifest

PIPELINE_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "pet_suv"
# 75 kg, 370 MBq F-18 injected 60 min before the series: decayed dose = 370e6 * 2^(-3600/6586.2)
# = 370e6 * 0.684660 = 253.324e6 Bq; factor = 75 * 1000 g / 253.324e6 Bq = 2.96075e-4 g/Bq.
START_FACTOR = 2.96075e-4
ADMIN_FACTOR = 75_000 / 370e6  # 2.02703e-4: no decay when images are decay corrected to the injection


def header(**changes) -> Dataset:
    ds = Dataset()
    ds.Modality = "PT"
    ds.Units = "BQML"
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT"]
    ds.DecayCorrection = "START"
    ds.PatientWeight = "75"
    ds.SeriesDate = "20260115"
    ds.SeriesTime = "103000"
    item = Dataset()
    item.RadionuclideTotalDose = "370000000"
    item.RadionuclideHalfLife = "6586.2"
    item.RadiopharmaceuticalStartDateTime = "20260115093000"
    ds.RadiopharmaceuticalInformationSequence = [item]
    for keyword, value in changes.items():
        target = item if keyword.startswith("Radio") else ds
        if value is None:
            delattr(target, keyword)
        else:
            setattr(target, keyword, value)
    return ds


def test_suv_factor_start_by_hand():
    assert suv_bw_factor(header()) == pytest.approx(START_FACTOR, rel=2e-6)


def test_suv_factor_admin_has_no_decay():
    assert suv_bw_factor(header(DecayCorrection="ADMIN")) == pytest.approx(ADMIN_FACTOR, rel=1e-12)


def test_suv_factor_start_time_on_series_date():
    ds = header(RadiopharmaceuticalStartDateTime=None, RadiopharmaceuticalStartTime="093000")
    assert suv_bw_factor(ds) == pytest.approx(START_FACTOR, rel=2e-6)


def test_suv_factor_two_half_lives():
    # 2 half-lives of uptake: decayed dose = 370e6 / 4 = 92.5e6 Bq; factor = 75000 / 92.5e6 = 8.10811e-4
    injection = dt.datetime(2026, 1, 15, 10, 30) - dt.timedelta(seconds=2 * F18_HALF_LIFE_S)
    ds = header(RadiopharmaceuticalStartDateTime=injection.strftime("%Y%m%d%H%M%S.%f"))
    assert suv_bw_factor(ds) == pytest.approx(75_000 / 92.5e6, rel=1e-9)


def test_scan_time_is_earliest_acquisition_when_series_is_later():
    # Series re-created at 10:40 from an acquisition that started at 10:30: decay to 10:30 (QIBA rule).
    ds = header(SeriesTime="104000")
    ds.AcquisitionDate, ds.AcquisitionTime = "20260115", "103000"
    assert scan_datetime([ds]) == dt.datetime(2026, 1, 15, 10, 30)
    assert suv_bw_factor(ds) == pytest.approx(START_FACTOR, rel=2e-6)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"PatientWeight": None}, "PatientWeight"),
        ({"PatientWeight": "0"}, "PatientWeight"),
        ({"Units": "CNTS"}, "Units"),
        ({"CorrectedImage": ["ATTN"]}, "DECY"),
        ({"CorrectedImage": ["DECY"]}, "ATTN"),
        ({"DecayCorrection": "NONE"}, "DecayCorrection"),
        ({"RadionuclideTotalDose": None}, "RadionuclideTotalDose"),
        ({"RadionuclideHalfLife": "0"}, "RadionuclideHalfLife"),
        ({"RadiopharmaceuticalStartDateTime": None}, "RadiopharmaceuticalStartTime"),
        ({"RadiopharmaceuticalStartDateTime": "20260115110000"}, "after the scan"),
        ({"RadiopharmaceuticalInformationSequence": []}, "RadiopharmaceuticalInformationSequence"),
    ],
)
def test_suv_factor_names_the_missing_or_invalid_tag(changes, named):
    ds = header()
    for keyword, value in changes.items():
        if keyword == "RadiopharmaceuticalInformationSequence":
            ds.RadiopharmaceuticalInformationSequence = value
        else:
            target = ds.RadiopharmaceuticalInformationSequence[0] if keyword.startswith("Radio") else ds
            delattr(target, keyword) if value is None else setattr(target, keyword, value)
    with pytest.raises(ValueError, match=named):
        suv_bw_factor(ds)


@pytest.fixture(scope="module")
def phantom():
    return make_pet_phantom()


@pytest.fixture(scope="module")
def volume(phantom, tmp_path_factory):
    return load_series(phantom.write(tmp_path_factory.mktemp("pet")))


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(PIPELINE_DIR)


@pytest.fixture(scope="module")
def result(volume, manifest):
    return instantiate(manifest).run(volume, RunContext())


def test_phantom_header_factor_and_per_slice_slopes(phantom, volume):
    assert volume.unit == "Bq/mL" and volume.modality == "PT"
    assert suv_bw_factor(volume.sources[0]) == pytest.approx(START_FACTOR, rel=2e-6)
    assert len({str(ds.RescaleSlope) for ds in phantom.datasets}) > 1  # one slope per slice (its maximum)


def test_to_suv_matches_truth(phantom, volume):
    suv = to_suv(volume)
    assert suv.unit == SUV_UNIT == "g/ml"
    assert np.abs(suv.array - phantom.suv).max() < 1e-3  # 16-bit quantisation only
    assert suv.spacing == volume.spacing and suv.sources == volume.sources


def test_manifest_validates_and_accepts_the_phantom(manifest, volume):
    assert manifest.name == "pet_suv" and manifest.accepts.modality == ["PT"]
    assert manifest.outputs == ["seg", "sr", "sc"]
    assert manifest.model_card.not_for_diagnostic_use
    assert input_problems(volume, manifest.accepts) == []


def by_segment(result):
    values: dict[tuple[int | None, str, str], float] = {}
    for m in result.measurements:
        values[(m.segment_number, m.name.meaning, m.method.meaning if m.method else "")] = m.value
    return values


def matched_lesions(phantom, result):
    """For each truth lesion, the segment number whose mask overlaps it."""
    numbers = []
    for truth in phantom.lesion_masks:
        hits = [s.number for s in result.segments if (s.mask & truth).any()]
        assert len(hits) == 1
        numbers.append(hits[0])
    return numbers


def truth_region41(phantom, index):
    lesion, sphere = phantom.lesions[index], phantom.lesion_masks[index]
    return sphere & (phantom.suv >= 0.41 * lesion.suv_max)


def test_lesions_found_and_liver_not(phantom, result):
    assert len(result.segments) == len(phantom.lesions)
    assert all(not (s.mask & phantom.liver).any() for s in result.segments)
    assert all(s.category.value == "49755003" and s.type.value == "52988006" for s in result.segments)


def test_suvmax_and_suvpeak_within_1_percent(phantom, result):
    values = by_segment(result)
    for lesion, number in zip(phantom.lesions, matched_lesions(phantom, result)):
        assert values[(number, "Standardized Uptake Value", "Maximum")] == pytest.approx(lesion.suv_max, rel=0.01)
        # every hottest region is a sphere of radius 10 mm, which holds a 1 mL sphere (radius 6.2 mm)
        assert values[(number, "Standardized Uptake Value", "Peak Value Within ROI")] == pytest.approx(
            lesion.suv_max, rel=0.01)


def test_mtv25_within_5_percent_of_sphere_volume(phantom, result):
    values = by_segment(result)
    for lesion, number in zip(phantom.lesions, matched_lesions(phantom, result)):
        mtv = values[(number, "Metabolic Volume", "Region at or above SUV 2.5")]
        assert mtv == pytest.approx(lesion.volume_ml, rel=0.05)


def test_mtv41_and_tlg_match_their_definitions_on_the_truth(phantom, result):
    values = by_segment(result)
    segments = {s.number: s for s in result.segments}
    total_tlg = 0.0
    for index, number in enumerate(matched_lesions(phantom, result)):
        region = truth_region41(phantom, index)
        assert np.array_equal(segments[number].mask, region)
        mtv41 = float(region.sum()) * phantom.voxel_volume_ml
        tlg = mtv41 * float(phantom.suv[region].mean())
        total_tlg += tlg
        assert values[(number, "Metabolic Volume", "Region at or above 41 % of SUVmax")] == pytest.approx(mtv41, rel=1e-9)
        assert values[(number, "Total Lesion Glycolysis", "Region at or above 41 % of SUVmax")] == pytest.approx(
            tlg, rel=1e-3)
    # the cored lesion: MTV41 is its core only (41 % of 10 = 4.1 > shell SUV 4), MTV2.5 the whole sphere
    cored = matched_lesions(phantom, result)[2]
    assert values[(cored, "Metabolic Volume", "Region at or above 41 % of SUVmax")] < 0.2 * values[
        (cored, "Metabolic Volume", "Region at or above SUV 2.5")]
    assert values[(None, "Total Lesion Glycolysis", "Region at or above 41 % of SUVmax")] == pytest.approx(
        total_tlg, rel=1e-3)
    assert values[(None, "Standardized Uptake Value", "Maximum")] == pytest.approx(10.0, rel=0.01)


def test_units_are_ucum(result):
    units = {(m.name.meaning, m.unit.value) for m in result.measurements}
    assert units == {("Standardized Uptake Value", "g/ml{SUVbw}"), ("Metabolic Volume", "mL"),
                     ("Total Lesion Glycolysis", "g")}
    assert all(m.unit.scheme == "UCUM" for m in result.measurements)


def test_large_hot_liver_is_not_a_lesion(tmp_path, manifest):
    # Liver at SUV 3 (above the 2.5 threshold, about 630 mL): physiological, noted, not reported.
    phantom = make_pet_phantom(liver_suv=3.0, lesions=(Lesion((80.0, -20.0, -35.0), 10.0, 6.0),),
                               uid_seed="pet-phantom-liver")
    result = instantiate(manifest).run(load_series(phantom.write(tmp_path)), RunContext())
    assert len(result.segments) == 1
    assert not (result.segments[0].mask & phantom.liver).any()
    assert any("physiological" in note for note in result.notes)


def test_no_lesion_gives_empty_result(tmp_path, manifest):
    phantom = make_pet_phantom(lesions=(), slices=20, size=120, uid_seed="pet-phantom-empty")
    result = instantiate(manifest).run(load_series(phantom.write(tmp_path)), RunContext())
    assert result.segments == [] and result.measurements == [] and result.notes


def test_missing_patient_weight_stops_the_pipeline(volume, manifest):
    sources = tuple(deepcopy(ds) for ds in volume.sources)
    for ds in sources:
        del ds.PatientWeight
    from dataclasses import replace

    with pytest.raises(ValueError, match="PatientWeight"):
        instantiate(manifest).run(replace(volume, sources=sources), RunContext())


def test_write_results_makes_valid_seg_sr_sc(volume, result, manifest):
    from dicom_ai_node.results.provenance import ResultContext
    from dicom_ai_node.results.validate import check_result
    from dicom_ai_node.results.writer import write_results

    ctx = ResultContext(org_root="1.2.826.0.1.3680043.10.1234.", institution_name="Test Hospital")
    objects = write_results(volume, result, manifest, ctx)
    assert [ds.Modality for ds in objects] == ["SEG", "SR", "OT"]
    for ds in objects:
        assert check_result(ds, list(volume.source_instances), seg=objects[0], manifest=manifest) == []
