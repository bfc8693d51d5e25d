"""Known-answer tests of the imaging stage: every input kind -> Volume (real units, LPS geometry), QC errors."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)

from dicom_ai_node.imaging import Volume, VolumeError, display_pixels, load_series, load_volume
from dicom_ai_node.imaging.volume import volume_unit
from dicom_ai_node.phantom import PHANTOM_PATIENT, ChestPhantom, make_chest_phantom

SLICES, SIZE, PIXEL_MM, THICKNESS_MM = 24, 64, 1.5, 2.5
GROUP_MACROS = ("PlaneOrientationSequence", "PixelMeasuresSequence", "FrameVOILUTSequence")


@pytest.fixture(scope="module")
def phantom() -> ChestPhantom:
    return make_chest_phantom(slices=SLICES, size=SIZE, pixel_spacing_mm=PIXEL_MM,
                              slice_thickness_mm=THICKNESS_MM, uid_seed="imaging")


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory) -> Volume:
    """The phantom written as single-frame CT files and read back."""
    return load_series(phantom.write(tmp_path_factory.mktemp("single")))


def fresh(phantom: ChestPhantom) -> list[Dataset]:
    """Copies of the phantom's slices (ascending z) that a test may change."""
    return [copy.deepcopy(ds) for ds in phantom.datasets]


