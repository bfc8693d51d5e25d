"""The job engine with real peers: late instances, association release, study-level waits, auto-routing,
the disk watermark and retention."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PEER_ENV, free_port, free_ports, require_tool, wait_for
from dicom_ai_node.demo import push_datasets
from dicom_ai_node.jobs.store import JobStore, PlannedJob
from dicom_ai_node.phantom import make_chest_phantom

NODE_AE = "DICOM_AI_NODE"
SENDER = "MODALITY"


def phantom(seed: str, slices: int = 40):
    return make_chest_phantom(slices=slices, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed=seed)


def peers(*extra: str) -> str:
    lines = [f"  - {{ae_title: {SENDER}, host: 127.0.0.1, port: 104}}"] + [f"  - {e}" for e in extra]
    return "peers:\n" + "\n".join(lines) + "\n"


def storescp(port: int, ae_title: str, folder: Path) -> subprocess.Popen:
    require_tool("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["storescp", "-aet", ae_title, "-od", str(folder), str(port)], env=PEER_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.integration
def test_late_instance_reopens_series_and_results_replace(start_node, tmp_path):
    archive_port = free_port()
    node = start_node(peers(f"{{ae_title: ARCHIVE, host: 127.0.0.1, port: {archive_port}}}") + """
completion: {quiet_period_s: 1.0, after_release_s: null}
qc: {no_result_sr: false}  # the refused first run fails, sending nothing (test_no_result_sr.py: the SR)
rules:
  - {name: chest, match: {Modality: CT}, pipelines: [ct_lung], destinations: [ARCHIVE]}
""")
    received = tmp_path / "archive"
    archive = storescp(archive_port, "ARCHIVE", received)
    try:
        study = phantom("late")
        series_uid = str(study.datasets[0].SeriesInstanceUID)
        late = study.datasets[20]  # a slice from the middle: without it the slices are unevenly spaced
        early = [ds for ds in study.datasets if ds is not late]
        assert push_datasets(early, "127.0.0.1", node.port, NODE_AE, SENDER) == len(early)
        [first] = wait_for(lambda: [j for j in node.store.jobs(series_uid) if j.state in ("failed", "done")],
                           timeout=60, what="first run")
        assert first.state == "failed" and "uneven slice spacing" in first.last_error  # QC names the problem
        assert push_datasets([late], "127.0.0.1", node.port, NODE_AE, SENDER) == 1
        wait_for(lambda: len(node.store.jobs(series_uid)) == 2 and node.store.jobs(series_uid)[1].state == "done",
                 timeout=60, what="re-run after the late instance")
        series = node.store.series(series_uid)
        assert series.revision == 2 and series.instances == len(study.datasets)
        wait_for(lambda: len(list(received.iterdir())) == 3, timeout=30, what="results at the archive")
    finally:
        archive.terminate()
        archive.wait(timeout=10)


@pytest.mark.integration
def test_association_release_shortens_the_wait(start_node):
    node = start_node(peers() + """
completion: {quiet_period_s: 300, after_release_s: 0.5}
rules:
  - {name: chest, match: {Modality: CT}, pipelines: [ct_lung], destinations: [outbox]}
""")
    study = phantom("release")
    started = time.time()
    assert push_datasets(study.datasets, "127.0.0.1", node.port, NODE_AE, SENDER) == 40  # one association, released
    series_uid = str(study.datasets[0].SeriesInstanceUID)
    wait_for(lambda: node.store.series(series_uid).state == "routed", timeout=60, what="routing after release")
    assert time.time() - started < 60  # far less than the 300 s quiet period


@pytest.mark.integration
def test_study_rule_waits_for_required_series(start_node):
    node = start_node(peers() + """
completion:
  quiet_period_s: 0.5
  after_release_s: null
  studies:
    - name: two-ct
      requires:
        - {name: chest, match: {Modality: CT, SeriesDescription: {regex: "chest"}}}
        - {name: scout, match: {Modality: CT, SeriesDescription: {regex: "scout"}}}
      timeout_s: 300
rules:
  - {name: chest, match: {Modality: CT, SeriesDescription: {regex: "chest"}}, pipelines: [ct_lung],
     destinations: [outbox], study: two-ct}
