"""The node's results in OHIF, the viewer most AI teams use: the real OHIF build (@ohif/app 3.13.2) in headless
Chromium (software WebGL) reads them over DICOMweb from a real Orthanc with its DICOMweb plugin.

The node's own code (JobRunner: ct_lung, the result writers and the validation gate) makes SEG, TID 1500 SR
in both profiles ("full" and "viewer", as for two destinations) and key-image SC for a chest phantom, and its
Parametric Map writer a map of a synthetic heatmap (ct_lung has none); they are uploaded to Orthanc with the
source CT, and OHIF is opened on each result series (viewer?StudyInstanceUIDs=...&initialSeriesInstanceUID=...).
What OHIF 3.13 does:

  - SEG (BINARY): shown as an overlay on the CT; once loaded, the segmentation panel lists "Right lung" and
    "Left lung" in the colours of RecommendedDisplayCIELabValue, and the overlay is drawn in those colours
    (checked on the canvas pixels, right lung on the viewer's left).
  - SC: displayed (colour pixels on the canvas).
  - SR of the "full" profile (TID 1411 volumetric groups referencing SEG segments + a TID 1501 series-level
    group, none with image coordinates): OHIF's SR viewport crashes (TypeError reading
    'ReferencedSOPSequence' of coords[0] in _checkIfCanAddMeasurementsToDisplaySet) and shows nothing. One
    group without SCOORD is enough, even next to planar groups.
  - SR of the "viewer" profile (every group a TID 1410 planar ROI with an SCOORD POLYLINE; see
    dicom_ai_node/results/sr_viewer.py): OHIF opens it on the first group's image and draws every outline
    there with its measurement labels; the viewport's arrows step to each other group's image, where its
    outline and labels are drawn too. Labels of groups on one image can overlap (OHIF puts each at the right
    end of its region, half-way down): the outline of both lungs and the left lung share that spot.
  - Parametric Map: fused over the CT in a colour map, the heatmap's peak where it is in the source.

Needs chromium, Orthanc's DICOMweb plugin, node, and the OHIF dist + playwright-core installed by
tests/ohif/setup.sh into $OHIF_DIR (default .ohif/ at the repository root). Skipped when one is missing,
except under CI (the CI environment variable set), where that is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import ORTHANC_BIN, Orthanc, free_port, node_config, start_orthanc
from dicom_ai_node.imaging import load_series
from dicom_ai_node.jobs.executor import JobOutcome, JobRunner, JobSpec, OutputProfile, ResultFile, result_context
from dicom_ai_node.phantom import ChestPhantom, make_chest_phantom
from dicom_ai_node.pipeline import Concept, Detection, Heatmap, Measurement, PipelineResult, Segment, discover
from dicom_ai_node.results.validate import gate
from dicom_ai_node.results.writer import save, write_results

from ohif.server import OhifServer

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "ohif"

OHIF_VERSION = "3.13.2"
OHIF_DIR = Path(os.environ.get("OHIF_DIR") or REPO / ".ohif")
OHIF_DIST = OHIF_DIR / f"ohif-app-{OHIF_VERSION}" / "dist"
PLAYWRIGHT = OHIF_DIR / "node_modules" / "playwright-core"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
DICOMWEB_PLUGINS = [os.environ.get("ORTHANC_DICOMWEB_PLUGIN", ""), "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                    "/usr/lib/orthanc/libOrthancDicomWeb.so"]
DICOMWEB_PLUGIN = next((p for p in DICOMWEB_PLUGINS if p and Path(p).is_file()), None)
CHECK_TIMEOUT_S = 240  # one browser session; its waits time out after 60 s each

FULL, VIEWER = OutputProfile(), OutputProfile(sr_profile="viewer")
PROBABILITY = Concept("{probability}", "UCUM", "probability")
ANATOMICAL_STRUCTURE = Concept("123037004", "SCT", "Anatomical Structure")
RIGHT_LUNG = Concept("3341006", "SCT", "Right lung")
NODULE = Concept("427359005", "SCT", "Solitary nodule of lung")
VOLUME = Concept("118565006", "SCT", "Volume")
MILLILITER = Concept("mL", "UCUM", "milliliter")
IMAGE_REGION, MEASUREMENT_GROUP, IMAGING_MEASUREMENTS = "111030", "125007", "126010"

pytestmark = pytest.mark.integration


def missing_tools() -> list[str]:
    missing = []
    if ORTHANC_BIN is None:
        missing.append("Orthanc (apt-get install orthanc)")
    if DICOMWEB_PLUGIN is None:
        missing.append("Orthanc's DICOMweb plugin (apt-get install orthanc-dicomweb, or set ORTHANC_DICOMWEB_PLUGIN)")
    if CHROMIUM is None:
        missing.append("chromium (apt-get install chromium, or set CHROMIUM)")
    if NODE is None:
        missing.append("node (apt-get install nodejs)")
    if not (OHIF_DIST / "index.html").is_file():
        missing.append(f"the OHIF {OHIF_VERSION} build in {OHIF_DIST} (run tests/ohif/setup.sh)")
    if not (PLAYWRIGHT / "package.json").is_file():
        missing.append(f"playwright-core in {PLAYWRIGHT} (run tests/ohif/setup.sh)")
    return missing


@pytest.fixture(scope="module")
def ohif_tools() -> None:
    missing = missing_tools()
    if missing:
        message = "OHIF viewer test needs: " + "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI installs them with tests/ohif/setup.sh)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def dicomweb_orthanc(ohif_tools, tmp_path_factory) -> Iterator[Orthanc]:
    """A real Orthanc 1.10 with the DICOMweb plugin at /dicom-web/ (conftest's `orthanc` has no plugins)."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-dicomweb"), "test-pacs-dicomweb",
                           Plugins=[DICOMWEB_PLUGIN],
                           DicomWeb={"Enable": True, "Root": "/dicom-web/", "EnableWado": True})
    try:
        assert "dicom-web" in server.get("/plugins"), f"DICOMweb plugin not loaded: {server.log_path.read_text()[-2000:]}"
        yield server
    finally:
        server.stop()


