"""Body region of a CT series from its pixels, for routing when BodyPartExamined is missing or wrong.

BodyPartExamined is optional free text, and often a protocol default that nobody corrected, so rules may
match `ContentBodyRegion` / `ContentBodyRegions` (config.CONTENT_MATCH_KEYS) computed here instead.

A classical classifier: no learned weights, every threshold below is an anatomical size or density with its
reason. Steps:
1. Take every n-th slice and pixel, to about 5 mm slices and 3 mm pixels: every cue is centimetres wide.
2. Per slice, the body is what is denser than -500 HU with its holes (lungs, airways) filled, less flat objects
   (the patient table) and parts much smaller than the largest (arms beside the trunk). Features of the body:
   lung air, any internal air, soft tissue enclosed by a bone ring (skull), large bones in the lateral thirds
   (iliac wings, femoral heads), the number and size of separate parts (two legs), its width.
3. Each slice gets a label from a decision list (`slice_labels`).
4. Slices are ordered superior to inferior from the geometry (feet-first series too), runs shorter than 20 mm
   are absorbed by their longer neighbour, and trunk above the lungs is counted as chest.
5. The region with the largest extent in mm is `body_region`; `regions` lists them superior to inferior.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicom_ai_node.imaging.volume import Volume

__all__ = ["ContentLabels", "classify_ct", "REGIONS", "UNKNOWN"]

# Labels, in the order a head-first body meets them (extremity: limbs are beside or below the trunk).
REGIONS = ("head", "chest", "abdomen", "pelvis", "extremity")
UNKNOWN = "unknown"
HEAD, CHEST, ABDOMEN, PELVIS, EXTREMITY = range(len(REGIONS))
OTHER = len(REGIONS)  # a body slice no rule recognises (a QA phantom, a water bag): counted, never a region
NO_BODY = -1  # a slice beyond the patient (only air, or the table)

TARGET_SLICE_MM = 5.0
TARGET_PIXEL_MM = 3.0
# Tilted slices still cut the body transversally; past ~37 degrees (coronal, sagittal) the cues do not apply.
MIN_AXIAL_COSINE = 0.8

BODY_HU = -500.0  # fat is -100, lung -850: the usual body/outside split
AIR_HU = -400.0  # aerated lung (-500 to -900) and gas (-1000), never soft tissue or fat
BONE_HU = 300.0  # cortical bone and dense cancellous bone; contrast-filled vessels rarely reach it
MIN_PART_MM2 = 1000.0  # smaller than a wrist (~20 cm2): cables, ECG leads, a blanket fold
MIN_PART_THICKNESS_MM = 25.0  # area / longest side: the table and mattress are flat, a forearm is ~60 mm thick
MIN_PART_SHARE = 0.4  # of the slice's largest part: two legs or two arms are alike, an arm beside the trunk is not
AIRWAY_MAX_MM2 = 700.0  # trachea ~250 mm2, a main bronchus ~150 mm2, bowel gas bubbles: not lung
LUNG_SHARE = 0.15  # lungs are 30-60 % of a mid-chest cross-section; bowel gas rarely 10 %
INTERNAL_AIR_SHARE = 0.01  # sinuses, pharynx or trachea in the face and neck; limbs hold no air
SKULL_SHARE = 0.3  # the cranial vault encloses most of the head's cross-section; a vertebra encloses ~2 %
HEAD_MAX_WIDTH_MM = 260.0  # adult heads are 140-170 mm wide, adult trunks over 280 mm
SMALL_PART_MM2 = 25000.0  # ~180 mm disc: a neck, an arm or a thigh, smaller than an adult trunk
LATERAL_BONE_SHARE = 0.01  # one iliac wing or femoral head is 2-4 % of the pelvis; one rib cross-section < 0.5 %
LIMB_BONE_SHARE = 0.01  # a limb's long bone is 2-10 % of its cross-section
MIN_RUN_MM = 20.0  # no region is shorter: a shorter run is a transition slice or an edge artefact
FULL_CONFIDENCE_MM = 30.0  # a region seen over less than this is labelled with less confidence

EVIDENCE = {
    HEAD: "a bone ring around soft tissue (skull) or a small air-containing cross-section (face, neck)",
    CHEST: "air-filled lungs",
    ABDOMEN: "a large soft-tissue cross-section without lungs or large lateral bones",
    PELVIS: "large bones in both lateral thirds (iliac wings, femoral heads)",
    EXTREMITY: "small or paired cross-sections with a central bone and no air",
    OTHER: "body cross-sections of no recognised region",
}
PLANE_4 = np.zeros((3, 3, 3), bool)
PLANE_4[1] = ndimage.generate_binary_structure(2, 1)
PLANE_8 = np.zeros((3, 3, 3), bool)
PLANE_8[1] = True  # objects connect diagonally, the background they enclose does not: thin rings stay closed


@dataclass(frozen=True)
class ContentLabels:
    body_region: str  # one of REGIONS or UNKNOWN
    regions: tuple[str, ...]  # regions present, superior to inferior
    confidence: float  # 0..1
    reason: str

    def as_header(self) -> dict[str, str | list[str]]:
        """Header keys that routing rules can match (config.CONTENT_MATCH_KEYS)."""
        return {"ContentBodyRegion": self.body_region, "ContentBodyRegions": list(self.regions)}


@dataclass(frozen=True)
class SliceFeatures:
    """Per-slice measurements of the body, in mm2 unless named otherwise; one entry per sampled slice."""

    body: np.ndarray
    largest_part: np.ndarray
    parts: np.ndarray  # separate parts kept as body (two legs: 2)
    width_mm: np.ndarray  # left-right extent of the body
    lung: np.ndarray
    air: np.ndarray  # all gas and aerated lung inside the body
    bone: np.ndarray
    skull_enclosed: np.ndarray  # non-bone area enclosed by bone
    lateral_bone: np.ndarray  # the smaller of the largest bone in the right third and in the left third


def unknown(reason: str) -> ContentLabels:
    return ContentLabels(UNKNOWN, (), 0.0, reason)


def unsupported_reason(volume: Volume) -> str | None:
    """Why the volume cannot be classified, or None when it can."""
    if volume.modality.upper() != "CT":
        return f"modality {volume.modality or 'absent'}: the classifier reads CT Hounsfield units only"
    if volume.unit != "HU":
        return f"CT pixel values in {volume.unit!r}, not Hounsfield units"
    if abs(float(volume.normal[2])) < MIN_AXIAL_COSINE:
        return "slices are not axial: the cues are those of transverse cross-sections"
    if volume.array.ndim != 3 or volume.array.size == 0:
        return "no pixels"
    return None


def sampled(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Every n-th slice, row and column (about 5 mm x 3 mm x 3 mm) and the spacing that gives."""
    steps = [max(1, round(target / spacing)) for target, spacing in
             zip((TARGET_SLICE_MM, TARGET_PIXEL_MM, TARGET_PIXEL_MM), volume.spacing)]
    hu = np.ascontiguousarray(volume.array[::steps[0], ::steps[1], ::steps[2]])
    return hu, tuple(float(s * n) for s, n in zip(volume.spacing, steps))