def save(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets):
        paths.append(folder / f"{number:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def renamed(ds: Dataset, seed: str) -> Dataset:
    """A copy of `ds` under a new SOPInstanceUID."""
    other = copy.deepcopy(ds)
    other.SOPInstanceUID = generate_uid(entropy_srcs=[seed])
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    return other


def enhanced_ct(datasets: list[Dataset], seed: str) -> Dataset:
    """An Enhanced CT Image of the slices: highdicom's legacy conversion (frame 1 = instance 1 = most
    superior slice, orientation/spacing/rescale/window shared), relabelled as Enhanced CT."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=datasets,
            series_instance_uid=datasets[0].SeriesInstanceUID,
            series_number=int(datasets[0].SeriesNumber),
            sop_instance_uid=generate_uid(entropy_srcs=[seed]),
            instance_number=1,
        )
    mf.SOPClassUID = EnhancedCTImageStorage
    mf.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    return mf


def reorder_frames(mf: Dataset, order: list[int]) -> None:
    """Store frame order[i] (0-based, current numbering) as frame i + 1."""
    frames = mf.pixel_array
    mf.PerFrameFunctionalGroupsSequence = [mf.PerFrameFunctionalGroupsSequence[i] for i in order]
    mf.PixelData = frames[order].tobytes()


def move_shared_to_per_frame(mf: Dataset) -> None:
    """Orientation, pixel measures and window move into every per-frame item; the rescale stays shared."""
    shared = mf.SharedFunctionalGroupsSequence[0]
    for macro in GROUP_MACROS:
        for item in mf.PerFrameFunctionalGroupsSequence:
            item[macro] = copy.deepcopy(shared[macro])
        del shared[macro]


def shift_odd_frames(mf: Dataset, offset: int) -> None:
    """Odd frames store value + offset under a per-frame rescale of intercept - offset, which must win over
    the shared rescale: the real values stay the same."""
    frames = mf.pixel_array.copy()
    shared = mf.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for index, item in enumerate(mf.PerFrameFunctionalGroupsSequence):
        if index % 2:
            frames[index] += offset
            item.PixelValueTransformationSequence = copy.deepcopy(shared)
            transform = item.PixelValueTransformationSequence[0]
            transform.RescaleIntercept = str(float(transform.RescaleIntercept) - offset)
    mf.PixelData = frames.tobytes()


def real_frames(mf: Dataset) -> np.ndarray:
    """The stored frames of an Enhanced CT in real units (shared rescale), in stored order."""
    transform = mf.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    return mf.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window to 0..255, written out independently of pydicom."""
    low, high = centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    out = ((values - (centre - 0.5)) / (width - 1) + 0.5) * 255.0
    out = np.where(values <= low, 0.0, np.where(values > high, 255.0, out))
    return np.rint(out).astype(np.int64)


def assert_close_display(found: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the rounding of exact halves (float steps differ between the two computations)."""
    assert found.dtype == np.uint8
    difference = np.abs(found.astype(np.int64) - expected)
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999


# -- single-frame cross-sectional series ----------------------------------------------------------------


def test_phantom_written_and_reloaded_gives_exact_hu(phantom, reference, tmp_path):
    assert reference.array.dtype == np.float32
    assert np.array_equal(reference.array, phantom.hu)
    assert reference.unit == "HU" and reference.modality == "CT"
    assert reference.spacing == (THICKNESS_MM, PIXEL_MM, PIXEL_MM) and reference.spacing_source == "PixelSpacing"
    assert not reference.is_multiframe and reference.frame_numbers is None
    assert [ds.SOPInstanceUID for ds in reference.sources] == [ds.SOPInstanceUID for ds in phantom.datasets]
    assert reference.source_frames == tuple((ds, 1) for ds in reference.sources)
    assert reference.source_instances == reference.sources
    datasets = fresh(phantom)
    shuffled = load_volume(save([datasets[i] for i in np.random.default_rng(1).permutation(SLICES)], tmp_path))
    assert np.array_equal(shuffled.array, phantom.hu) and shuffled.origin == reference.origin


def test_lps_geometry_of_every_voxel(phantom, reference):
    coords = (np.arange(SIZE) - (SIZE - 1) / 2.0) * PIXEL_MM
    z = [float(ds.ImagePositionPatient[2]) for ds in phantom.datasets]
    assert reference.origin == (coords[0], coords[0], z[0])
    assert reference.row_direction == (1.0, 0.0, 0.0) and reference.column_direction == (0.0, 1.0, 0.0)
    assert np.array_equal(reference.normal, [0.0, 0.0, 1.0])
    for k, ds in enumerate(reference.sources):
        expected = np.asarray(reference.origin) + k * reference.spacing[0] * reference.normal
        assert np.allclose(expected, [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
    image = reference.to_sitk()
    for k, i, j in ((0, 0, 0), (SLICES - 1, 10, 50), (7, SIZE - 1, 3)):
        assert np.allclose(image.TransformIndexToPhysicalPoint((j, i, k)), (coords[j], coords[i], z[k]), atol=1e-4)
        assert image.GetPixel(j, i, k) == phantom.hu[k, i, j]


@pytest.mark.parametrize("column_direction, reversed_order", [((0, 0, -1), False), ((0, 0, 1), True)])
def test_coronal_slices_sort_along_their_normal(phantom, tmp_path, column_direction, reversed_order):
    """Coronal slices at y = the phantom's z: the normal (row x column) decides the order, not the file order."""
    datasets = fresh(phantom)
    for ds in datasets:
        y = float(ds.ImagePositionPatient[2])
        ds.ImageOrientationPatient = [1, 0, 0, *column_direction]
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), y, 100.0]
    volume = load_series(save(datasets[::-1], tmp_path))
    expected_normal = np.cross((1, 0, 0), column_direction)
    assert np.array_equal(volume.normal, expected_normal)
    assert np.array_equal(volume.array, phantom.hu[::-1] if reversed_order else phantom.hu)
    first = volume.sources[0]
    assert volume.origin == tuple(float(v) for v in first.ImagePositionPatient)
    last = np.asarray(volume.origin) + (SLICES - 1) * volume.spacing[0] * volume.normal
    assert np.allclose(last, [float(v) for v in volume.sources[-1].ImagePositionPatient], atol=1e-4)
    point = volume.to_sitk().TransformIndexToPhysicalPoint((0, 4, 0))  # row 4 lies 4 pixels along the columns
    assert np.allclose(point, np.asarray(volume.origin) + 4 * PIXEL_MM * np.asarray(column_direction))


# -- multi-frame (enhanced) series ----------------------------------------------------------------------


def stored_order(variant: str) -> list[int]:
    """Frame order of each enhanced variant, as indices into the converted frames (descending z)."""
    converted = list(range(SLICES))
    if variant == "shuffled, per-frame groups and rescale":
        return list(np.random.default_rng(3).permutation(SLICES))
    return converted


def make_variant(phantom: ChestPhantom, variant: str) -> Dataset:
    mf = enhanced_ct(fresh(phantom), seed=variant)
    if variant != "as converted":
        reorder_frames(mf, stored_order(variant))
        move_shared_to_per_frame(mf)
        shift_odd_frames(mf, offset=100)
    return mf


