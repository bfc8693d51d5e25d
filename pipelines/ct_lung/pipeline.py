"""ct_lung: classical right and left lung segmentation of chest CT, with lung volumes and LAA-950.

Body mask -> low-attenuation voxels inside the body -> minus the airways grown from the trachea -> the two
lung regions (split by erosion when they touch) -> right/left from their physical x -> vessels filled in.
Rule-based, SimpleITK only: no learned weights.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Concept, Measurement, Pipeline, PipelineResult, RunContext, Segment

BODY_MIN_HU = -500.0  # patient (and table) are denser than this, air is not
LUNG_MAX_HU = -400.0  # aerated lung (about -850) versus soft tissue (about +40)
AIRWAY_MAX_HU = -950.0  # tight: what is certainly air, to find the trachea
AIRWAY_GROW_MAX_HU = (-930.0, -950.0)  # for growing on the smoothed image, tried in turn until one does not leak
AIRWAY_SMOOTHING_VOXELS = 0.5  # in-plane Gaussian sigma for growing; slices are left unsmoothed (often thick)
AIRWAY_EDGE_MAX_HU = -925.0  # halfway between air and parenchyma: takes back airway voxels noise pushed up
AIRWAY_RIM_MAX_SPACING_MM = 2.5  # the partial-volume rim (scanner blur of about 1-2 mm) is taken along such axes
LAA_HU = -950.0
MAX_AIRWAY_ML = 150.0  # above an adult's airway lumen seen on CT (about 30-100 mL): a grown core this big leaked
TRACHEA_SLAB_FRACTION = 0.2  # the trachea is looked for in the most superior fifth of the slices
TRACHEA_AREA_MM2 = (50.0, 1500.0)  # mean cross-section of a trachea, child to adult, with margin
TRACHEA_MAX_OFFSET_MM = 40.0  # from the body's midline
MIN_LUNG_ML = 100.0
MIN_SECOND_FRACTION = 0.1  # a second region (or eroded core) smaller than this, relative to the first, is not a lung
SPLIT_RADII_MM = tuple(float(r) for r in range(2, 32, 2))

ANATOMICAL_STRUCTURE = Concept("123037004", "SCT", "Anatomical Structure")
RIGHT_LUNG = Concept("3341006", "SCT", "Right lung")
LEFT_LUNG = Concept("44029006", "SCT", "Left lung")
LUNG = Concept("39607008", "SCT", "Lung")
VOLUME = Concept("118565006", "SCT", "Volume")
# DICOM and SNOMED CT have no concept for "% of lung below -950 HU"; a private scheme (99...) is the rule.
LAA950 = Concept("LAA950", "99DAINODE", "Low attenuation area below -950 HU")
MILLILITER = Concept("mL", "UCUM", "milliliter")
PERCENT = Concept("%", "UCUM", "percent")


class LungSegmentation(Pipeline):
    def run(self, volume: Volume, context: RunContext) -> PipelineResult:
        if volume.unit != "HU":
            raise ValueError(f"ct_lung needs CT in Hounsfield units, got unit {volume.unit!r}")
        if abs(float(volume.normal[2])) < 0.5:
            raise ValueError("ct_lung needs axial slices (slice normal along the patient's z axis)")
        image = volume.to_sitk()
        body = body_mask(image)
        if not mask_voxels(body):
            return PipelineResult(notes=["No body found (no voxel above -500 HU); no lungs segmented."])
        midline = centroid_x(body)
        notes: list[str] = []
        airways = airway_mask(image, body, superior_is_last=bool(volume.normal[2] > 0), notes=notes)
        candidates = sitk.MaskNegated(sitk.And(body, threshold(image, upper=LUNG_MAX_HU)), airways)
        regions = lung_regions(candidates, midline, volume.voxel_volume_ml, notes)
        if regions is None:
            notes.append(f"No aerated region of at least {MIN_LUNG_ML:.0f} mL inside the body; no lungs segmented.")
            return PipelineResult(notes=notes)
        masks = [lung_array(slicewise_filled(region), airways) for region in regions]
        return lung_result(volume, masks, notes)


def threshold(image: sitk.Image, upper: float, lower: float = -1e6) -> sitk.Image:
    """Binary mask (UInt8 0/1) of lower <= value <= upper."""
    return sitk.BinaryThreshold(image, lowerThreshold=lower, upperThreshold=upper, insideValue=1, outsideValue=0)


def mask_voxels(mask: sitk.Image) -> int:
    return int(sitk.GetArrayViewFromImage(mask).sum())


def centroid_x(mask: sitk.Image) -> float:
    """Physical LPS x (mm) of a mask's centroid: patient right is at lower x whatever the column order."""
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(mask)
    return float(shape.GetCentroid(1)[0])


