"""A synthetic whole-body-like FDG PET with known SUVs, for the tests and the demo.

Anatomy (LPS, mm, voxel centres): an elliptic body cylinder of background activity (SUV 1), a liver-like
ellipsoid (SUV `liver_suv`, 2 by default: below the lesion threshold 2.5) on the patient's right, and three
spherical lesions of uniform activity, one of them with a hotter core. No blur and no noise by default,
so a sphere's voxels are exactly those whose centre lies inside it.

Written as PET Image Storage, one instance per slice, with what SUVbw needs: Units BQML, CorrectedImage
[DECY, ATTN], DecayCorrection START, PatientWeight, RadionuclideTotalDose, F-18 half-life 6586.2 s and a
RadiopharmaceuticalStartDateTime 60 min before the series time. Activity concentrations are stored as
signed 16-bit with a RescaleSlope per slice (as real PET stores float data). Ground truth is kept both as
the intended SUV and as what the pixels say after quantisation.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import PositronEmissionTomographyImageStorage, generate_uid

from dicom_ai_node.phantom import set_grayscale_pixels, synthetic_instance, write_series

F18_HALF_LIFE_S = 6586.2
PHANTOM_PATIENT = {
    "PatientName": "Phantom^PET",
    "PatientID": "PHANTOM-PET-0001",
    "IssuerOfPatientID": "DICOM_AI_NODE_DEMO",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "ReferringPhysicianName": "Demo^Referrer",
}


@dataclass(frozen=True)
class Lesion:
    centre_mm: tuple[float, float, float]  # LPS, relative to the phantom's centre
    radius_mm: float
    suv: float
    core_radius_mm: float = 0.0  # a concentric hotter core (0: none)
    core_suv: float = 0.0

    @property
    def suv_max(self) -> float:
        return max(self.suv, self.core_suv) if self.core_radius_mm > 0 else self.suv

    @property
    def volume_ml(self) -> float:
        return 4.0 / 3.0 * np.pi * self.radius_mm ** 3 / 1000.0


DEFAULT_LESIONS = (
    Lesion((80.0, -20.0, -35.0), 10.0, 6.0),
    Lesion((70.0, 50.0, 30.0), 15.0, 4.0),
    Lesion((30.0, -55.0, 0.0), 20.0, 4.0, core_radius_mm=10.0, core_suv=10.0),
)


@dataclass(frozen=True)
class PETPhantom:
    datasets: list[Dataset]  # one PET Image Storage dataset per slice, InstanceNumber 1 = most superior
    suv: np.ndarray  # float64 intended SUVbw (slices, rows, columns), slices by ascending z
    bqml: np.ndarray  # float64 what the pixels say (stored * RescaleSlope), Bq/mL
    suv_factor: float  # g/Bq: bqml * suv_factor = SUV (exact, from the header values written)
    lesion_masks: list[np.ndarray]  # bool per lesion (its whole sphere), same order as `lesions`
    liver: np.ndarray  # bool
    body: np.ndarray  # bool
    lesions: tuple[Lesion, ...]
    voxel_volume_ml: float
    spacing_mm: tuple[float, float, float] = field(default=(2.0, 2.0, 2.0))

    @property
    def measured_suv(self) -> np.ndarray:
        """The SUV the pixels hold (intended SUV up to 16-bit quantisation)."""
        return self.bqml * self.suv_factor

    def write(self, folder: Path) -> list[Path]:
        return write_series(self.datasets, folder, "PT")


def make_pet_phantom(
    slices: int = 80,
    size: int = 160,
    voxel_mm: float = 2.0,
    weight_kg: float = 75.0,
    dose_bq: float = 370e6,
    uptake_s: float = 3600.0,
    liver_suv: float = 2.0,
    background_suv: float = 1.0,
    lesions: tuple[Lesion, ...] = DEFAULT_LESIONS,
    uid_seed: str = "pet-phantom-0",
) -> PETPhantom:
    coords = (np.arange(size) - (size - 1) / 2.0) * voxel_mm
    z = (np.arange(slices) - (slices - 1) / 2.0) * voxel_mm  # ascending z
    zz, yy, xx = np.meshgrid(z, coords, coords, indexing="ij")
    body = (xx / 140.0) ** 2 + (yy / 100.0) ** 2 <= 1.0
    liver = body & (((xx + 70.0) / 60.0) ** 2 + (yy / 50.0) ** 2 + (zz / 50.0) ** 2 <= 1.0)
    suv = np.zeros(zz.shape)
    suv[body] = background_suv
    suv[liver] = liver_suv
    masks = []
    for lesion in lesions:
        cx, cy, cz = lesion.centre_mm
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2
        sphere = body & (r2 <= lesion.radius_mm ** 2)
        suv[sphere] = lesion.suv
        if lesion.core_radius_mm > 0:
            suv[body & (r2 <= lesion.core_radius_mm ** 2)] = lesion.core_suv
        masks.append(sphere)
    decayed_dose = dose_bq * 2.0 ** (-uptake_s / F18_HALF_LIFE_S)
    factor = weight_kg * 1000.0 / decayed_dose
    concentration = suv / factor  # Bq/mL
    series_time = dt.datetime(2026, 1, 15, 10, 30, 0)
    injection = series_time - dt.timedelta(seconds=uptake_s)
    datasets, bqml = _datasets(concentration, z, coords, voxel_mm, uid_seed, series_time, injection,
                               weight_kg, dose_bq)
    return PETPhantom(datasets, suv, bqml, factor, masks, liver, body, tuple(lesions),
                      voxel_mm ** 3 / 1000.0, (voxel_mm,) * 3)


def _datasets(concentration: np.ndarray, z: np.ndarray, coords: np.ndarray, voxel_mm: float, uid_seed: str,
              series_time: dt.datetime, injection: dt.datetime, weight_kg: float,
              dose_bq: float) -> tuple[list[Dataset], np.ndarray]:
    study_uid = generate_uid(entropy_srcs=[uid_seed, "study"])
    series_uid = generate_uid(entropy_srcs=[uid_seed, "series"])
    frame_uid = generate_uid(entropy_srcs=[uid_seed, "frame-of-reference"])
    slices = concentration.shape[0]
    said = np.zeros_like(concentration)
    datasets = []
    for k in range(slices):
        top = float(concentration[k].max())
        slope_text = f"{top / 32767.0:.9g}" if top > 0 else "1"
        slope = float(slope_text)
        stored = np.clip(np.rint(concentration[k] / slope), -32768, 32767).astype(np.int16)
        said[k] = stored.astype(np.float64) * slope
        instance_number = slices - k
        sop_uid = generate_uid(entropy_srcs=[uid_seed, "instance", str(instance_number)])
        ds = synthetic_instance(PositronEmissionTomographyImageStorage, sop_uid, PHANTOM_PATIENT)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        day = series_time.strftime("%Y%m%d")
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = day
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time.strftime("%H%M%S")
        ds.AccessionNumber = "DEMOPET1"
        ds.Modality = "PT"
        ds.StudyDescription = "PET FDG (synthetic phantom)"
        ds.SeriesDescription = "PET AC 2 mm (synthetic phantom)"
        ds.PatientWeight = f"{weight_kg:g}"
        ds.BodyPartExamined = "WHOLEBODY"
        ds.SliceThickness = f"{voxel_mm:g}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance_number
        ds.ImageIndex = instance_number
        ds.NumberOfSlices = slices
        ds.ImagePositionPatient = [f"{coords[0]:.4f}", f"{coords[0]:.4f}", f"{z[k]:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z[k]:.4f}"
        # PET Series / PET Image modules
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
        ds.DecayCorrection = "START"
        ds.RandomsCorrectionMethod = "DLYD"
        ds.AttenuationCorrectionMethod = "CT-based (synthetic)"
        ds.ReconstructionMethod = "analytic phantom"
        ds.CollimatorType = "NONE"
        ds.FrameReferenceTime = "0"
        ds.ActualFrameDuration = 180000
        ds.DecayFactor = "1"
        ds.PatientOrientationCodeSequence = []  # Type 2 (NM/PET Patient Orientation), empty
        ds.PatientGantryRelationshipCodeSequence = []
        item = Dataset()
        item.Radiopharmaceutical = "Fluorodeoxyglucose"
        item.RadiopharmaceuticalStartTime = injection.strftime("%H%M%S")
        item.RadiopharmaceuticalStartDateTime = injection.strftime("%Y%m%d%H%M%S")
        item.RadionuclideTotalDose = f"{dose_bq:g}"
        item.RadionuclideHalfLife = "6586.2"
        item.RadionuclidePositronFraction = "0.9673"
        nuclide = Dataset()
        nuclide.CodeValue, nuclide.CodingSchemeDesignator, nuclide.CodeMeaning = "77004003", "SCT", "^18^Fluorine"
        item.RadionuclideCodeSequence = [nuclide]
        tracer = Dataset()
        tracer.CodeValue, tracer.CodingSchemeDesignator = "35321007", "SCT"
        tracer.CodeMeaning = "Fluorodeoxyglucose F^18^"
        item.RadiopharmaceuticalCodeSequence = [tracer]
        ds.RadiopharmaceuticalInformationSequence = [item]
        set_grayscale_pixels(ds, stored, bits_stored=16)
        ds.PixelSpacing = [f"{voxel_mm:g}", f"{voxel_mm:g}"]
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = slope_text
        ds.LossyImageCompression = "00"
        datasets.append(ds)
    return datasets, said
