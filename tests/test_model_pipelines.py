"""The trained model pipelines end to end: Orthanc pushes a chest CT with nodules and a chest radiograph to
the node; the 3D UNet's SEG + SR + key image and the classifier's SR + Grad-CAM heatmap come back, pass the
standards checks and dciodvfy, and carry the "trained on synthetic data" label."""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from conftest import wait_for
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.phantom_xray import make_chest_radiograph
from dicom_ai_node.pipeline import load_manifest
from dicom_ai_node.results.validate import check_result, dciodvfy_errors

REPO = Path(__file__).resolve().parent.parent
DIAMETER, VOLUME, PROBABILITY = "81827009", "118565006", "122157"


def fetch_results(orthanc, study_uid: str, sources: set[str], count: int, folder: Path) -> dict[str, Path]:
    def arrived():
        found = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in orthanc.instances_of_study(study_uid)}
        return found if len(found) >= len(sources) + count else None

    found = wait_for(arrived, timeout=300, what=f"{count} results in Orthanc")
    assert len(found) == len(sources) + count, "a result was sent twice or an extra object arrived"
    results = {}
    folder.mkdir(parents=True, exist_ok=True)
    for sop_uid, info in found.items():
        if sop_uid not in sources:
            path = folder / f"{sop_uid}.dcm"
            path.write_bytes(orthanc.request("GET", f"/instances/{info['ID']}/file"))
            results[pydicom.dcmread(path, stop_before_pixels=True).Modality] = path
    return results


def check_standards(results: dict[str, Path], sources: list[pydicom.Dataset], pipeline: str) -> None:
    manifest = load_manifest(REPO / "pipelines" / pipeline)
    seg = pydicom.dcmread(results["SEG"]) if "SEG" in results else None
    for modality, path in results.items():
        ds = pydicom.dcmread(path)
        assert check_result(ds, sources, seg=seg, manifest=manifest) == [], modality
        assert dciodvfy_errors(path) == [], modality
        assert "synthetic" in str(ds.get("SeriesDescription", "")).lower() or "not for diagnostic use" in \
            str(ds.get("SeriesDescription", "")).lower(), f"{modality}: result not labelled"


def sr_numbers(sr: pydicom.Dataset) -> list[tuple[str, str, float]]:
    """(tracking identifier, concept code, value) of every NUM in the SR, depth first."""
    found = []

    def walk(items, tracking=""):
        for item in items:
            name = item.ConceptNameCodeSequence[0]
            if item.ValueType == "TEXT" and name.CodeMeaning == "Tracking Identifier":
                tracking = str(item.TextValue)
            if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                found.append((tracking, name.CodeValue, float(item.MeasuredValueSequence[0].NumericValue)))
            walk(item.get("ContentSequence", []), tracking)

    walk(sr.ContentSequence)
    return found