@dataclass
class Study:
    study_uid: str
    sources: list[pydicom.Dataset]
    seg: pydicom.Dataset
    sr: pydicom.Dataset  # ct_lung's, "full" profile
    viewer_sr: pydicom.Dataset  # ct_lung's, "viewer" profile
    spread_sr: pydicom.Dataset  # "viewer" profile of a synthetic result with groups on three slices
    pm: pydicom.Dataset  # Parametric Map of the synthetic result's heatmap
    series: dict[str, str] = field(default_factory=dict)  # name above (and "sc") -> SeriesInstanceUID


def written(outcome: JobOutcome, kind: str, profile: OutputProfile) -> ResultFile:
    """The one result file of `kind` that a destination with `profile` receives."""
    (found,) = [f for f in outcome.files if f.kind == kind and profile in f.profiles]
    return found


def blob(shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))


def synthetic_result(phantom: ChestPhantom) -> PipelineResult:
    """What ct_lung does not make: groups on three slices (the right lung where it is largest, a ring-shaped
    nodule in it near the top, a detected nodule in the left lung near the bottom) and a heatmap over the right
    lung (the viewer's left), peaking on the middle slice."""
    slices, rows, columns = phantom.hu.shape
    ring_slice, box_slice = slices // 4, slices * 3 // 4
    r, c = (float(v.mean()) for v in np.nonzero(phantom.right_lung[ring_slice]))
    ring = np.zeros(phantom.hu.shape, dtype=bool)
    ring[ring_slice] = (blob((rows, columns), (r, c), (6, 6)) <= 1) & (blob((rows, columns), (r, c), (3, 3)) > 1)
    r, c = (int(v.mean()) for v in np.nonzero(phantom.left_lung[box_slice]))
    heat = np.exp(-blob(phantom.hu.shape, (slices / 2, rows / 2, columns * 0.3),
                        (slices / 4, rows / 8, columns / 10)) / 2)
    ml = phantom.voxel_volume_ml
    return PipelineResult(
        segments=[Segment(1, "Right lung", ANATOMICAL_STRUCTURE, RIGHT_LUNG, phantom.right_lung),
                  Segment(2, "Ring nodule", ANATOMICAL_STRUCTURE, NODULE, ring)],
        measurements=[Measurement(VOLUME, phantom.right_lung_ml, MILLILITER, segment_number=1),
                      Measurement(VOLUME, float(ring.sum()) * ml, MILLILITER, segment_number=2)],
        detections=[Detection("Nodule", NODULE, box_slice, probability=0.7, box=(r - 4, c - 4, r + 4, c + 4))],
        # Zero where faint, so that OHIF's colour map leaves the CT grey there.
        heatmaps=[Heatmap("Synthetic heatmap", np.where(heat < 0.05, 0.0, heat).astype(np.float32), PROBABILITY)],
    )