@pytest.mark.parametrize("variant", ["as converted", "shuffled, per-frame groups and rescale"])
def test_enhanced_phantom_gives_the_single_frame_volume(phantom, reference, tmp_path, variant):
    (path,) = save([make_variant(phantom, variant)], tmp_path)
    volume = load_series([path])
    assert np.array_equal(volume.array, reference.array) and np.array_equal(volume.array, phantom.hu)
    for field in ("spacing", "origin", "row_direction", "column_direction", "unit", "modality"):
        assert getattr(volume, field) == getattr(reference, field), field
    mf = pydicom.dcmread(path)
    assert volume.is_multiframe and volume.source_instances[0].SOPInstanceUID == mf.SOPInstanceUID
    assert len(volume.sources) == SLICES and {ds.SOPInstanceUID for ds in volume.sources} == {mf.SOPInstanceUID}
    # Converted frame c holds slice SLICES - 1 - c (descending z); stored frame n holds converted order[n - 1].
    order = stored_order(variant)
    expected = tuple(order.index(SLICES - 1 - k) + 1 for k in range(SLICES))
    assert volume.frame_numbers == expected
    assert [number for _, number in volume.source_frames] == list(expected)
    assert np.array_equal(volume.array[volume.slices_in_frame_order()], phantom.hu[[SLICES - 1 - c for c in order]])
    for k in (0, SLICES // 2):
        assert np.array_equal(display_pixels(volume, k), display_pixels(reference, k))


def test_slices_in_frame_order_is_the_stored_frame_order(phantom, tmp_path):
    (path,) = save([make_variant(phantom, "as converted")], tmp_path)
    volume = load_series([path])
    assert np.array_equal(volume.array[volume.slices_in_frame_order()], real_frames(pydicom.dcmread(path)))


def test_header_copies_keep_frames_and_display(phantom, tmp_path):
    """Copies of the sources without PixelData, one per slice (how the Ray executor ships a volume)."""
    (path,) = save([make_variant(phantom, "shuffled, per-frame groups and rescale")], tmp_path)
    volume = load_series([path])
    headers = tuple(Dataset({e.tag: e for e in ds if e.keyword != "PixelData"}) for ds in volume.sources)
    shipped = dataclasses.replace(volume, sources=headers)
    assert len(shipped.source_instances) == 1 and shipped.slices_in_frame_order() == volume.slices_in_frame_order()
    assert np.array_equal(display_pixels(shipped, 5), display_pixels(volume, 5))


def test_two_enhanced_instances_make_one_volume(phantom, reference, tmp_path):
    halves = [enhanced_ct(fresh(phantom)[:12], "upper"), enhanced_ct(fresh(phantom)[12:], "lower")]
    volume = load_series(save(halves, tmp_path))
    assert np.array_equal(volume.array, reference.array) and volume.origin == reference.origin
    assert [ds.SOPInstanceUID for ds in volume.source_instances] == [h.SOPInstanceUID for h in halves]
    assert volume.frame_numbers == tuple(range(12, 0, -1)) * 2


def test_real_enhanced_ct_frames_sorted_along_a_left_pointing_row():
    """pydicom's eCT_Supplemental: rows run to the right (-x), so the normal is feet-ward (-z)."""
    path = get_testdata_file("eCT_Supplemental.dcm")
    volume = load_series([path])
    ds = pydicom.dcmread(path)
    assert volume.array.shape == (2, 512, 512) and volume.is_multiframe and volume.frame_numbers == (2, 1)
    assert np.array_equal(volume.normal, [0.0, 0.0, -1.0])
    assert volume.origin == (99.5, -301.5, -149.0)  # frame 2, the most cranial: first along -z
    assert volume.spacing == (10.0, 0.388672, 0.388672)
    assert np.array_equal(volume.array, ds.pixel_array[[1, 0]].astype(np.float32) - 1024.0)
    assert volume.unit == "1"  # Rescale Type US: a perfusion map, not HU
    assert_close_display(display_pixels(volume, 0), linear_window(volume.array[0], 49.0, 102.0))


# -- projection images ------------------------------------------------------------------------------------


def test_cr_monochrome1_is_mirrored_and_displayed_through_its_window():
    path = get_testdata_file("RG3_UNCI.dcm")  # CR, MONOCHROME1, 10 bits stored, window 550/1024
    ds = pydicom.dcmread(path)
    volume = load_series([path])
    raw = ds.pixel_array.astype(np.float32)
    assert volume.array.shape == (1, 1760, 1760) and volume.modality == "CR" and volume.unit == "1"
    assert np.array_equal(volume.array[0], 1023.0 - raw)  # mirrored in the 10-bit range: higher is brighter
    assert volume.row_direction == (-1.0, 0.0, 0.0) and volume.column_direction == (0.0, 0.0, -1.0)  # R\F
    assert volume.spacing == (1.0, 1.0, 1.0) and volume.spacing_source == ""
    shown = display_pixels(volume, 0)
    assert_close_display(shown, 255 - linear_window(raw, 550.0, 1024.0))  # window on raw values, then inverted
    assert shown[raw == raw.min()].min() == 255 and shown[raw == raw.max()].max() == shown.min()  # low raw: white


def test_cr_with_zero_pixel_spacing_counts_as_unknown_spacing():
    volume = load_series([get_testdata_file("RG1_UNCI.dcm")])  # PixelSpacing 0\0, 15 bits, L\F
    raw = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm")).pixel_array
    assert volume.spacing == (1.0, 1.0, 1.0) and volume.spacing_source == ""
    assert volume.row_direction == (1.0, 0.0, 0.0) and volume.column_direction == (0.0, 0.0, -1.0)
    assert np.array_equal(volume.array[0], 32767.0 - raw.astype(np.float32))


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dx_takes_imager_pixel_spacing_and_oblique_orientation(tmp_path, photometric):
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    ds.ImagerPixelSpacing = [0.15, 0.2]
    ds.PatientOrientation = ["A", "FR"]  # an oblique view: columns run down and to the patient's right
    (path,) = save([ds], tmp_path)
    volume = load_series([path])
    raw = ds.pixel_array.astype(np.float32)
    assert volume.spacing == (1.0, 0.15, 0.2) and volume.spacing_source == "ImagerPixelSpacing"
    assert volume.row_direction == (0.0, -1.0, 0.0)
    assert np.allclose(volume.column_direction, np.array([-1.0, 0.0, -1.0]) / np.sqrt(2))
    assert np.array_equal(volume.array[0], 1023.0 - raw if photometric == "MONOCHROME1" else raw)


def test_secondary_capture_with_modality_lut_gives_lut_values():
    path = get_testdata_file("mlut_18.dcm")  # OT, signed 12 bit, Modality LUT 4096 entries from -2048
    ds = pydicom.dcmread(path)
    volume = load_series([path])
    lut = np.asarray(ds.ModalityLUTSequence[0].LUTData)
    assert np.array_equal(volume.array[0], lut[np.clip(ds.pixel_array.astype(np.int64) + 2048, 0, 4095)])
    assert volume.spacing_source == "" and volume.row_direction == (1.0, 0.0, 0.0)  # no PatientOrientation: L\F


def test_display_applies_the_voi_lut_scaled_to_its_range():
    path = get_testdata_file("vlut_04.dcm")  # OT, 8 bit, VOI LUT of 256 16-bit entries
    ds = pydicom.dcmread(path)
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    expected = np.rint((lut[ds.pixel_array] - lut.min()) / (lut.max() - lut.min()) * 255.0)
    assert np.array_equal(display_pixels(load_series([path]), 0), expected.astype(np.uint8))


def test_display_without_voi_spans_the_slice_range(reference):
    bare = copy.deepcopy(reference.sources[3])
    del bare.WindowCenter, bare.WindowWidth
    volume = dataclasses.replace(reference, sources=(*reference.sources[:3], bare, *reference.sources[4:]))
    shown = display_pixels(volume, 3)
    values = volume.array[3]
    assert shown[values == values.min()].max() == 0 and shown[values == values.max()].min() == 255
    assert_close_display(display_pixels(reference, 3), linear_window(reference.array[3], -600.0, 1500.0))


# -- Volume and units -------------------------------------------------------------------------------------


def test_volume_built_without_frames_stays_single_frame(phantom):
    volume = Volume(array=phantom.hu, spacing=(2.5, 1.5, 1.5), origin=(0.0, 0.0, 0.0),
                    row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0), unit="HU", modality="CT",
                    sources=tuple(phantom.datasets))
    assert not volume.is_multiframe and volume.spacing_source == "PixelSpacing"
    assert volume.source_frames[5] == (phantom.datasets[5], 1)
    assert volume.slices_in_frame_order() == list(range(SLICES))
    with pytest.raises(ValueError, match="2 frame numbers for 24 sources"):
        dataclasses.replace(volume, frame_numbers=(1, 2))


