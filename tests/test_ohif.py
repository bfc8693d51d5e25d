"""The node's results in OHIF, the viewer most AI teams use: the real OHIF build (@ohif/app 3.13.2) in headless
Chromium (software WebGL) reads them over DICOMweb from a real Orthanc with its DICOMweb plugin.

The node's own code (JobRunner: ct_lung, the result writers and the validation gate) makes SEG, TID 1500 SR
and key-image SC for a chest phantom; they are uploaded to Orthanc with the source CT, and OHIF is opened on
each result series (viewer?StudyInstanceUIDs=...&initialSeriesInstanceUID=...). What OHIF 3.13 does:

  - SEG (BINARY): shown as an overlay on the CT; once loaded, the segmentation panel lists "Right lung" and
    "Left lung" in the colours of RecommendedDisplayCIELabValue, and the overlay is drawn in those colours
    (checked on the canvas pixels, right lung on the viewer's left).
  - SC: displayed (colour pixels on the canvas).
  - SR as the node writes it (TID 1411 volumetric groups referencing SEG segments + a TID 1501 series-level
    group, none with image coordinates): OHIF's SR viewport crashes (TypeError reading
    'ReferencedSOPSequence' of coords[0] in _checkIfCanAddMeasurementsToDisplaySet) and shows nothing. One
    group without SCOORD is enough, even next to planar groups.
  - SR re-laid out as TID 1410 planar ROI groups with an SCOORD POLYLINE on the key slice
    (tests/ohif/viewer_sr.py): the outlines and their measurement labels are drawn.

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

from conftest import ORTHANC_BIN, Orthanc, free_port, node_config
from dicom_ai_node.jobs.executor import JobRunner, JobSpec
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.pipeline import discover

from ohif.server import OhifServer
from ohif.viewer_sr import key_slice_uid, planar_viewer_sr

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

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC Image Storage and the multi-frame SC classes
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}

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
    folder = tmp_path_factory.mktemp("orthanc-dicomweb")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "test-pacs-dicomweb",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "HttpTimeout": 120,
        "UnknownSopClassAccepted": True,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    server = Orthanc(http_port, dicom_port, "ORTHANC", folder / "orthanc.json", folder / "orthanc.log")
    server.start()
    try:
        assert "dicom-web" in server.get("/plugins"), f"DICOMweb plugin not loaded: {server.log_path.read_text()[-2000:]}"
        yield server
    finally:
        server.stop()


@dataclass
class Study:
    study_uid: str
    sources: list[pydicom.Dataset]
    results: dict[str, pydicom.Dataset]  # SOPClassUID -> the node's result object
    planar_sr: pydicom.Dataset
    series: dict[str, str] = field(default_factory=dict)  # "seg", "sr", "sc", "pm", "planar_sr" -> SeriesInstanceUID


@pytest.fixture(scope="module")
def study(dicomweb_orthanc, tmp_path_factory) -> Study:
    """The chest phantom and the node's real results for it (in-process JobRunner), all stored in Orthanc."""
    folder = tmp_path_factory.mktemp("ohif-study")
    # Inside ct_lung's accepted input (pixel spacing <= 2 mm, slices >= 20), small enough to run in seconds.
    phantom = make_chest_phantom(slices=40, size=128, pixel_spacing_mm=2.0, slice_thickness_mm=5.0, uid_seed="ohif-viewer")
    paths = phantom.write(folder / "source")
    runner = JobRunner(node_config(folder / "node", free_port()), discover([REPO / "pipelines"]), "cpu")
    outcome = runner.run(JobSpec(1, "ct_lung", tuple(str(p) for p in paths)))
    results = {f.sop_class_uid: pydicom.dcmread(f.path) for f in outcome.files}
    sources = [pydicom.dcmread(p) for p in paths]
    seg = results[SEGMENTATION_STORAGE]
    assert str(seg.SegmentationType) == "BINARY", "OHIF 3.13 does not display FRACTIONAL SEG"
    [sr] = [ds for uid, ds in results.items() if uid in SR_CLASSES]
    planar = planar_viewer_sr(sr, seg, sources)
    planar_path = folder / "planar-sr.dcm"
    planar.save_as(planar_path, enforce_file_format=True)
    for path in [*paths, *(f.path for f in outcome.files), planar_path]:
        dicomweb_orthanc.upload(Path(path))
    found = Study(str(sources[0].StudyInstanceUID), sources, results, planar)
    for uid, ds in results.items():
        if uid == SEGMENTATION_STORAGE:
            found.series["seg"] = str(ds.SeriesInstanceUID)
        elif uid in SR_CLASSES:
            found.series["sr"] = str(ds.SeriesInstanceUID)
        elif uid == PARAMETRIC_MAP_STORAGE:
            found.series["pm"] = str(ds.SeriesInstanceUID)
        elif uid.startswith(SECONDARY_CAPTURE_PREFIX):
            found.series["sc"] = str(ds.SeriesInstanceUID)
    found.series["planar_sr"] = str(planar.SeriesInstanceUID)
    # Orthanc's DICOMweb answers for every series (what OHIF's study browser asks first).
    qido = dicomweb_orthanc.request("GET", f"/dicom-web/studies/{found.study_uid}/series")
    listed = {s["0020000E"]["Value"][0] for s in qido}
    assert set(found.series.values()) <= listed
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