@pytest.fixture(scope="module")
def study(dicomweb_orthanc, tmp_path_factory) -> Study:
    """The chest phantom and the node's real results for it, all stored in Orthanc: ct_lung's through the
    in-process JobRunner, and the result writers' for a synthetic result (groups on several slices, a heatmap)."""
    folder = tmp_path_factory.mktemp("ohif-study")
    # Inside ct_lung's accepted input (pixel spacing <= 2 mm, slices >= 20), small enough to run in seconds.
    phantom = make_chest_phantom(slices=40, size=128, pixel_spacing_mm=2.0, slice_thickness_mm=5.0, uid_seed="ohif-viewer")
    paths = phantom.write(folder / "source")
    runner = JobRunner(node_config(folder / "node", free_port()), discover([REPO / "pipelines"]), "cpu")
    # Two destinations' profiles, as when the node serves a PACS and an OHIF: one SEG and SC, an SR of each.
    outcome = runner.run(JobSpec(1, "ct_lung", tuple(str(p) for p in paths), profiles=(FULL, VIEWER)))
    files = {"seg": written(outcome, "seg", FULL), "sr": written(outcome, "sr", FULL),
             "viewer_sr": written(outcome, "sr", VIEWER), "sc": written(outcome, "sc", FULL)}
    assert files["seg"] == written(outcome, "seg", VIEWER) and files["sr"] != files["viewer_sr"]
    read = {name: pydicom.dcmread(f.path) for name, f in files.items()}
    assert str(read["seg"].SegmentationType) == "BINARY", "OHIF 3.13 does not display FRACTIONAL SEG"
    # Another version of the pipeline as far as UIDs go: these objects must not replace ct_lung's.
    volume = load_series(paths)
    manifest = runner.manifests["ct_lung"]
    synthetic = manifest.model_copy(update={"version": f"{manifest.version}+synthetic"})
    objects = write_results(volume, synthetic_result(phantom), synthetic, result_context(runner.config),
                            ("seg", "sr", "pmap"), sr_profile="viewer")
    gate(objects, volume.sources, synthetic, folder / "synthetic", sr_profile="viewer")
    spread_seg, spread_sr, pm = objects
    for path in [*paths, *(f.path for f in files.values()), *(save(ds, folder / "synthetic") for ds in objects)]:
        dicomweb_orthanc.upload(Path(path))
    found = Study(str(volume.sources[0].StudyInstanceUID), list(volume.sources), read["seg"], read["sr"],
                  read["viewer_sr"], spread_sr, pm)
    found.series = {name: str(ds.SeriesInstanceUID)
                    for name, ds in (*read.items(), ("spread_sr", spread_sr), ("pm", pm))}
    # Orthanc's DICOMweb answers for every series (what OHIF's study browser asks first).
    qido = dicomweb_orthanc.request("GET", f"/dicom-web/studies/{found.study_uid}/series")
    listed = {s["0020000E"]["Value"][0] for s in qido}
    assert set(found.series.values()) | {str(spread_seg.SeriesInstanceUID)} <= listed
    return found