def largest_components(mask: sitk.Image) -> tuple[sitk.Image, list[int]]:
    """Face-connected components labelled 1, 2, ... by decreasing size, and their sizes in voxels."""
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SortByObjectSizeOn()
    labels = relabel.Execute(sitk.ConnectedComponent(mask, False))
    return labels, list(relabel.GetSizeOfObjectsInPixels())


def slicewise_filled(mask: sitk.Image) -> sitk.Image:
    """The mask with every hole closed within its own slice: vessels inside a lung, lungs inside the body.

    Slice-wise because such holes are open in 3D (vessels leave the lung at the hilum).
    """
    filled = sitk.JoinSeries([sitk.BinaryFillhole(mask[:, :, k]) for k in range(mask.GetDepth())])
    filled.CopyInformation(mask)
    return filled


def body_mask(image: sitk.Image) -> sitk.Image:
    """Largest dense component (the patient, not the table), filled slice-wise so the lungs are inside.

    Air connected to the image border (outside the patient) is not a hole, so it stays outside the body.
    """
    labels, sizes = largest_components(threshold(image, upper=1e6, lower=BODY_MIN_HU))
    if not sizes:
        return labels != 0
    return slicewise_filled(labels == 1)


def airway_mask(image: sitk.Image, body: sitk.Image, superior_is_last: bool, notes: list[str]) -> sitk.Image:
    """Trachea and bronchi with their partial-volume rim; empty when no trachea is found or growing leaked.

    Grown from the trachea on a lightly smoothed image (in-plane Gaussian: noise no longer breaks the lumen
    into pieces, and thin bronchi survive, which a 3D median over thick slices does not), through face, edge
    and corner neighbours (an oblique bronchus in thick slices steps from slice to slice across voxel edges),
    with the least tight threshold of AIRWAY_GROW_MAX_HU whose result is not a leak (a grown core above
    MAX_AIRWAY_ML). Then completed to the lumen and its rim by airway_lumen_and_rim.
    """
    empty = sitk.Image(body.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(body)
    seed = trachea_seed(image, body, superior_is_last)
    if seed is None:
        notes.append("No trachea found in the upper slices; airways were not excluded from the lungs.")
        return empty
    in_body = sitk.Mask(image, body, outsideValue=0.0)  # growing must not leave the patient (e.g. via the mouth)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    sigma_mm = [AIRWAY_SMOOTHING_VOXELS * spacing for spacing in image.GetSpacing()[:2]] + [0.0]
    smoothed = sitk.DiscreteGaussian(in_body, variance=[s * s for s in sigma_mm], useImageSpacing=True)
    edges_too = sitk.ConnectedThresholdImageFilter.FullConnectivity
    for upper in AIRWAY_GROW_MAX_HU:
        core = sitk.ConnectedThreshold(smoothed, seedList=[seed], lower=-1e6, upper=upper, connectivity=edges_too)
        core_ml = mask_voxels(core) * voxel_ml
        if core_ml <= MAX_AIRWAY_ML:
            break
    else:
        notes.append("Airway growing from the trachea leaked into the lungs; airways were not excluded from the lungs.")
        return empty
    if core_ml == 0.0:
        notes.append("Airway growing found no lumen at the trachea; airways were not excluded from the lungs.")
        return empty
    airways = airway_lumen_and_rim(in_body, core)
    notes.append(f"Airways of {mask_voxels(airways) * voxel_ml:.0f} mL excluded from the lungs.")
    return airways


def airway_lumen_and_rim(image: sitk.Image, core: sitk.Image) -> sitk.Image:
    """The grown airway core completed to the whole lumen and its partial-volume rim.

    1. Lumen voxels that noise or blur lifted above the growing threshold: one conditional dilation into
       air-like voxels (<= AIRWAY_EDGE_MAX_HU), then the holes left inside the lumen closed slice by slice
       (whatever their value below LUNG_MAX_HU: a voxel enclosed by airway in its slice is lumen, not lung).
    2. The rim: the voxel layer around the lumen that the scanner's blur mixes with the wall. Against soft
       tissue it lies anywhere between air and -400 HU and, left in, would join the lungs along the bronchi as a
       sleeve; so one more dilation into everything below LUNG_MAX_HU, along each axis whose spacing is at
       most AIRWAY_RIM_MAX_SPACING_MM (in-plane, and along z where slices are thin). Inside a lung this takes
       one voxel layer of parenchyma around the bronchi (about 0.1 % of a lung's volume on the phantoms).
    Done in the airway tree's bounding box (plus a margin for the dilations) to stay fast.
    """
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(core)
    if not shape.GetNumberOfLabels():
        return core
    box = shape.GetBoundingBox(1)
    size = image.GetSize()
    low = [max(0, box[i] - 3) for i in range(3)]
    high = [min(size[i], box[i] + box[i + 3] + 3) for i in range(3)]
    crop = [high[i] - low[i] for i in range(3)]
    roi = sitk.RegionOfInterest(image, crop, low)
    lumen = sitk.RegionOfInterest(core, crop, low)
    lumen = sitk.Or(lumen, sitk.And(sitk.BinaryDilate(lumen, [1, 1, 1]), threshold(roi, upper=AIRWAY_EDGE_MAX_HU)))
    aerated = threshold(roi, upper=LUNG_MAX_HU)
    lumen = sitk.Or(lumen, sitk.And(slicewise_filled(lumen), aerated))
    rim_radius = [1 if spacing <= AIRWAY_RIM_MAX_SPACING_MM else 0 for spacing in image.GetSpacing()]
    airways = sitk.Or(lumen, sitk.And(sitk.BinaryDilate(lumen, rim_radius), aerated))
    full = sitk.Image(size, sitk.sitkUInt8)
    full.CopyInformation(image)
    return sitk.Paste(full, airways, crop, [0, 0, 0], low)


def trachea_seed(image: sitk.Image, body: sitk.Image, superior_is_last: bool) -> tuple[int, int, int] | None:
    """(x, y, z) index of a voxel of the trachea: an air tube in the most superior slices near the midline."""
    depth = image.GetDepth()
    slab_slices = max(2, int(round(TRACHEA_SLAB_FRACTION * depth)))
    first = depth - slab_slices if superior_is_last else 0
    slab = slice(first, first + slab_slices)
    air = sitk.And(threshold(image[:, :, slab], upper=AIRWAY_MAX_HU), body[:, :, slab])
    labels, sizes = largest_components(air)
    if not sizes:
        return None
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(labels)
    midline = centroid_x(body[:, :, slab])
    slice_mm = image.GetSpacing()[2]
    best, best_offset = None, TRACHEA_MAX_OFFSET_MM
    for label in shape.GetLabels():
        slices_spanned = shape.GetBoundingBox(label)[5]
        mean_area_mm2 = shape.GetPhysicalSize(label) / (slices_spanned * slice_mm)
        offset = abs(shape.GetCentroid(label)[0] - midline)
        is_tube = 2 * slices_spanned >= slab_slices and TRACHEA_AREA_MM2[0] <= mean_area_mm2 <= TRACHEA_AREA_MM2[1]
        if is_tube and offset <= best_offset:
            best, best_offset = label, offset
    if best is None:
        return None
    # The tube's voxel nearest to its centroid: on its axis, away from the partial-volume wall.
    voxels = np.argwhere(sitk.GetArrayViewFromImage(labels) == best)
    z, y, x = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
    return int(x), int(y), int(z) + first


def lung_regions(
    candidates: sitk.Image, midline: float, voxel_ml: float, notes: list[str]
) -> list[sitk.Image] | None:
    """[right, left] lung masks, or [both lungs] when they cannot be separated; None when there is no lung."""
    labels, sizes = largest_components(candidates)
    if not sizes or sizes[0] * voxel_ml < MIN_LUNG_ML:
        return None
    first = labels == 1
    if len(sizes) > 1 and sizes[1] >= MIN_SECOND_FRACTION * sizes[0] and sizes[1] * voxel_ml >= MIN_LUNG_ML:
        second = labels == 2
        if on_opposite_sides(first, second, midline):
            return right_then_left(first, second)
    split = split_by_erosion(first, midline, notes)
    if split is not None:
        return right_then_left(*split)
    notes.append("One connected lung region that erosion could not split: reported as both lungs together.")
    return [first]


def on_opposite_sides(a: sitk.Image, b: sitk.Image, midline: float) -> bool:
    return (centroid_x(a) - midline) * (centroid_x(b) - midline) < 0


def right_then_left(a: sitk.Image, b: sitk.Image) -> list[sitk.Image]:
    return [a, b] if centroid_x(a) < centroid_x(b) else [b, a]


def split_by_erosion(
    region: sitk.Image, midline: float, notes: list[str]
) -> tuple[sitk.Image, sitk.Image] | None:
    """The region cut in two where the lungs touch, or None when no erosion leaves one core on each side.

    Erosion by growing radii (thresholds of the inside distance, in mm) until two cores remain on opposite
    sides of the midline; a watershed of the inside distance, flooded from those cores, cuts at the narrowest neck.
    """
    depth = sitk.SignedMaurerDistanceMap(region, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
    for radius in SPLIT_RADII_MM:
        cores, sizes = largest_components(depth > radius)
        if not sizes:
            return None
        if len(sizes) < 2 or sizes[1] < MIN_SECOND_FRACTION * sizes[0]:
            continue
        if not on_opposite_sides(cores == 1, cores == 2, midline):
            continue
        markers = sitk.Threshold(cores, lower=1, upper=2, outsideValue=0)
        halves = sitk.Mask(sitk.MorphologicalWatershedFromMarkers(-depth, markers, markWatershedLine=False), region)
        notes.append(f"Lungs touched; separated by erosion ({radius:.0f} mm) and a watershed along the contact.")
        return halves == 1, halves == 2
    return None


def lung_array(region: sitk.Image, airways: sitk.Image) -> np.ndarray:
    """Bool mask in Volume.array order; airways come off again after the hole filling put them back."""
    return sitk.GetArrayFromImage(sitk.MaskNegated(region, airways)).astype(bool)


def lung_result(volume: Volume, masks: list[np.ndarray], notes: list[str]) -> PipelineResult:
    """Segments, per-lung and both-lung measurements from [right, left] masks, or from one mask of both lungs."""
    measurements: list[Measurement] = []
    if len(masks) == 2:
        segments = [
            Segment(1, "Right lung", ANATOMICAL_STRUCTURE, RIGHT_LUNG, masks[0], color_rgb=(128, 174, 128)),
            Segment(2, "Left lung", ANATOMICAL_STRUCTURE, LEFT_LUNG, masks[1], color_rgb=(241, 214, 145)),
        ]
        for segment in segments:
            measurements += lung_measurements(volume, segment.mask, segment.number)
    else:
        segments = [
            Segment(1, "Lungs (not separated)", ANATOMICAL_STRUCTURE, LUNG, masks[0], color_rgb=(197, 165, 145)),
        ]
    both = np.logical_or.reduce(masks)
    measurements += lung_measurements(volume, both, None)
    key_slice = int(np.argmax(both.sum(axis=(1, 2))))
    return PipelineResult(segments=segments, measurements=measurements, key_slice=key_slice, notes=notes)


def lung_measurements(volume: Volume, mask: np.ndarray, segment_number: int | None) -> list[Measurement]:
    """Volume (mL) and LAA-950 (% of the mask's voxels below -950 HU) of one lung, or of both when None."""
    voxels = int(mask.sum())
    laa_percent = 100.0 * float((volume.array[mask] < LAA_HU).sum()) / voxels
    return [
        Measurement(VOLUME, voxels * volume.voxel_volume_ml, MILLILITER, segment_number=segment_number),
        Measurement(LAA950, laa_percent, PERCENT, segment_number=segment_number),
    ]