""")
    study = phantom("study-rule")
    series_uid = str(study.datasets[0].SeriesInstanceUID)
    assert push_datasets(study.datasets, "127.0.0.1", node.port, NODE_AE, SENDER) == 40
    time.sleep(3)
    assert node.store.series(series_uid).state == "receiving"  # complete, but the study waits for the scout
    assert node.store.jobs(series_uid) == []
    status = subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "status", "--data-dir",
                             str(node.config.node.data_dir), "--config", str(node.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert "scout" in status.stdout, status.stdout  # the operator sees what the series waits for
    scout = make_chest_phantom(slices=3, size=64, pixel_spacing_mm=6.0, slice_thickness_mm=5.0, uid_seed="scout")
    for ds in scout.datasets:  # another series of the same study
        ds.StudyInstanceUID = study.datasets[0].StudyInstanceUID
        ds.SeriesDescription = "Scout (synthetic phantom)"
    assert push_datasets(scout.datasets, "127.0.0.1", node.port, NODE_AE, SENDER) == 3
    wait_for(lambda: [j for j in node.store.jobs(series_uid) if j.state == "done"], timeout=60,
             what="the chest job once the study is whole")


@pytest.mark.integration
def test_forward_rule_auto_routes_filtered_instances(start_node, tmp_path):
    port = free_port()
    node = start_node(peers(f"{{ae_title: ARCHIVE, host: 127.0.0.1, port: {port}}}") + """
completion: {quiet_period_s: 0.5}
rules:
  - name: archive-ct
    match: {Modality: CT}
    action: forward
    forward_to: [ARCHIVE]
    forward_filter: {SOPClassUID: "1.2.840.10008.5.1.4.1.1.2", InstanceNumber: "<=10"}
""")
    received = tmp_path / "archive"
    archive = storescp(port, "ARCHIVE", received)
    try:
        study = phantom("forward")
        assert push_datasets(study.datasets, "127.0.0.1", node.port, NODE_AE, SENDER) == 40
        wait_for(lambda: len(list(received.iterdir())) == 10, timeout=60, what="10 forwarded instances")
        [job] = node.store.jobs(str(study.datasets[0].SeriesInstanceUID))
        wait_for(lambda: node.store.job(job.id).state == "done", timeout=30, what="forward job done")
        assert job.kind == "forward"
        time.sleep(1)
        assert len(list(received.iterdir())) == 10  # the filter held: nothing else was sent
    finally:
        archive.terminate()
        archive.wait(timeout=10)


@pytest.mark.integration
def test_low_disk_refuses_with_out_of_resources(start_node, tmp_path):
    require_tool("storescu")
    node = start_node()
    node.config.node.min_free_disk_mb = 10 ** 12  # more than any disk has: every C-STORE must be refused
    [path] = make_chest_phantom(slices=1, size=32, pixel_spacing_mm=12, slice_thickness_mm=5,
                                uid_seed="disk").write(tmp_path / "source")
    result = subprocess.run(["storescu", "-v", "-aet", SENDER, "-aec", NODE_AE, "127.0.0.1", str(node.port),
                             str(path)], env=PEER_ENV, capture_output=True, text=True, timeout=60)
    assert "Refused: OutOfResources" in result.stdout + result.stderr  # 0xA700
    assert node.store.all_series() == []  # nothing acknowledged, nothing recorded
    assert not any(node.config.spool_dir.rglob("*.dcm"))


def test_retention_never_removes_unfinished_work(tmp_path):
    store = JobStore(tmp_path / "state.sqlite3")
    for uid, pipeline_state in (("1.1", "done"), ("1.2", "sending"), ("1.3", "dead-letter"), ("1.4", None)):
        store.record_instance(sop_uid=uid + ".9", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                              transfer_syntax_uid="1.2.840.10008.1.2.1", series_uid=uid, study_uid="1",
                              calling_ae="X", path="/nowhere", size=1, header={"Modality": "CT"}, now=0)
        series = store.series(uid)
        jobs = [PlannedJob("pipeline", "ct_lung", "r", ["outbox"])] if pipeline_state else []
        assert store.route_series(series, jobs, "test", now=0)
        if pipeline_state:
            job = store.claim_job(60, now=0)
            if pipeline_state == "done":
                store.finish_job(job.id, [], now=0)
            else:
                store.finish_job(job.id, [("9.9." + uid, "1.2", "/r", "outbox")], now=0)
                if pipeline_state == "dead-letter":
                    store.mark_send_failed(store.sends(job.id)[0].id, "down", None, now=0)
    purgeable = {s.series_uid for s in store.purgeable_series(older_than=time.time())}
    assert purgeable == {"1.1", "1.4"}  # done and unrouted; never sending or dead-letter


@pytest.mark.integration
def test_input_outside_the_validated_range_is_not_processed_silently(start_node):
    node = start_node(peers() + """
completion: {quiet_period_s: 0.5}
qc: {no_result_sr: false}  # refusals fail the job, sending nothing (test_no_result_sr.py: with the SR)
rules:
  - {name: any-ct, match: {Modality: CT}, pipelines: [ct_lung], destinations: [outbox]}
