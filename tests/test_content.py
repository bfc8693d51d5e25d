"""Content classifier: small synthetic CT phantoms of each body region, with known answers.

Phantoms are in LPS mm (x: patient left, y: posterior, z: superior), on a 128 x 128 grid of 3 mm pixels
(384 mm field of view) with 5 mm slices unless a test says otherwise, and lie on a flat table like a patient.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dicom_ai_node.config import Rule
from dicom_ai_node.imaging import load_volume
from dicom_ai_node.imaging.content import (ABDOMEN, CHEST, EXTREMITY, HEAD, PELVIS, ContentLabels,
                                           absorbed_short_runs, chest_above_lungs, classify_ct)
from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.route import route

SIZE = 128
PIXEL_MM = 3.0
SLICE_MM = 5.0
AIR, FAT, SOFT, BONE, CORTEX = -1000.0, -100.0, 40.0, 400.0, 1000.0


@dataclasses.dataclass(frozen=True)
class Grid:
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    def ellipse(self, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        return ((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2 <= 1.0

    def ellipsoid(self, cx: float, cy: float, cz: float, ax: float, ay: float, az: float) -> np.ndarray:
        return self.ellipse(cx, cy, ax, ay) & (((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2
                                               + ((self.z - cz) / az) ** 2 <= 1.0)

    def between(self, low: float, high: float) -> np.ndarray:
        return (self.z >= low) & (self.z <= high)

    def capsule(self, start: tuple[float, float], end: tuple[float, float], radius: float) -> np.ndarray:
        """In-plane points within `radius` of a segment (a bone seen in cross-section as a bar)."""
        sx, sy = start
        dx, dy = end[0] - sx, end[1] - sy
        t = np.clip(((self.x - sx) * dx + (self.y - sy) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        return (self.x - sx - t * dx) ** 2 + (self.y - sy - t * dy) ** 2 <= radius ** 2


def grid(slices: int, size: int = SIZE, pixel_mm: float = PIXEL_MM) -> Grid:
    coords = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
    z, y, x = np.meshgrid(np.arange(slices) * SLICE_MM, coords, coords, indexing="ij")
    return Grid(x, y, z)


def scanned(g: Grid, hu: np.ndarray, table_y: float, seed: int = 0) -> np.ndarray:
    """A flat table under the patient, and scanner noise."""
    hu[(np.abs(g.x) <= 170) & (g.y >= table_y) & (g.y <= table_y + 15) & (hu == AIR)] = 100.0
    return (hu + np.random.default_rng(seed).normal(0.0, 15.0, hu.shape)).astype(np.float32)


def ct_volume(hu: np.ndarray, pixel_mm: float = PIXEL_MM, feet_first: bool = False, **changes) -> Volume:
    """A head-first (slices ascending in z) or feet-first (IOP -1\\0\\0\\0\\1\\0, normal pointing down) volume
    of the same anatomy; no source headers at all, so only the pixels can inform the classifier."""
    half = (hu.shape[2] - 1) / 2.0 * pixel_mm
    top = (hu.shape[0] - 1) * SLICE_MM
    if feet_first:
        fields = dict(array=hu[::-1, :, ::-1].copy(), origin=(half, -half, top), row_direction=(-1.0, 0.0, 0.0))
    else:
        fields = dict(array=hu, origin=(-half, -half, 0.0), row_direction=(1.0, 0.0, 0.0))
    fields.update(spacing=(SLICE_MM, pixel_mm, pixel_mm), column_direction=(0.0, 1.0, 0.0), unit="HU",
                  modality="CT", sources=())
    fields.update(changes)
    return Volume(**fields)


def head_hu(slices: int = 40) -> np.ndarray:
    """Neck (cervical spine, airway), face (jaw, sinuses, nasal cavity), then the cranium: scalp, skull shell,
    brain with ventricles."""
    g = grid(slices)
    hu = np.full(g.x.shape, AIR)
    neck = g.ellipse(0, 0, 55, 60) & (g.z <= 45)
    hu[neck] = SOFT
    hu[neck & g.ellipse(0, 25, 10, 10)] = BONE
    hu[neck & g.ellipse(0, -25, 8, 8)] = AIR
    face = g.ellipse(0, 0, 72, 92) & g.between(45, 75)
    hu[face] = SOFT
    hu[face & g.capsule((-55, -30), (0, -80), 6)] = CORTEX  # jaw
    hu[face & g.capsule((55, -30), (0, -80), 6)] = CORTEX
    hu[face & g.ellipse(0, 40, 30, 20)] = CORTEX  # skull base
    for cx in (-28, 28):
        hu[face & g.ellipse(cx, -35, 14, 16)] = AIR  # maxillary sinuses
    hu[face & g.ellipse(0, -55, 6, 12)] = AIR  # nasal cavity
    cranium = g.z >= 75
    centre = 110.0
    hu[cranium & g.ellipsoid(0, 0, centre, 80, 100, 95)] = SOFT
    hu[cranium & g.ellipsoid(0, 0, centre, 75, 95, 90)] = CORTEX
    brain = cranium & g.ellipsoid(0, 0, centre, 68, 88, 83)
    hu[brain] = 35.0
    for cx in (-10, 10):
        hu[brain & g.ellipse(cx, -5, 5, 25) & g.between(110, 150)] = 5.0  # lateral ventricles
    return scanned(g, hu, table_y=105)


def abdomen_hu(slices: int = 30) -> np.ndarray:
    """Large trunk without lungs: fat, liver, kidneys, aorta, spine, bowel gas, lower ribs in the upper third."""
    g = grid(slices)
    hu = np.full(g.x.shape, AIR)
    hu[g.ellipse(0, 0, 170, 120)] = FAT
    hu[g.ellipse(0, 0, 155, 105)] = SOFT
    top = (slices - 1) * SLICE_MM
    hu[g.ellipse(-70, -10, 75, 70) & (g.z >= top / 2)] = 60.0  # liver, patient right (-x)
    for side in (-1, 1):
        hu[g.ellipse(side * 60, 55, 25, 35) & g.between(top / 4, 3 * top / 4)] = 30.0  # kidneys
        for angle in (20.0, 45.0, 70.0):  # rib cross-sections just under the skin
            a = np.radians(angle)
            hu[g.ellipse(side * 150 * np.cos(a), 95 * np.sin(a) - 20, 6, 6) & (g.z >= 2 * top / 3)] = 700.0
    hu[g.ellipse(0, 50, 18, 16)] = 600.0  # vertebral body: cortex around cancellous bone
    hu[g.ellipse(0, 50, 15, 13)] = 200.0
    hu[g.capsule((0, 66), (0, 95), 5)] = 600.0  # spinous process
    hu[g.ellipse(-15, 25, 12, 12)] = 45.0  # aorta
    for cx, cy in ((30, -60), (-20, -75), (60, -40)):
        hu[g.ellipse(cx, cy, 12, 12)] = AIR  # bowel gas
    hu[g.ellipse(0, -85, 30, 12) & (g.z <= top / 2)] = AIR  # transverse colon gas
    return scanned(g, hu, table_y=125, seed=1)


def pelvis_hu(slices: int = 37) -> np.ndarray:
    """Pelvis, superior to inferior: iliac wings with sacrum, acetabula, femoral heads, trochanters."""
    g = grid(slices)
    hu = np.full(g.x.shape, AIR)
    hu[g.ellipse(0, 0, 180, 120)] = FAT
    hu[g.ellipse(0, 0, 165, 105)] = SOFT
    hu[g.ellipse(0, -50, 40, 35) & (g.z <= 90)] = 10.0  # bladder
    hu[g.ellipse(0, 40, 12, 12)] = AIR  # rectal gas
    hu[g.ellipse(0, 75, 45, 20) & (g.z >= 60)] = BONE  # sacrum
    for side in (-1, 1):
        hu[g.capsule((side * 45, 60), (side * 130, -30), 7) & (g.z >= 100)] = 600.0  # iliac wing
        hu[g.ellipse(side * 80, 10, 22, 22) & g.between(55, 105)] = 500.0  # acetabulum
        hu[g.ellipsoid(side * 85, 5, 50, 24, 24, 24)] = 500.0  # femoral head
        hu[g.ellipse(side * 115, 5, 18, 18) & (g.z <= 40)] = 600.0  # greater trochanter, femoral shaft
        hu[g.ellipse(side * 45, 55, 12, 12) & (g.z <= 40)] = 600.0  # ischial tuberosity
        hu[g.ellipse(side * 15, -90, 8, 8) & g.between(25, 45)] = 600.0  # pubis
    return scanned(g, hu, table_y=125, seed=2)


def legs_hu(slices: int = 30) -> np.ndarray:
    """Two thighs apart, each with fat, muscle and a femur (cortex around fatty marrow)."""
    g = grid(slices)
    hu = np.full(g.x.shape, AIR)
    for side in (-1, 1):
        hu[g.ellipse(side * 85, 0, 70, 70)] = FAT
        hu[g.ellipse(side * 85, 0, 58, 58)] = SOFT
        hu[g.ellipse(side * 80, 5, 14, 14)] = CORTEX
        hu[g.ellipse(side * 80, 5, 8, 8)] = -80.0
    return scanned(g, hu, table_y=75, seed=3)


def arm_hu(slices: int = 30) -> np.ndarray:
    """One arm, elongated in cross-section, with a humerus."""
    g = grid(slices)
    hu = np.full(g.x.shape, AIR)
    hu[g.ellipse(0, 0, 55, 40)] = FAT
    hu[g.ellipse(0, 0, 47, 33)] = SOFT
    hu[g.ellipse(0, 0, 12, 12)] = CORTEX
    hu[g.ellipse(0, 0, 6, 6)] = -80.0
    return scanned(g, hu, table_y=45, seed=4)


def chest_hu(slices: int = 40) -> np.ndarray:
    return make_chest_phantom(slices=slices, size=SIZE, pixel_spacing_mm=PIXEL_MM,
                              slice_thickness_mm=SLICE_MM).hu


CASES = {
    "head": (head_hu, "head", ("head",)),
    "abdomen": (abdomen_hu, "abdomen", ("abdomen",)),
    "pelvis": (pelvis_hu, "pelvis", ("pelvis",)),
    "legs": (legs_hu, "extremity", ("extremity",)),
    "arm": (arm_hu, "extremity", ("extremity",)),
}


@pytest.fixture(scope="module")
def phantoms() -> dict[str, np.ndarray]:
    return {name: make() for name, (make, _, _) in CASES.items()} | {"chest": chest_hu()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_region_phantoms(phantoms, name):
    _, region, regions = CASES[name]
    labels = classify_ct(ct_volume(phantoms[name]))
    assert (labels.body_region, labels.regions) == (region, regions), labels.reason
    assert labels.confidence >= 0.8, labels.reason


def test_chest_phantom_is_chest_with_lungs_as_the_reason(phantoms):
    labels = classify_ct(ct_volume(phantoms["chest"]))
    assert labels.body_region == "chest" and labels.regions[0] == "chest", labels.reason
    # Below its lungs the phantom is a lungless trunk: the upper abdomen a chest CT covers.
    assert labels.regions in (("chest",), ("chest", "abdomen"))
    assert labels.reason.startswith("air-filled lungs in ")
    # The phantom's lungs end 30 mm below its top: those lungless slices are chest by anatomy, not by evidence.
    assert labels.confidence >= 0.75


def test_chest_above_abdomen_in_one_series_lists_both_superior_first(phantoms):
    stack = np.concatenate([phantoms["abdomen"][:20], phantoms["chest"]])  # ascending z: abdomen below
    labels = classify_ct(ct_volume(stack))
    assert labels.regions == ("chest", "abdomen"), labels.reason
    assert labels.body_region == "chest"  # 200 mm of chest phantom against 100 mm of abdomen
    assert "chest" in labels.reason and "abdomen" in labels.reason


@pytest.mark.parametrize("name", ["head", "pelvis", "legs"])
def test_feet_first_series_gives_the_same_labels(phantoms, name):
    head_first = classify_ct(ct_volume(phantoms[name]))
    feet_first = classify_ct(ct_volume(phantoms[name], feet_first=True))
    assert feet_first == head_first


def test_feet_first_stack_still_lists_regions_superior_first(phantoms):
    stack = np.concatenate([phantoms["pelvis"], phantoms["abdomen"], phantoms["chest"]])
    for feet_first in (False, True):
        labels = classify_ct(ct_volume(stack, feet_first=feet_first))
        assert labels.regions == ("chest", "abdomen", "pelvis"), labels.reason


@pytest.mark.parametrize("runs, expected", [
    ([[CHEST, 10], [ABDOMEN, 1], [CHEST, 2], [ABDOMEN, 8]], [[CHEST, 13], [ABDOMEN, 8]]),  # noise absorbed
    ([[HEAD, 2], [CHEST, 10]], [[CHEST, 12]]),  # an edge run too short to be a region
    ([[PELVIS, 3], [EXTREMITY, 3]], [[EXTREMITY, 6]]),  # all short: the first of the shortest is absorbed
    ([[ABDOMEN, 9]], [[ABDOMEN, 9]]),
])
def test_short_runs_are_absorbed_by_their_longer_neighbour(runs, expected):
    assert absorbed_short_runs(runs, min_slices=4) == expected


def test_lungless_trunk_above_the_lungs_is_chest():
    """Shoulder girdle (pelvis-like lateral bones) and lower neck above the lung apices."""
    runs = [[HEAD, 5], [PELVIS, 4], [ABDOMEN, 4], [CHEST, 20], [ABDOMEN, 6], [PELVIS, 9]]
    assert chest_above_lungs(runs) == [[HEAD, 5], [CHEST, 28], [ABDOMEN, 6], [PELVIS, 9]]
    assert chest_above_lungs([[ABDOMEN, 6], [PELVIS, 9]]) == [[ABDOMEN, 6], [PELVIS, 9]]


def test_header_body_part_is_ignored(tmp_path):
    """A chest series labelled HEAD (or with no BodyPartExamined) is still chest: only pixels count.

    Written and loaded as DICOM, at 1.5 mm pixels, so the downsampling path is exercised too."""
    phantom = make_chest_phantom(slices=24, size=256, pixel_spacing_mm=1.5, slice_thickness_mm=SLICE_MM)
    for ds in phantom.datasets[::2]:
        ds.BodyPartExamined = "HEAD"
    for ds in phantom.datasets[1::2]:
        del ds.BodyPartExamined
    labels = classify_ct(load_volume(phantom.write(tmp_path)))
    assert labels.body_region == "chest", labels.reason


def test_labels_become_header_keys_that_rules_match(phantoms):
    labels = classify_ct(ct_volume(phantoms["pelvis"]))
    assert labels.as_header() == {"ContentBodyRegion": "pelvis", "ContentBodyRegions": ["pelvis"]}
    rules = [Rule(name="pelvis-by-content", match={"Modality": "CT", "ContentBodyRegion": "PELVIS"},
                  pipelines=["p"]),
             Rule(name="chest-by-content", match={"ContentBodyRegions": ["CHEST"]}, pipelines=["c"])]
    header = {"Modality": "CT", "BodyPartExamined": "CHEST"} | labels.as_header()
    fired = [d.rule for d in route(rules, header, "SCANNER") if d.fires]
    assert fired == ["pelvis-by-content"]


@pytest.mark.parametrize("changes, reason", [
    ({"modality": "MR", "unit": "1"}, "modality MR"),
    ({"unit": "1"}, "not Hounsfield units"),
    ({"row_direction": (1.0, 0.0, 0.0), "column_direction": (0.0, 0.0, -1.0)}, "not axial"),
])
def test_non_ct_or_non_axial_is_unknown(phantoms, changes, reason):
    labels = classify_ct(ct_volume(phantoms["abdomen"], **changes))
    assert labels == ContentLabels("unknown", (), 0.0, labels.reason)
    assert reason in labels.reason
    assert labels.as_header() == {"ContentBodyRegion": "unknown", "ContentBodyRegions": []}


def test_empty_field_of_view_is_unknown():
    g = grid(6)
    labels = classify_ct(ct_volume(scanned(g, np.full(g.x.shape, AIR), table_y=100)))
    assert labels.body_region == "unknown" and "no body" in labels.reason


def test_a_soft_tissue_cylinder_is_no_region():
    """A water QA phantom has neither bone nor air: it is not reported as a limb."""
    g = grid(10)
    hu = np.full(g.x.shape, AIR)
    hu[g.ellipse(0, 0, 80, 80)] = 0.0
    labels = classify_ct(ct_volume(scanned(g, hu, table_y=90)))
    assert (labels.body_region, labels.regions) == ("unknown", ())