def left_mm(volume: Volume, shape: tuple[int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """The patient-left (LPS x) coordinate of each in-plane pixel, relative to pixel (0, 0)."""
    rows = np.arange(shape[0])[:, None] * spacing[1] * volume.column_direction[0]
    columns = np.arange(shape[1])[None, :] * spacing[2] * volume.row_direction[0]
    return (rows + columns).astype(np.float32)


def filled(mask: np.ndarray) -> np.ndarray:
    """`mask` with every hole of each slice filled (background not 4-connected to the slice border).

    Labelling the background once is linear; ndimage.binary_fill_holes dilates until stable, which is slow.
    """
    background, count = ndimage.label(~mask, structure=PLANE_4)
    outside = np.zeros(count + 1, bool)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        outside[edge] = True
    outside[0] = False
    return ~outside[background]


def per_slice_sum(mask: np.ndarray, pixel_mm2: float) -> np.ndarray:
    return mask.sum(axis=(1, 2)) * pixel_mm2


def body_parts(hu: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The body mask, the number of parts it has in each slice and the area of each slice's largest part."""
    pixel_mm2 = spacing[1] * spacing[2]
    labels, count = ndimage.label(filled(hu > BODY_HU), structure=PLANE_8)
    area = np.bincount(labels.ravel(), minlength=count + 1)[1:] * pixel_mm2
    boxes = ndimage.find_objects(labels)
    slice_of = np.array([box[0].start for box in boxes], dtype=int)
    longest = np.array([max((box[1].stop - box[1].start) * spacing[1], (box[2].stop - box[2].start) * spacing[2])
                        for box in boxes])
    solid = (area >= MIN_PART_MM2) & (area / np.maximum(longest, 1e-6) >= MIN_PART_THICKNESS_MM)
    largest = np.zeros(hu.shape[0])
    np.maximum.at(largest, slice_of[solid], area[solid])
    kept = solid & (area >= MIN_PART_SHARE * largest[slice_of])
    parts = np.bincount(slice_of[kept], minlength=hu.shape[0])
    return np.concatenate([[False], kept])[labels], parts, largest


def lateral_bone(bone: np.ndarray, left: np.ndarray, body_left: tuple[np.ndarray, np.ndarray],
                 pixel_mm2: float) -> np.ndarray:
    """Per slice, the smaller of the largest bone piece in the right third and in the left third of the body.

    Bone is cut at the thirds' edges first: an iliac wing fused to the sacrum (ankylosed sacroiliac joint, or
    a joint gap narrower than a pixel) still counts on its side, and a row of ribs stays small pieces.
    """
    low, high = (edge[:, None, None] for edge in body_left)
    third = (high - low) / 3.0
    sides = (left < low + third, left > high - third)
    largest = np.zeros((2, bone.shape[0]))
    for side, within in enumerate(sides):
        labels, count = ndimage.label(bone & within, structure=PLANE_8)
        if count:
            area = np.bincount(labels.ravel(), minlength=count + 1)[1:] * pixel_mm2
            slice_of = np.array([box[0].start for box in ndimage.find_objects(labels)], dtype=int)
            np.maximum.at(largest[side], slice_of, area)
    return largest.min(axis=0)


def slice_features(hu: np.ndarray, spacing: tuple[float, float, float], left: np.ndarray) -> SliceFeatures:
    pixel_mm2 = spacing[1] * spacing[2]
    body, parts, largest = body_parts(hu, spacing)
    low = np.where(body, left, np.inf).min(axis=(1, 2))
    high = np.where(body, left, -np.inf).max(axis=(1, 2))
    present = parts > 0
    low, high = np.where(present, low, 0.0), np.where(present, high, 0.0)
    air = body & (hu < AIR_HU)
    air_labels, count = ndimage.label(air, structure=PLANE_8)
    air_area = np.bincount(air_labels.ravel(), minlength=count + 1) * pixel_mm2
    lung_lut = air_area > AIRWAY_MAX_MM2
    lung_lut[0] = False
    bone = body & (hu > BONE_HU)
    return SliceFeatures(
        body=per_slice_sum(body, pixel_mm2),
        largest_part=largest,
        parts=parts,
        width_mm=np.where(present, high - low + spacing[2], 0.0),
        lung=per_slice_sum(lung_lut[air_labels], pixel_mm2),
        air=per_slice_sum(air, pixel_mm2),
        bone=per_slice_sum(bone, pixel_mm2),
        skull_enclosed=per_slice_sum(filled(bone) & ~bone, pixel_mm2),
        lateral_bone=lateral_bone(bone, left, (low, high), pixel_mm2),
    )


def slice_labels(f: SliceFeatures) -> np.ndarray:
    """Each slice's label, by the first rule of the decision list that holds (order matters: see comments)."""
    body = np.maximum(f.body, 1e-6)
    small = f.largest_part <= SMALL_PART_MM2
    conditions = [
        f.parts == 0,
        # The skull first: a head holds air (sinuses) and is small, which later rules would misread.
        (f.skull_enclosed >= SKULL_SHARE * body) & (f.width_mm <= HEAD_MAX_WIDTH_MM),
        f.lung >= LUNG_SHARE * body,
        # Below the vault (face, skull base, neck) the head is small and holds air; a limb holds none.
        small & (f.air >= INTERNAL_AIR_SHARE * body),
        ((f.parts >= 2) | small) & (f.bone >= LIMB_BONE_SHARE * body),
        (f.parts >= 2) | small,  # no bone: not a limb, and too small for a trunk
        f.lateral_bone >= LATERAL_BONE_SHARE * body,
    ]
    choices = [NO_BODY, HEAD, CHEST, HEAD, EXTREMITY, OTHER, PELVIS]
    return np.select(conditions, choices, default=ABDOMEN)


def superior_first(labels: np.ndarray, volume: Volume) -> np.ndarray:
    """Labels ordered from the most superior slice (LPS +z) down, whatever way the slices were stacked."""
    return labels[::-1] if volume.normal[2] > 0 else labels


def runs_of(labels: np.ndarray) -> list[list[int]]:
    """[label, length] of each run of equal consecutive labels."""
    starts = np.flatnonzero(np.diff(labels, prepend=labels[0] - 1))
    lengths = np.diff(np.append(starts, labels.size))
    return [[int(labels[s]), int(n)] for s, n in zip(starts, lengths)]


def absorbed_short_runs(runs: list[list[int]], min_slices: int) -> list[list[int]]:
    """Runs with each one shorter than `min_slices` merged, shortest first, into its longer neighbour."""
    runs = [list(r) for r in runs]
    while len(runs) > 1:
        shortest = min(range(len(runs)), key=lambda i: runs[i][1])
        if runs[shortest][1] >= min_slices:
            break
        neighbours = [i for i in (shortest - 1, shortest + 1) if 0 <= i < len(runs)]
        into = max(neighbours, key=lambda i: runs[i][1])
        runs[into][1] += runs.pop(shortest)[1]
        runs = merged_equal_neighbours(runs)
    return runs


def merged_equal_neighbours(runs: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for label, length in runs:
        if merged and merged[-1][0] == label:
            merged[-1][1] += length
        else:
            merged.append([label, length])
    return merged


def chest_above_lungs(runs: list[list[int]]) -> list[list[int]]:
    """Abdomen or pelvis runs above the highest chest run relabelled chest.

    Nothing of the abdomen lies above the lungs: a wide lungless trunk there is the lower neck and the
    shoulder girdle, whose scapulae and humeral heads look like the pelvis's lateral bones.
    """
    top_chest = next((i for i, (label, _) in enumerate(runs) if label == CHEST), None)
    if top_chest is None:
        return runs
    relabelled = [[CHEST if i < top_chest and label in (ABDOMEN, PELVIS) else label, n]
                  for i, (label, n) in enumerate(runs)]
    return merged_equal_neighbours(relabelled)


def expanded(runs: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.full(n, label) for label, n in runs])


def name_of(label: int) -> str:
    return REGIONS[label] if label < len(REGIONS) else UNKNOWN


def classify_ct(volume: Volume) -> ContentLabels:
    """The body region(s) a CT volume covers, from its pixels and geometry only.

    Modality and unit decide whether the pixels are Hounsfield units; BodyPartExamined, descriptions and
    protocol names are never read, so a wrong or missing one cannot sway the answer.
    """
    problem = unsupported_reason(volume)
    if problem:
        return unknown(problem)
    hu, spacing = sampled(volume)
    raw = slice_labels(slice_features(hu, spacing, left_mm(volume, hu.shape[1:], spacing)))
    raw = superior_first(raw, volume)
    raw = raw[raw != NO_BODY]
    if raw.size == 0:
        return unknown("no body cross-section in any slice (only air or flat objects such as the table)")
    min_slices = int(np.ceil(MIN_RUN_MM / spacing[0]))
    final = expanded(chest_above_lungs(absorbed_short_runs(runs_of(raw), min_slices)))
    extents = {label: float((final == label).sum()) * spacing[0] for label in dict.fromkeys(final.tolist())}
    main = max(extents, key=extents.__getitem__)  # ties: the more superior, met first
    agreement = float((raw[final == main] == main).mean())
    confidence = agreement * min(1.0, extents[main] / FULL_CONFIDENCE_MM)
    region_names = tuple(REGIONS[label] for label in extents if label != OTHER)
    evidence_share = 100.0 * float((raw == main).mean())
    extent_text = ", ".join(f"{name_of(label)} {mm:.0f} mm" for label, mm in extents.items())
    reason = f"{EVIDENCE[main]} in {evidence_share:.0f} % of slices; superior to inferior: {extent_text}"
    return ContentLabels(name_of(main), region_names, round(confidence, 3), reason)