@pytest.mark.parametrize("attributes, unit", [
    ({"Modality": "CT"}, "HU"),
    ({"Modality": "CT", "RescaleType": "HU"}, "HU"),
    ({"Modality": "CT", "RescaleType": "US"}, "1"),
    ({"Modality": "MR"}, "1"),
    ({"Modality": "PT", "Units": "BQML"}, "Bq/mL"),  # SUV body weight is a later issue
    ({"Modality": "PT", "Units": "CNTS"}, "1"),
])
def test_volume_unit(attributes, unit):
    header = Dataset()
    header.update(attributes)
    assert volume_unit(header) == unit


# -- errors ----------------------------------------------------------------------------------------------

Case = Callable[[ChestPhantom, Path], tuple[list[Path], list[str]]]


def missing_slice(phantom, folder):
    datasets = fresh(phantom)
    del datasets[10]
    return save(datasets, folder), ["uneven slice spacing", "ImagePositionPatient (0020,0032) gap 5.000 mm",
                                    datasets[9].SOPInstanceUID, datasets[10].SOPInstanceUID, "median 2.500 mm"]


def duplicate_position(phantom, folder):
    datasets = fresh(phantom)
    twin = renamed(datasets[5], "twin")
    return save(datasets + [twin], folder), [
        f"instance {twin.SOPInstanceUID} has the same ImagePositionPatient (0020,0032) as instance "
        f"{datasets[5].SOPInstanceUID}", "duplicate positions"]