def sr_numbers(sr: pydicom.Dataset) -> list[tuple[str, float, str]]:
    """(concept meaning, value, UCUM code) of every NUM item of an SR, in document order."""
    found = []

    def walk(items):
        for item in items:
            if item.ValueType == "NUM" and item.get("MeasuredValueSequence"):
                value = item.MeasuredValueSequence[0]
                found.append((item.ConceptNameCodeSequence[0].CodeMeaning, float(value.NumericValue),
                              value.MeasurementUnitsCodeSequence[0].CodeValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_seg_opens_as_overlay_with_segment_names_and_colours(study, show):
    seg = study.results[SEGMENTATION_STORAGE]
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
    seg = study.results[SEGMENTATION_STORAGE]
    for segment in seg.SegmentSequence:
        assert tinted(canvas, display_rgb(segment)).sum() > 100, f"{segment.SegmentLabel} colour not on {canvas}"


def test_parametric_map_displays(study, show):
    if "pm" not in study.series:
        pytest.skip("the node's ct_lung pipeline writes no Parametric Map (heatmaps) to display")
    result = show("image", study.series["pm"], "pm")
    assert result["failures"] == [], explain(result)
    grey = np.asarray(Image.open(result["canvas"]).convert("L"))
    assert len(np.unique(grey)) > 10, result["canvas"]


def test_node_sr_crashes_ohif_sr_viewport(study, show):
    """What OHIF 3.13 does with the SR as the node writes it: crashes, draws nothing.

    Every measurement group of the node's SR lacks image coordinates (TID 1411 groups reference SEG segments,
    the TID 1501 group names only a source image); OHIF's SR viewport reads coords[0].ReferencedSOPSequence of
    each group and throws. When this test fails because OHIF draws the measurements, make it a positive test.
    """
    sr_series = study.series["sr"]
    names = [name for name, _, _ in sr_numbers(study.results[next(u for u in study.results if u in SR_CLASSES)])]
    result = show("sr", sr_series, "sr-node", texts=[f"{names[0]}:"], timeoutMs=30000)
    assert result["outcome"] == "error boundary", explain(result)
    assert any("ReferencedSOPSequence" in e for e in result["consoleErrors"]), explain(result)
    assert result["svgTexts"] == [] and result["svgShapes"] == 0


def test_planar_sr_layout_is_drawn(study, show):
    """The layout a viewer SR profile needs (tests/ohif/viewer_sr.py): planar groups with SCOORD outlines on
    the key slice; OHIF draws each outline with its measurements as labels, with the node's values."""
    expected = sr_numbers(study.planar_sr)
    assert len(expected) >= 2
    result = show("sr", study.series["planar_sr"], "sr-planar", texts=[f"{name}:" for name, _, _ in expected])
    assert result["failures"] == [] and result["outcome"] == "drawn", explain(result)
    shown = parse_labels(result["svgTexts"])
    for name, value, unit in expected:
        assert any(n == name and u == unit and abs(v - value) <= 0.006 for n, v, u in shown), \
            f"{name} = {value:.2f} {unit} not among {shown}"
    assert result["svgShapes"] >= 2, explain(result)
    # OHIF opens the SR on the image its ROIs are on: the key slice the node's SR names.
    node_sr = hd.sr.Comprehensive3DSR.from_dataset(study.results[next(u for u in study.results if u in SR_CLASSES)])
    key = next(ds for ds in study.sources if ds.SOPInstanceUID == key_slice_uid(node_sr))
    assert result["sliceLabel"].startswith(f"I:{int(key.InstanceNumber)} "), explain(result)