@pytest.fixture(scope="module")
def ohif(dicomweb_orthanc) -> Iterator[OhifServer]:
    server = OhifServer(OHIF_DIST, "127.0.0.1", dicomweb_orthanc.http_port).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ohif-screenshots")


@pytest.fixture
def show(ohif, study, screenshots):
    """Open OHIF on one series of the study in headless Chromium and run a check (tests/ohif/ohif_check.mjs)."""

    def run(check: str, series_uid: str, name: str, **extra) -> dict:
        query = urllib.parse.urlencode({"StudyInstanceUIDs": study.study_uid, "initialSeriesInstanceUID": series_uid})
        spec = {"check": check, "url": f"{ohif.url}/viewer?{query}", "out": str(screenshots), "name": name,
                "playwright": str(PLAYWRIGHT), "chromium": CHROMIUM, **extra}
        completed = subprocess.run([NODE, str(HERE / "ohif_check.mjs"), json.dumps(spec)], capture_output=True,
                                   text=True, timeout=CHECK_TIMEOUT_S)
        assert completed.returncode == 0, f"ohif_check.mjs failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        return json.loads(completed.stdout)

    return run


def explain(result: dict) -> str:
    keep = {k: result.get(k) for k in ("failures", "pageErrors", "consoleErrors", "httpErrors", "screenshots",
                                       "sliceLabel", "timings")}
    return json.dumps(keep, indent=1)[:6000]


def display_rgb(segment: pydicom.Dataset) -> tuple[int, int, int]:
    lab = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in segment.RecommendedDisplayCIELabValue))
    return tuple(int(v) for v in lab.to_rgb())


def tinted(image: Path, rgb: tuple[int, int, int]) -> np.ndarray:
    """Mask of the pixels whose colour is `rgb` or a blend of it with grey (a segment over a CT image).

    A blend a*rgb + (1-a)*grey differs from its own mean by a*(rgb - mean(rgb)): the same direction of chroma.
    Grey CT pixels have none, so they never count.
    """
    pixels = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)
    chroma = pixels - pixels.mean(axis=2, keepdims=True)
    target = np.asarray(rgb, dtype=np.float32) - float(np.mean(rgb))
    norm = np.linalg.norm(chroma, axis=2)
    cosine = (chroma @ target) / np.maximum(norm * np.linalg.norm(target), 1e-6)
    return (norm > 6.0) & (cosine > 0.97)


def parse_labels(lines: list[str]) -> list[tuple[str, float, str]]:
    """OHIF's SR labels "Volume: 1450.35 mL" -> (name, value, unit)."""
    parsed = []
    for line in lines:
        name, _, rest = line.rpartition(": ")
        value, _, unit = rest.partition(" ")
        try:
            parsed.append((name, float(value), unit))
        except ValueError:
            continue
    return parsed