def mixed_series(phantom, folder):
    datasets = fresh(phantom)
    datasets[7].SeriesInstanceUID = generate_uid(entropy_srcs=["other series"])
    return save(datasets, folder), ["2 series", "SeriesInstanceUID (0020,000E)", datasets[7].SeriesInstanceUID,
                                    datasets[0].SeriesInstanceUID]


def mixed_orientation(phantom, folder):
    datasets = fresh(phantom)
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.435889894]
    return save(datasets, folder), [f"instance {datasets[3].SOPInstanceUID} has ImageOrientationPatient (0020,0037) "
                                    "1\\0\\0\\0\\0.9\\0.43589, unlike 1\\0\\0\\0\\1\\0",
                                    f"of instance {datasets[0].SOPInstanceUID}"]


def mixed_size(phantom, folder):
    datasets = fresh(phantom)
    datasets[4].PixelData = datasets[4].pixel_array[::2, ::2].copy().tobytes()
    datasets[4].Rows = datasets[4].Columns = SIZE // 2
    return save(datasets, folder), [f"instance {datasets[4].SOPInstanceUID} has Rows (0028,0010) 32, unlike 64 of "
                                    f"instance {datasets[0].SOPInstanceUID}"]


def mixed_pixel_spacing(phantom, folder):
    datasets = fresh(phantom)
    datasets[6].PixelSpacing = [1.6, 1.6]
    return save(datasets, folder), [f"instance {datasets[6].SOPInstanceUID} has PixelSpacing (0028,0030) 1.6\\1.6, "
                                    "unlike 1.5\\1.5"]


def zero_pixel_spacing(phantom, folder):
    datasets = fresh(phantom)
    datasets[0].PixelSpacing = [0, 0]
    return save(datasets, folder), [f"instance {datasets[0].SOPInstanceUID} has PixelSpacing (0028,0030) 0\\0"]


def gantry_tilt(phantom, folder):
    datasets = fresh(phantom)
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]  # a 0.5 mm shift per slice: the stack is sheared
    return save(datasets, folder), [f"instance {datasets[1].SOPInstanceUID} has an ImagePositionPatient (0020,0032)",
                                    "0.33 pixels off the slice normal", "gantry tilt"]


def lacks_position(phantom, folder):
    datasets = fresh(phantom)
    del datasets[2].ImagePositionPatient
    return save(datasets, folder), [f"instance {datasets[2].SOPInstanceUID} lacks ImagePositionPatient (0020,0032)"]


def structured_report_mixed_in(phantom, folder):
    datasets = fresh(phantom)
    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["sr"])
    report.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    report.Modality = "SR"
    return save(datasets + [report], folder), [
        f"instance {report.SOPInstanceUID} (Basic Text SR Storage) is not an image", "PixelData (7FE0,0010)"]


def segmentation_mixed_in(phantom, folder):
    datasets = fresh(phantom)
    datasets[8].SOPClassUID = datasets[8].file_meta.MediaStorageSOPClassUID = SegmentationStorage
    return save(datasets, folder), [f"instance {datasets[8].SOPInstanceUID} (Segmentation Storage) is a result object"]


def colour_image(phantom, folder):
    return [Path(get_testdata_file("SC_rgb.dcm"))], ["PhotometricInterpretation (0028,0004) RGB"]