""")
    thick = make_chest_phantom(slices=30, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=8.0, uid_seed="qc")
    assert push_datasets(thick.datasets, "127.0.0.1", node.port, NODE_AE, SENDER) == 30
    [job] = wait_for(lambda: [j for j in node.store.jobs(str(thick.datasets[0].SeriesInstanceUID))
                              if j.state == "failed"], timeout=60, what="the job to be refused")
    assert "input outside the validated range of ct_lung" in job.last_error
    assert "slice thickness 8 mm is outside the validated 0.5 to 5 mm" in job.last_error
    assert node.store.sends(job.id) == []


@pytest.mark.integration
def test_each_destination_gets_the_kinds_and_encoding_it_asks_for(start_node, tmp_path):
    import pydicom

    archive_port, viewer_port = free_ports(2)
    node = start_node(peers(
        f"{{ae_title: ARCHIVE, host: 127.0.0.1, port: {archive_port}, accepts: [seg, sr], seg_type: fractional}}",
        f"{{ae_title: VIEWER, host: 127.0.0.1, port: {viewer_port}, accepts: [seg, sc], seg_type: binary}}",
    ) + """
completion: {quiet_period_s: 0.5}
rules:
  - {name: chest, match: {Modality: CT}, pipelines: [ct_lung], destinations: [ARCHIVE, VIEWER]}
""")
    archive = storescp(archive_port, "ARCHIVE", tmp_path / "archive")
    viewer = storescp(viewer_port, "VIEWER", tmp_path / "viewer")
    try:
        study = phantom("profiles")
        assert push_datasets(study.datasets, "127.0.0.1", node.port, NODE_AE, SENDER) == 40
        wait_for(lambda: len(list((tmp_path / "archive").iterdir())) == 2 and
                 len(list((tmp_path / "viewer").iterdir())) == 2, timeout=60, what="results at both")
    finally:
        for process in (archive, viewer):
            process.terminate()
            process.wait(timeout=10)
    at_archive = {ds.Modality: ds for ds in map(pydicom.dcmread, (tmp_path / "archive").iterdir())}
    at_viewer = {ds.Modality: ds for ds in map(pydicom.dcmread, (tmp_path / "viewer").iterdir())}
    assert set(at_archive) == {"SEG", "SR"} and set(at_viewer) == {"SEG", "OT"}
    assert at_archive["SEG"].SegmentationType == "FRACTIONAL" and at_viewer["SEG"].SegmentationType == "BINARY"
    assert at_archive["SEG"].SOPInstanceUID != at_viewer["SEG"].SOPInstanceUID  # two encodings, two UIDs
    referenced = at_archive["SR"].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced_uids = {i.ReferencedSOPInstanceUID for s in referenced for i in s.ReferencedSOPSequence}
    assert at_archive["SEG"].SOPInstanceUID in referenced_uids  # the archive's SR points at its own SEG


@pytest.mark.integration
def test_rule_on_content_labels_routes_a_series_whose_header_is_wrong(start_node):
    node = start_node(peers() + """
completion: {quiet_period_s: 0.5}
rules:
  - {name: chest-by-pixels, match: {Modality: CT, ContentBodyRegion: chest}, pipelines: [ct_lung],
     destinations: [outbox]}
""")
    study = phantom("content")
    for ds in study.datasets:
        ds.BodyPartExamined = "HEAD"  # wrong header: only the pixels say chest
    series_uid = str(study.datasets[0].SeriesInstanceUID)
    assert push_datasets(study.datasets, "127.0.0.1", node.port, NODE_AE, SENDER) == 40
    wait_for(lambda: node.store.series(series_uid).state in ("routed", "unrouted"), timeout=60, what="routing")
    assert node.store.series(series_uid).note == "routed by chest-by-pixels"


@pytest.mark.integration
def test_viewer_destination_gets_an_sr_whose_every_group_has_image_coordinates(start_node, tmp_path):
    import pydicom

    from dicom_ai_node.results.validate import groups_without_coordinates

    port = free_port()
    node = start_node(peers(f"{{ae_title: VIEWER, host: 127.0.0.1, port: {port}, accepts: [seg, sr],"
                            f" seg_type: binary, sr_profile: viewer}}") + """
completion: {quiet_period_s: 0.5}
rules:
  - {name: chest, match: {Modality: CT}, pipelines: [ct_lung], destinations: [VIEWER]}
""")
    viewer = storescp(port, "VIEWER", tmp_path / "viewer")
    try:
        study = phantom("viewer-profile")
        assert push_datasets(study.datasets, "127.0.0.1", node.port, NODE_AE, SENDER) == 40
        wait_for(lambda: len(list((tmp_path / "viewer").iterdir())) == 2, timeout=60, what="SEG + SR at the viewer")
    finally:
        viewer.terminate()
        viewer.wait(timeout=10)
    [sr] = [ds for ds in map(pydicom.dcmread, (tmp_path / "viewer").iterdir()) if ds.Modality == "SR"]
    assert groups_without_coordinates(sr) == []
