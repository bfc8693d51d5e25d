"""The walking skeleton end to end: a real Orthanc pushes a chest-CT phantom to the node, the node runs
ct_lung and sends SEG + TID 1500 SR + key-image SC back to Orthanc, and every object meets the standards."""
from __future__ import annotations

import io
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
import pytest

from conftest import wait_for
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.results.validate import check_result, dciodvfy_errors
from dicom_ai_node.pipeline import load_manifest

REPO = Path(__file__).resolve().parent.parent
VOLUME = "118565006"
LAA950 = "LAA950"


def sr_measurements(sr: pydicom.Dataset) -> dict[tuple[str, str], float]:
    """(tracking identifier, concept code) -> value for every numeric measurement in a TID 1500 SR."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    values = {}
    for group in report.content.get_volumetric_roi_measurement_groups() + report.content.get_planar_roi_measurement_groups() \
            + report.content.get_image_measurement_groups():
        for measurement in group.get_measurements():
            values[(group.tracking_identifier, measurement.name.value)] = float(measurement.value)
    return values


@pytest.mark.integration
def test_orthanc_pushes_chest_ct_and_gets_validated_results(orthanc, start_node, tmp_path):
    node = start_node(f"""
peers:
  - ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
""")
    orthanc.add_modality("ainode", "DICOM_AI_NODE", node.port)
    phantom = make_chest_phantom(slices=120, size=256, uid_seed="e2e-orthanc")
    sources = phantom.write(tmp_path / "source")
    for path in sources:
        orthanc.upload(path)
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    [orthanc_study] = orthanc.request("POST", "/tools/lookup", study_uid)
    orthanc.request("POST", "/modalities/ainode/store", {"Resources": [orthanc_study["ID"]], "Synchronous": True})

    def results_in_orthanc():
        modalities = {i["MainDicomTags"].get("SOPInstanceUID"): i for i in orthanc.instances_of_study(study_uid)}
        return modalities if len(modalities) >= len(sources) + 3 else None

    instances = wait_for(results_in_orthanc, timeout=240, what="SEG + SR + SC in Orthanc")
    assert len(instances) == len(sources) + 3  # exactly one of each result, no duplicates
    source_uids = {str(ds.SOPInstanceUID) for ds in phantom.datasets}
    results = {}
    orthanc_ids = {}
    for sop_uid, info in instances.items():
        if sop_uid in source_uids:
            continue
        data = orthanc.request("GET", f"/instances/{info['ID']}/file")
        path = tmp_path / "from-orthanc" / f"{sop_uid}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        results[pydicom.dcmread(path).Modality] = path
        orthanc_ids[pydicom.dcmread(path).Modality] = info["ID"]
    assert set(results) == {"SEG", "SR", "OT"} or set(results) == {"SEG", "SR", "SC"} or len(results) == 3

    source_datasets = [pydicom.dcmread(p) for p in sources]
    manifest = load_manifest(REPO / "pipelines" / "ct_lung")
    seg = pydicom.dcmread(results["SEG"])
    for modality, path in results.items():
        ds = pydicom.dcmread(path)
        problems = check_result(ds, source_datasets, seg=seg, manifest=manifest)
        assert problems == [], f"{modality}: {problems}"
        errors = dciodvfy_errors(path)
        assert errors is not None, "dciodvfy must be installed for this test"
        assert errors == [], f"{modality}: dciodvfy -new: {errors}"

    # Orthanc renders the key image: its preview is a real picture, with the coloured outlines in it.
    preview = Image.open(io.BytesIO(orthanc.request("GET", f"/instances/{orthanc_ids['OT']}/preview")))
    pixels = np.asarray(preview.convert("RGB")).astype(int)
    assert pixels.std() > 10
    assert (np.abs(pixels[..., 0] - pixels[..., 1]) > 40).any()  # colour, not only grey

    segmentation = hd.seg.Segmentation.from_dataset(seg)
    labels = {segmentation.get_segment_description(n).segment_label for n in segmentation.segment_numbers}
    assert labels == {"Right lung", "Left lung"}

    values = sr_measurements(pydicom.dcmread(results["SR"]))
    right = next(v for (tid, code), v in values.items() if code == VOLUME and "right" in tid.lower())
    left = next(v for (tid, code), v in values.items() if code == VOLUME and "left" in tid.lower())
    assert right == pytest.approx(phantom.right_lung_ml, rel=0.03)
    assert left == pytest.approx(phantom.left_lung_ml, rel=0.03)
    laa_both = [v for (tid, code), v in values.items() if code == LAA950 and "right" not in tid.lower()
                and "left" not in tid.lower()]
    assert laa_both and abs(laa_both[0] - phantom.laa950_percent) <= 1.0

    # Every result was stored by Orthanc (status 0x0000) exactly once, and the node recorded the sends.
    sends = node.store.sends()
    assert len(sends) == 3 and all(s.state == "sent" for s in sends)
    assert all(s.destination == orthanc.aet for s in sends)
    audit = [json.loads(line) for line in node.config.audit_path.read_text().splitlines()]
    statuses = [r["status"] for r in audit if r["event"] == "result-sent"]
    assert statuses == ["0x0000"] * 3