def frames_without_positions(phantom, folder):
    return [Path(get_testdata_file("emri_small.dcm"))], [
        "has 10 frame(s) (NumberOfFrames (0028,0008)) but no PerFrameFunctionalGroupsSequence (5200,9230)"]


def two_projection_images(phantom, folder):
    first = pydicom.dcmread(get_testdata_file("image_dfl.dcm"))
    second = renamed(first, "second view")
    return save([first, second], folder), ["holds 2 projection images", first.SOPInstanceUID,
                                           second.SOPInstanceUID, "not a slice of one volume"]


def enhanced_and_single_frame(phantom, folder):
    datasets = fresh(phantom)
    mf = enhanced_ct(datasets[:12], "upper half")
    return save([mf, *datasets[12:]], folder), ["mixes image kinds", f"multi-frame ({mf.SOPInstanceUID})",
                                                f"slices ({datasets[12].SOPInstanceUID})"]


def frame_lacks_position(phantom, folder):
    mf = enhanced_ct(fresh(phantom), "no position")
    del mf.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    return save([mf], folder), [f"instance {mf.SOPInstanceUID} frame 3 lacks ImagePositionPatient (0020,0032)"]


def frames_share_a_position(phantom, folder):
    mf = enhanced_ct(fresh(phantom), "two phases")
    items = mf.PerFrameFunctionalGroupsSequence
    items[5].PlanePositionSequence = copy.deepcopy(items[4].PlanePositionSequence)
    return save([mf], folder), [f"instance {mf.SOPInstanceUID} frame 6 has the same ImagePositionPatient "
                                f"(0020,0032) as instance {mf.SOPInstanceUID} frame 5"]


def frame_count_mismatch(phantom, folder):
    mf = enhanced_ct(fresh(phantom), "short")
    del mf.PerFrameFunctionalGroupsSequence[-1]
    return save([mf], folder), [f"has {SLICES - 1} PerFrameFunctionalGroupsSequence (5200,9230) items for {SLICES} "
                                "frames (NumberOfFrames (0028,0008))"]


ERROR_CASES: dict[str, Case] = {case.__name__: case for case in (
    missing_slice, duplicate_position, mixed_series, mixed_orientation, mixed_size, mixed_pixel_spacing,
    zero_pixel_spacing, gantry_tilt, lacks_position, structured_report_mixed_in, segmentation_mixed_in, colour_image,
    frames_without_positions, two_projection_images, enhanced_and_single_frame, frame_lacks_position,
    frames_share_a_position, frame_count_mismatch,
)}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_each_problem_raises_a_clear_error(phantom, tmp_path, name):
    paths, fragments = ERROR_CASES[name](phantom, tmp_path)
    with pytest.raises(VolumeError) as raised:
        load_series(paths)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    series_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in paths}
    assert any(uid in message for uid in series_uids), message
    for value in PHANTOM_PATIENT.values():
        if len(value) > 1:  # PatientSex "O" is a letter of many words
            assert value not in message  # UIDs only: no PHI in errors, which end up in logs and the job store


def test_load_volume_still_refuses_a_projection_image():
    with pytest.raises(VolumeError, match=r"lacks ImagePositionPatient \(0020,0032\)"):
        load_volume([get_testdata_file("RG3_UNCI.dcm")])


def test_input_qc_names_every_reason_outside_the_validated_range(tmp_path):
    from dicom_ai_node.imaging.qc import input_problems
    from dicom_ai_node.pipeline import load_manifest

    accepts = load_manifest(Path(__file__).resolve().parent.parent / "pipelines" / "ct_lung").accepts
    inside = make_chest_phantom(slices=40, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed="qc-in")
    assert input_problems(load_volume(inside.write(tmp_path / "in")), accepts) == []
    outside = make_chest_phantom(slices=12, size=64, pixel_spacing_mm=6.0, slice_thickness_mm=10.0, uid_seed="qc-out")
    for ds in outside.datasets:
        ds.BodyPartExamined = "ABDOMEN"
    problems = input_problems(load_volume(outside.write(tmp_path / "out")), accepts)
    assert problems == [
        "BodyPartExamined ABDOMEN is not one of CHEST, LUNG, THORAX",
        "12 slices, fewer than the 20 required",
        "slice thickness 10 mm is outside the validated 0.5 to 5 mm",
        "row pixel spacing 6 mm is outside the validated 0.4 to 3 mm",
        "column pixel spacing 6 mm is outside the validated 0.4 to 3 mm",
    ]