@pytest.mark.integration
def test_nodule_unet_and_classifier_results_reach_orthanc(orthanc, start_node, tmp_path):
    node = start_node(f"""
peers:
  - ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
rules:
  - name: nodules
    match: {{Modality: CT, BodyPartExamined: CHEST}}
    pipelines: [ct_nodule_unet]
  - name: radiograph
    match: {{Modality: [DX, CR], BodyPartExamined: CHEST}}
    pipelines: [cr_nodule_classifier]
""")
    orthanc.add_modality("ainode", "DICOM_AI_NODE", node.port)
    phantom = make_chest_phantom(slices=80, size=192, pixel_spacing_mm=2.0, slice_thickness_mm=2.5, seed=31337,
                                 uid_seed="e2e-nodules", nodules=3)
    radiograph = make_chest_radiograph(seed=31337, nodule=True, uid_seed="e2e-radiograph")
    for path in phantom.write(tmp_path / "ct") + radiograph.write(tmp_path / "dx"):
        orthanc.upload(path)
    for ds in (phantom.datasets[0], radiograph.dataset):
        [study] = orthanc.request("POST", "/tools/lookup", str(ds.StudyInstanceUID))
        orthanc.request("POST", "/modalities/ainode/store", {"Resources": [study["ID"]], "Synchronous": True})

    # CT: one segment per nodule, each with volume and diameter near the truth
    ct = fetch_results(orthanc, str(phantom.datasets[0].StudyInstanceUID),
                       {str(d.SOPInstanceUID) for d in phantom.datasets}, 3, tmp_path / "ct-results")
    assert set(ct) == {"SEG", "SR", "OT"}
    check_standards(ct, phantom.datasets, "ct_nodule_unet")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(ct["SEG"]))
    assert len(seg.segment_numbers) == 3
    truth_labels, _ = ndimage.label(phantom.nodules)
    truth_ml = sorted(np.bincount(truth_labels.ravel())[1:] * phantom.voxel_volume_ml)
    volumes = sorted(v for _, code, v in sr_numbers(pydicom.dcmread(ct["SR"])) if code == VOLUME)
    assert volumes == pytest.approx(truth_ml, rel=0.35)
    assert len([v for _, code, v in sr_numbers(pydicom.dcmread(ct["SR"])) if code == DIAMETER]) == 3

    # Radiograph: a probability above one half, and a heatmap secondary capture
    dx = fetch_results(orthanc, str(radiograph.dataset.StudyInstanceUID), {str(radiograph.dataset.SOPInstanceUID)},
                       2, tmp_path / "dx-results")
    assert set(dx) == {"SR", "OT"}
    check_standards(dx, [radiograph.dataset], "cr_nodule_classifier")
    probabilities = [v for _, code, v in sr_numbers(pydicom.dcmread(dx["SR"])) if code == PROBABILITY]
    assert probabilities and probabilities[0] > 0.5
    heatmap = pydicom.dcmread(dx["OT"])
    assert heatmap.PhotometricInterpretation == "RGB" and heatmap.BurnedInAnnotation == "YES"
    assert all(job.state == "done" for job in node.store.jobs())


@pytest.mark.integration
def test_job_that_does_not_fit_in_memory_waits_in_the_queue(start_node, tmp_path):
    """The memory guard: a pipeline declaring more memory than the device has is queued with the reason
    (not failed, attempt not counted), while other jobs of the same series run."""
    import shutil

    greedy = tmp_path / "pipelines" / "ct_lung_greedy"
    shutil.copytree(REPO / "pipelines" / "ct_lung", greedy)
    manifest = (greedy / "pipeline.yaml").read_text().replace("name: ct_lung", "name: ct_lung_greedy")
    (greedy / "pipeline.yaml").write_text(manifest.replace("gpu_memory_mb: 0", "gpu_memory_mb: 0\nhost_memory_mb: 100000000"))
    node = start_node(f"""
pipeline_folders: [{REPO / 'pipelines'}, {tmp_path / 'pipelines'}]
rules:
  - {{name: chest, match: {{Modality: CT}}, pipelines: [ct_lung, ct_lung_greedy], destinations: [outbox]}}
""")
    from dicom_ai_node.demo import push_datasets

    study = make_chest_phantom(slices=40, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed="greedy")
    assert push_datasets(study.datasets, "127.0.0.1", node.port, "DICOM_AI_NODE") == len(study.datasets)
    series_uid = str(study.datasets[0].SeriesInstanceUID)

    def settled():
        jobs = {j.pipeline: j for j in node.store.jobs(series_uid)}
        greedy_job = jobs.get("ct_lung_greedy")
        done = jobs.get("ct_lung") and jobs["ct_lung"].state == "done"
        return jobs if done and greedy_job and "waiting for memory" in greedy_job.last_error else None

    jobs = wait_for(settled, timeout=120, what="ct_lung done and ct_lung_greedy waiting")
    waiting = jobs["ct_lung_greedy"]
    assert waiting.state in ("queued", "running") and waiting.attempts <= 1
    assert "needs 100000000 MB on cpu" in waiting.last_error
