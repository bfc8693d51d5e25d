"""End to end with a real Orthanc: a series outside ct_lung's validated range is not processed silently.

With qc.no_result_sr (the default) Orthanc gets exactly one SR back that says no result was produced and
why, and no SEG; the job shows the refusal with every reason. With the option off (here per rule) nothing is
sent and the job fails with the reasons.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest

from conftest import wait_for
from dicom_ai_node.cli import main as cli
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.pipeline import load_manifest
from dicom_ai_node.results.no_result import no_result_reasons
from dicom_ai_node.results.validate import check_result, dciodvfy_errors

REPO = Path(__file__).resolve().parent.parent
TOO_FEW = "12 slices, fewer than the 20 required"
TOO_THICK = "slice thickness 7 mm is outside the validated 0.5 to 5 mm"


def node_yaml(orthanc, extra: str = "") -> str:
    # Any CT goes to ct_lung (the default rule would not route a 7 mm series at all); results go back to the
    # sender, Orthanc.
    return f"""
peers:
  - {{ae_title: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.dicom_port}}}
rules:
  - {{name: any-ct, match: {{Modality: CT}}, pipelines: [ct_lung]{extra}}}
"""


def push_refused_series(orthanc, node, tmp_path: Path, seed: str):
    """A 12-slice, 7 mm chest CT (twice outside ct_lung's range), pushed from Orthanc to the node."""
    orthanc.add_modality("ainode", "DICOM_AI_NODE", node.port)
    phantom = make_chest_phantom(slices=12, size=64, pixel_spacing_mm=3.0, slice_thickness_mm=7.0, uid_seed=seed)
    sources = phantom.write(tmp_path / "source")
    for path in sources:
        orthanc.upload(path)
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    [orthanc_study] = orthanc.request("POST", "/tools/lookup", study_uid)
    orthanc.request("POST", "/modalities/ainode/store", {"Resources": [orthanc_study["ID"]], "Synchronous": True})
    return phantom, sources, study_uid


def audit_events(node, event: str) -> list[dict]:
    return [r for r in map(json.loads, node.config.audit_path.read_text().splitlines()) if r["event"] == event]


@pytest.mark.integration
def test_refused_series_gets_one_no_result_sr_and_the_job_shows_why(orthanc, start_node, tmp_path, capsys):
    node = start_node(node_yaml(orthanc))
    phantom, sources, study_uid = push_refused_series(orthanc, node, tmp_path, "e2e-no-result")
    series_uid = str(phantom.datasets[0].SeriesInstanceUID)
    [job] = wait_for(lambda: [j for j in node.store.jobs(series_uid) if j.state in ("done", "failed")],
                     timeout=120, what="the refused job to finish sending")
    assert job.state == "done", job.last_error
    assert job.last_error.startswith("refused, no-result SR sent instead: InputRejected: input outside the "
                                     "validated range of ct_lung")
    assert TOO_FEW in job.last_error and TOO_THICK in job.last_error
    [send] = node.store.sends(job.id)
    assert (send.state, send.destination, send.last_status) == ("sent", orthanc.aet, "0x0000")

    instances = orthanc.instances_of_study(study_uid)
    source_uids = {str(ds.SOPInstanceUID) for ds in phantom.datasets}
    results = [i for i in instances if i["MainDicomTags"]["SOPInstanceUID"] not in source_uids]
    assert len(instances) == len(sources) + 1 and len(results) == 1  # exactly one object back: no SEG, no SC
    path = tmp_path / "from-orthanc.dcm"
    path.write_bytes(orthanc.request("GET", f"/instances/{results[0]['ID']}/file"))
    sr = pydicom.dcmread(path)
    assert (sr.Modality, sr.SOPClassUID, sr.SOPInstanceUID) == ("SR", "1.2.840.10008.5.1.4.1.1.88.33", send.sop_uid)
    assert no_result_reasons(sr) == [TOO_FEW, TOO_THICK]
    manifest = load_manifest(REPO / "pipelines" / "ct_lung")
    assert check_result(sr, [pydicom.dcmread(p) for p in sources], manifest=manifest) == []
    assert dciodvfy_errors(path) == []

    [refused] = audit_events(node, "job-refused")
    assert refused["reasons"] == [TOO_FEW, TOO_THICK] and refused["no_result_sr"] == [send.sop_uid]
    assert refused["pipeline_version"] == manifest.version and refused["destinations"] == [orthanc.aet]
    assert [r["status"] for r in audit_events(node, "result-sent")] == ["0x0000"]
    assert not audit_events(node, "job-failed")

    assert cli(["status", "--config", str(node.config_path)]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(f"#{job.id} ")]
    assert " done " in line and "sent 1/1" in line and "refused" in line and TOO_THICK in line


@pytest.mark.integration
def test_with_the_option_off_nothing_is_sent_and_the_job_fails_with_the_reasons(orthanc, start_node, tmp_path):
    node = start_node(node_yaml(orthanc, ", no_result_sr: false"))  # qc.no_result_sr stays on: the rule wins
    phantom, sources, study_uid = push_refused_series(orthanc, node, tmp_path, "e2e-no-result-off")
    series_uid = str(phantom.datasets[0].SeriesInstanceUID)
    [job] = wait_for(lambda: [j for j in node.store.jobs(series_uid) if j.state in ("done", "failed")],
                     timeout=120, what="the refused job to fail")
    assert job.state == "failed"
    assert job.last_error.startswith("InputRejected: input outside the validated range of ct_lung")
    assert TOO_FEW in job.last_error and TOO_THICK in job.last_error
    assert node.store.sends() == []
    assert not node.config.job_results_dir(job.id).exists()
    [refused] = audit_events(node, "job-refused")
    assert refused["reasons"] == [TOO_FEW, TOO_THICK] and refused["no_result_sr"] == []
    time.sleep(2)  # a dispatcher pass or two: still nothing reaches Orthanc
    assert len(orthanc.instances_of_study(study_uid)) == len(sources)