def code(item: pydicom.Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue


def measurement_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [group for item in sr.ContentSequence if code(item) == IMAGING_MEASUREMENTS
            for group in item.ContentSequence if code(group) == MEASUREMENT_GROUP]


def group_numbers(group: pydicom.Dataset) -> list[tuple[str, float, str]]:
    """(concept meaning, value, UCUM code) of the group's own NUM items (what OHIF labels), in order."""
    return [(item.ConceptNameCodeSequence[0].CodeMeaning, float(item.MeasuredValueSequence[0].NumericValue),
             item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
            for item in group.ContentSequence if item.ValueType == "NUM" and item.get("MeasuredValueSequence")]


def group_image(group: pydicom.Dataset, sources: list[pydicom.Dataset]) -> pydicom.Dataset:
    """The source image a group's Image Region is SELECTED FROM."""
    (region,) = [item for item in group.ContentSequence if code(item) == IMAGE_REGION]
    uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return next(ds for ds in sources if ds.SOPInstanceUID == uid)


def test_seg_opens_as_overlay_with_segment_names_and_colours(study, show):
    seg = study.seg
    segments = {str(s.SegmentLabel): display_rgb(s) for s in seg.SegmentSequence}
    assert list(segments) == ["Right lung", "Left lung"]
    result = show("seg", study.series["seg"], "seg", segments=list(segments))
    assert result["failures"] == [], explain(result)

    # The segmentation panel lists every segment by name, with the colour the SEG recommends.
    rows = {row["label"]: row["color"] for row in result["segmentRows"]}
    assert set(rows) == set(segments), explain(result)
    for label, rgb in segments.items():
        shown = tuple(int(v) for v in rows[label].removeprefix("rgb(").removesuffix(")").split(","))
        assert max(abs(a - b) for a, b in zip(shown, rgb)) <= 2, f"{label}: panel shows {shown}, SEG says {rgb}"

    # Before loading, OHIF previews the SEG over the CT: some segment colour is on the canvas.
    preview = result["previewCanvas"]
    assert sum(int(tinted(Path(preview), rgb).sum()) for rgb in segments.values()) > 200, preview

    # Loaded and centred on a segment: both lungs are drawn in their colours, the right lung on the viewer's
    # left (radiological convention), on a CT slice.
    canvas = Path(result["canvas"])
    width = Image.open(canvas).width
    for label, rgb in segments.items():
        mask = tinted(canvas, rgb)
        assert mask.sum() > 2000, f"{label}: {int(mask.sum())} pixels in {rgb} on {canvas}"
        centre_x = float(np.nonzero(mask)[1].mean())
        assert (centre_x < width / 2) == (label == "Right lung"), f"{label} drawn at x={centre_x:.0f} of {width}"
    grey = np.asarray(Image.open(canvas).convert("L"))
    assert len(np.unique(grey)) > 30, "no CT image under the overlay"


def test_secondary_capture_displays(study, show):
    sc_series = study.series["sc"]
    result = show("image", sc_series, "sc")
    assert result["failures"] == [], explain(result)
    assert result["sliceLabel"].endswith("1/1"), explain(result)
    canvas = Path(result["canvas"])
    pixels = np.asarray(Image.open(canvas).convert("RGB"))
    assert (pixels.max(axis=2) > 16).mean() > 0.2, f"canvas mostly black: {canvas}"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"canvas nearly uniform: {canvas}"
    # The key image is drawn in colour: the segment outlines and legend of the SC are on the canvas.
    for segment in study.seg.SegmentSequence:
        assert tinted(canvas, display_rgb(segment)).sum() > 100, f"{segment.SegmentLabel} colour not on {canvas}"


def test_parametric_map_displays_over_the_ct(study, show):
    """OHIF 3.13 fuses the node's Parametric Map over its CT in a colour map: the heatmap's peak, over the
    right lung, is drawn in the map's top colour on the viewer's left; the left lung stays grey."""
    result = show("image", study.series["pm"], "pm")
    assert result["failures"] == [], explain(result)
    canvas = Path(result["canvas"])
    pixels = np.asarray(Image.open(canvas).convert("RGB"), dtype=int)
    width = pixels.shape[1]
    coloured = np.nonzero(pixels.max(axis=2) - pixels.min(axis=2) > 80)[1]
    assert coloured.size > 2000 and np.mean(coloured > 0.6 * width) < 0.01, canvas
    # The map's top colour (red) is centred where the heatmap peaks: the image fits the canvas, centred.
    rows, columns = study.sources[0].Rows, study.sources[0].Columns
    scale = min(width / columns, pixels.shape[0] / rows)
    peak_rows, peak_columns = np.nonzero(pixels[..., 0] - np.maximum(pixels[..., 1], pixels[..., 2]) > 80)
    assert peak_columns.size > 1000, canvas
    column = (peak_columns.mean() - (width - columns * scale) / 2) / scale
    row = (peak_rows.mean() - (pixels.shape[0] - rows * scale) / 2) / scale
    assert abs(column - (columns * 0.3 + 0.5)) < 2 and abs(row - (rows / 2 + 0.5)) < 2, (row, column, canvas)
    assert len(np.unique(pixels.mean(axis=2).astype(int))) > 30, f"no CT image under the map: {canvas}"


def test_full_sr_crashes_ohif_sr_viewport(study, show):
    """What OHIF 3.13 does with the SR of the "full" profile: crashes, draws nothing.

    Its TID 1411 groups reference SEG segments and its TID 1501 group names only a source image: no group has
    image coordinates, and OHIF's SR viewport reads coords[0].ReferencedSOPSequence of each group and throws.
    When this test fails because OHIF draws the measurements, make it a positive test.
    """
    names = [name for group in measurement_groups(study.sr) for name, _, _ in group_numbers(group)]
    result = show("sr", study.series["sr"], "sr-full", steps=[{"texts": [f"{names[0]}:"]}], timeoutMs=30000)
    assert result["outcome"] == "error boundary", explain(result)
    assert any("ReferencedSOPSequence" in e for e in result["consoleErrors"]), explain(result)
    assert result["svgTexts"] == [] and result["svgShapes"] == 0


def drawn_group_by_group(study, show, sr: pydicom.Dataset, series: str, name: str) -> list[pydicom.Dataset]:
    """Open a viewer-profile SR in OHIF and step through its groups; each must be shown on its own image, with
    its outline and the node's values as labels. Returns the groups' images."""
    groups = measurement_groups(sr)
    images = [group_image(group, study.sources) for group in groups]
    steps = [{"texts": [f"{label}:" for label, _, _ in group_numbers(group)],
              "slice": f"I:{int(image.InstanceNumber)} "} for group, image in zip(groups, images)]
    result = show("sr", series, name, steps=steps)
    assert result["failures"] == [] and result["outcome"] == "drawn", explain(result)
    assert len(result["steps"]) == len(groups), explain(result)
    for number, (group, image, shown) in enumerate(zip(groups, images, result["steps"]), start=1):
        assert shown["sliceLabel"].startswith(f"I:{int(image.InstanceNumber)} "), (number, explain(result))
        on_image = sum(1 for other in images if other.SOPInstanceUID == image.SOPInstanceUID)
        assert shown["svgShapes"] >= on_image, (number, explain(result))
        labels = parse_labels(shown["svgTexts"])
        for label, value, unit in group_numbers(group):
            assert any(n == label and u == unit and abs(v - value) <= 0.006 for n, v, u in labels), \
                f"group {number}: {label} = {value:.2f} {unit} not among {labels}"
    return images


def test_viewer_sr_is_drawn(study, show):
    """ct_lung's "viewer" SR: each lung's outline and the outline of both, with their values, on the key slice
    (both lungs are largest there), which OHIF opens."""
    images = drawn_group_by_group(study, show, study.viewer_sr, study.series["viewer_sr"], "sr-viewer")
    assert len(images) == 3 and len({ds.SOPInstanceUID for ds in images}) == 1  # right, left, both lungs


def test_viewer_sr_steps_to_each_groups_slice(study, show):
    """A viewer SR whose groups lie on three slices: OHIF opens the first group's and its arrows step to each
    other group's slice, where that group is drawn (a segment on its largest slice, a detection on its own)."""
    images = drawn_group_by_group(study, show, study.spread_sr, study.series["spread_sr"], "sr-viewer-slices")
    assert len({ds.SOPInstanceUID for ds in images}) == 3
