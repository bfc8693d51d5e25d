"""pet_suv: SUVbw conversion of FDG PET and per-lesion SUVmax, SUVpeak, MTV and TLG, classical.

Bq/mL -> SUVbw (dicom_ai_node.imaging.suv, vendor-neutral) -> candidate regions = face-connected components
at or above SUV 2.5 -> lesions = components of MIN_LESION_ML to MAX_LESION_ML (larger ones are taken as
physiological uptake: liver, brain, bladder, and are reported in a note only) -> per lesion:

- SUVmax: the highest voxel of the component.
- SUVpeak: the highest mean SUV of a 1 mL sphere (the voxels whose centres lie within 6.2 mm of its centre)
  centred on any voxel of the component (PERCIST-like search; the sphere is not moved off voxel centres).
- MTV2.5: the component's volume (voxel count x voxel volume).
- MTV41: voxels at or above 41 % of the lesion's SUVmax, face-connected to the SUVmax voxel, grown only
  within NEIGHBOURHOOD_MM of the component and never into another component (so it cannot leak into the liver
  or a neighbouring lesion); this region is the lesion's segment.
- TLG: MTV41 x SUVmean within MTV41 (g, i.e. SUV x mL).
Totals (no segment): overall SUVmax, total MTV41, total MTV2.5 and total TLG over the lesions.
Rule-based, numpy/scipy only: no learned weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicom_ai_node.imaging.suv import to_suv
from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Concept, Measurement, Pipeline, PipelineResult, RunContext, Segment

SUV_THRESHOLD = 2.5
PERCENT_OF_MAX = 0.41
MIN_LESION_ML = 0.5  # smaller components are noise or partial-volume specks
MAX_LESION_ML = 300.0  # larger components are physiological uptake (liver, brain, bladder), not lesions
NEIGHBOURHOOD_MM = 10.0  # MTV41 region growing stays within this distance of the lesion's SUV 2.5 component
PEAK_SPHERE_ML = 1.0
PEAK_RADIUS_MM = float((3.0 * PEAK_SPHERE_ML * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))  # 6.20 mm

MORPHOLOGICALLY_ABNORMAL = Concept("49755003", "SCT", "Morphologically Abnormal Structure")
LESION = Concept("52988006", "SCT", "Lesion")
SUV = Concept("126400", "DCM", "Standardized Uptake Value")
SUVBW_UNIT = Concept("g/ml{SUVbw}", "UCUM", "Standardized Uptake Value body weight")
# The derivation of each SUV (TID 1500 would put it in Derivation (121401); the Measurement contract has
# only `method`, so it is carried there).
MAXIMUM = Concept("56851009", "SCT", "Maximum")
MEAN = Concept("373098007", "SCT", "Mean")
PEAK = Concept("126031", "DCM", "Peak Value Within ROI")
METABOLIC_VOLUME = Concept("126032", "DCM", "Metabolic Volume")
TLG = Concept("126033", "DCM", "Total Lesion Glycolysis")
# No DICOM or SNOMED CT code names these segmentation thresholds; a private scheme (99...) is the rule.
THRESHOLD_41 = Concept("PCT41SUVMAX", "99DAINODE", "Region at or above 41 % of SUVmax")
THRESHOLD_25 = Concept("SUV2.5", "99DAINODE", "Region at or above SUV 2.5")
MILLILITER = Concept("mL", "UCUM", "milliliter")
GRAM = Concept("g", "UCUM", "gram")
COLORS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180))


@dataclass(frozen=True)
class LesionStats:
    suv_max: float
    suv_peak: float
    suv_mean41: float
    mtv41_ml: float
    mtv25_ml: float
    tlg_g: float
    max_index: tuple[int, int, int]
    mask41: np.ndarray  # bool, full volume shape


class PETSUVLesions(Pipeline):
    def run(self, volume: Volume, context: RunContext) -> PipelineResult:
        if volume.modality != "PT":
            raise ValueError(f"pet_suv needs PET (modality PT), got {volume.modality!r}")
        suv = to_suv(volume).array  # raises naming the tag (PatientWeight, dose, times...) when SUV is impossible
        stats, notes = find_lesions(suv, volume.spacing)
        return lesion_result(stats, notes)


def find_lesions(suv: np.ndarray, spacing: tuple[float, float, float]) -> tuple[list[LesionStats], list[str]]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, count = ndimage.label(suv >= SUV_THRESHOLD)
    notes: list[str] = []
    if count == 0:
        notes.append(f"No voxel at or above SUV {SUV_THRESHOLD:g}; no lesions.")
        return [], notes
    sizes = np.bincount(labels.ravel())[1:]
    boxes = ndimage.find_objects(labels)
    stats: list[LesionStats] = []
    small = 0
    for label, (size, box) in enumerate(zip(sizes, boxes), start=1):
        ml = size * voxel_ml
        if ml < MIN_LESION_ML:
            small += 1
            continue
        if ml > MAX_LESION_ML:
            notes.append(f"A region of {ml:.0f} mL at or above SUV {SUV_THRESHOLD:g} was taken as physiological "
                         f"uptake (larger than {MAX_LESION_ML:g} mL) and not reported as a lesion.")
            continue
        stats.append(lesion_stats(suv, labels, label, box, spacing, ml))
    if small:
        notes.append(f"{small} region(s) at or above SUV {SUV_THRESHOLD:g} smaller than {MIN_LESION_ML:g} mL ignored.")
    stats.sort(key=lambda s: -s.suv_max)
    notes.append(f"{len(stats)} lesion(s): components at or above SUV {SUV_THRESHOLD:g} of {MIN_LESION_ML:g} to "
                 f"{MAX_LESION_ML:g} mL; SUVpeak = highest mean of a 1 mL sphere centred in the lesion.")
    return stats, notes


def lesion_stats(suv: np.ndarray, labels: np.ndarray, label: int, box: tuple[slice, ...],
                 spacing: tuple[float, float, float], mtv25_ml: float) -> LesionStats:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    margin = [int(np.ceil(max(NEIGHBOURHOOD_MM, PEAK_RADIUS_MM) / s)) + 1 for s in spacing]
    crop = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, margin, suv.shape))
    values = suv[crop]
    own = labels[crop] == label
    masked = np.where(own, values, -np.inf)
    local_max = np.unravel_index(int(np.argmax(masked)), values.shape)
    suv_max = float(values[local_max])
    # neighbourhood: within NEIGHBOURHOOD_MM of the component, outside every other component
    distance = ndimage.distance_transform_edt(~own, sampling=spacing)
    allowed = (distance <= NEIGHBOURHOOD_MM) & ((labels[crop] == 0) | own)
    candidates = allowed & (values >= PERCENT_OF_MAX * suv_max)
    grown, _ = ndimage.label(candidates)
    region = grown == grown[local_max]
    mtv41 = float(region.sum()) * voxel_ml
    mean41 = float(values[region].mean())
    # SUVpeak: the highest mean over 1 mL spheres centred on the component's voxels
    radius = [int(np.ceil(PEAK_RADIUS_MM / sp)) for sp in spacing]
    grids = np.meshgrid(*[np.arange(-r, r + 1) * sp for r, sp in zip(radius, spacing)], indexing="ij")
    kernel = (sum(g * g for g in grids) <= PEAK_RADIUS_MM ** 2).astype(np.float64)
    local_mean = ndimage.correlate(values.astype(np.float64), kernel / kernel.sum(), mode="nearest")
    suv_peak = float(local_mean[own].max())
    mask41 = np.zeros(suv.shape, dtype=bool)
    mask41[crop] = region
    index = tuple(int(i + c.start) for i, c in zip(local_max, crop))
    return LesionStats(suv_max, suv_peak, mean41, mtv41, mtv25_ml, mtv41 * mean41, index, mask41)


def lesion_result(stats: list[LesionStats], notes: list[str]) -> PipelineResult:
    segments: list[Segment] = []
    measurements: list[Measurement] = []
    for number, s in enumerate(stats, start=1):
        segments.append(Segment(number, f"Lesion {number}", MORPHOLOGICALLY_ABNORMAL, LESION, s.mask41,
                                color_rgb=COLORS[(number - 1) % len(COLORS)]))
        measurements += [
            Measurement(SUV, s.suv_max, SUVBW_UNIT, segment_number=number, method=MAXIMUM),
            Measurement(SUV, s.suv_peak, SUVBW_UNIT, segment_number=number, method=PEAK),
            Measurement(SUV, s.suv_mean41, SUVBW_UNIT, segment_number=number, method=MEAN),
            Measurement(METABOLIC_VOLUME, s.mtv41_ml, MILLILITER, segment_number=number, method=THRESHOLD_41),
            Measurement(METABOLIC_VOLUME, s.mtv25_ml, MILLILITER, segment_number=number, method=THRESHOLD_25),
            Measurement(TLG, s.tlg_g, GRAM, segment_number=number, method=THRESHOLD_41),
        ]
    if stats:
        measurements += [
            Measurement(SUV, max(s.suv_max for s in stats), SUVBW_UNIT, method=MAXIMUM),
            Measurement(METABOLIC_VOLUME, sum(s.mtv41_ml for s in stats), MILLILITER, method=THRESHOLD_41),
            Measurement(METABOLIC_VOLUME, sum(s.mtv25_ml for s in stats), MILLILITER, method=THRESHOLD_25),
            Measurement(TLG, sum(s.tlg_g for s in stats), GRAM, method=THRESHOLD_41),
        ]
    key_slice = stats[0].max_index[0] if stats else None
    return PipelineResult(segments=segments, measurements=measurements, key_slice=key_slice, notes=notes)
