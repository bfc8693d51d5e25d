"""Batch pulls from a PACS (worklist/): identifiers and answers (pure), the store's run records, and real
C-FIND/C-MOVE against Orthanc, whose moved instances go through the node's receive path and pipelines."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from conftest import echoscu, free_port, require_tool, start_orthanc, wait_for
from dicom_ai_node.cli import main
from dicom_ai_node.config import BatchJob, ConfigError, parse_config
from dicom_ai_node.jobs.store import JobStore
from dicom_ai_node.receive.journal import IngestJournal, JournalInUse, recover_other_journals
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.phantom_xray import make_chest_radiograph
from dicom_ai_node.worklist import batch
from dicom_ai_node.worklist.batch import BatchError, BatchRunner
from dicom_ai_node.worklist.query import (
    failed_move_status, move_failure, series_identifier, series_to_pull, studies_found, study_date_range,
    study_identifier, study_summary, worklist_identifier,
)
from dicom_ai_node.worklist.schedule import trigger_of

PEERS = "peers: [{ae_title: PACS, host: 127.0.0.1, port: 4242}]\n"


def job(**fields) -> BatchJob:
    return BatchJob.model_validate({"name": "j", "source": "PACS", **fields})


def answer(**values) -> Dataset:
    """An answer as a PACS's would be read; bytes values stay raw (malformed ones fail only when read)."""
    ds = Dataset()
    for keyword, value in values.items():
        if isinstance(value, bytes):
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, True, True)
        else:
            setattr(ds, keyword, value)
    return ds


# -- identifiers and answers ---------------------------------------------------------------------------

def test_study_date_range_counts_today_as_the_first_day():
    assert study_date_range(1, date(2026, 12, 2)) == "20261202-20261202"
    assert study_date_range(7, date(2026, 3, 2)) == "20260224-20260302"  # across a month end


def test_study_identifier_has_the_jobs_keys_and_the_return_keys():
    ds = study_identifier(job(query={"ModalitiesInStudy": "CT", "StudyDescription": "*CHEST*"}, study_days=2),
                          date(2026, 1, 1))
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.ModalitiesInStudy == "CT" and ds.StudyDescription == "*CHEST*"
    assert ds.StudyDate == "20251231-20260101"
    assert ds.StudyInstanceUID == "" and "NumberOfStudyRelatedInstances" in ds
    assert "PatientName" not in ds and "PatientID" not in ds  # nothing the pull does not need
    assert study_identifier(job(), date(2026, 1, 1)).StudyDate == ""  # no date filter


def test_worklist_identifier_matches_step_keys_in_the_step():
    ds = worklist_identifier(job(worklist={"source": "RIS", "query": {
        "Modality": "CT", "ScheduledStationAETitle": "CT1", "RequestedProcedureDescription": "*CHEST*"}},
        study_days=1), date(2026, 12, 2))
    [step] = ds.ScheduledProcedureStepSequence
    assert (step.Modality, step.ScheduledStationAETitle) == ("CT", "CT1")
    assert step.ScheduledProcedureStepStartDate == "20261202-20261202"
    assert ds.RequestedProcedureDescription == "*CHEST*" and ds.StudyInstanceUID == ""
    assert "PatientName" not in ds and "PatientID" not in ds and "AccessionNumber" not in ds
    bare = worklist_identifier(job(worklist={"source": "RIS"}), date(2026, 12, 2))
    assert bare.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == ""


def test_series_identifier_is_scoped_to_its_study():
    ds = series_identifier(job(series={"Modality": "CT", "SeriesDescription": "*LUNG*"}), "1.2.3")
    assert (ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.Modality, ds.SeriesDescription) == (
        "SERIES", "1.2.3", "CT", "*LUNG*")
    assert ds.SeriesInstanceUID == ""


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the malformed answers are on purpose
def test_studies_found_keeps_answer_order_once_each_and_the_limit():
    answers = [answer(StudyInstanceUID=uid) for uid in ("1.2.3", "1.2.4", "1.2.3", b"not a uid", "1.2.5")]
    answers.append(answer(StudyDate="20260101"))  # no UID at all
    assert studies_found(answers, limit=2) == (["1.2.3", "1.2.4"], 3)
    assert studies_found(answers, limit=10) == (["1.2.3", "1.2.4", "1.2.5"], 3)


def test_a_study_summary_gives_modalities_and_count_and_nothing_else():
    study = answer(StudyInstanceUID="1.2.3", ModalitiesInStudy=["CT", "SEG"], NumberOfStudyRelatedInstances="43",
                   StudyDate="20260101", PatientName="Not^Shown")
    assert study_summary(study) == "CT/SEG, 43 instances"
    step = answer(StudyInstanceUID="1.2.4", ScheduledProcedureStepSequence=[answer(Modality="MR")])
    assert study_summary(step) == "MR"
    assert study_summary(answer(StudyInstanceUID="1.2.5")) == "modality not given"


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_series_to_pull_leaves_derived_objects_unless_asked_for():
    answers = [answer(SeriesInstanceUID="1.1", Modality="CT", NumberOfSeriesRelatedInstances="40"),
               answer(SeriesInstanceUID="1.2", Modality="SEG", NumberOfSeriesRelatedInstances="1"),
               answer(SeriesInstanceUID="1.3", Modality="SR"),
               answer(SeriesInstanceUID="1.1", Modality="CT"),
               answer(SeriesInstanceUID="1.4", Modality="CT", NumberOfSeriesRelatedInstances=b"many")]
    pulled = series_to_pull(job(), answers)
    assert [(s.series_uid, s.modality, s.instances) for s in pulled] == [("1.1", "CT", 40), ("1.4", "CT", None)]
    asked = series_to_pull(job(series={"Modality": "SEG"}), [answers[1]])
    assert [s.series_uid for s in asked] == ["1.2"]


@pytest.mark.parametrize("code, failed, explained", [
    (0x0000, 0, None), (0xB000, 0, None),  # all delivered (warnings: stored all the same)
    (0x0000, 2, 0xB000), (0xB000, 1, 0xB000),  # some not delivered
    (0xA801, 0, 0xA801), (0xC000, 0, 0xC000), (0xFE00, 0, 0xFE00), (0xA702, 5, 0xA702),
])
def test_a_final_move_status_fails_unless_every_instance_came(code, failed, explained):
    assert failed_move_status(code, failed) == explained


def test_move_failures_tell_the_operator_what_to_do():
    assert "add the node to the PACS's DICOM nodes (AE title NODE" in move_failure(0xA801, "NODE")
    assert move_failure(0xA801, "NODE").startswith("C-MOVE status 0xA801: ")
    assert "could not deliver some instances to NODE" in move_failure(0xB000, "NODE")
    assert "could not process" in move_failure(0xC123, "NODE")
    assert "does not define" in move_failure(0x1234, "NODE")
    get = move_failure(0xC000, "NODE", service="C-GET")
    assert get.startswith("C-GET status 0xC000: ") and "does it allow C-GET from NODE" in get
    assert "not stored by the node" in move_failure(0xB000, "NODE", service="C-GET")


# -- configuration and schedules -----------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ("{name: j, source: OTHER}", "source 'OTHER' is not a configured peer"),
    ("{name: j, source: PACS, cron: '61 * * * *'}", "is not a crontab line"),
    ("{name: j, source: PACS, cron: '0 2 * * *', every_minutes: 5}", "cron or every_minutes, not both"),
    ("{name: j, source: PACS, study_days: 1, query: {StudyDate: '20260101'}}", "study_days or a StudyDate"),
    ("{name: j, source: PACS, query: {StudyDescripton: CT}}", "'StudyDescripton' is not a DICOM keyword"),
    ("{name: j, source: PACS, series: {Modality: [CT, MR]}}", "give one matching value as a string (wildcards * and ?, ranges as A-B), not a list"),
    ("{name: j, source: PACS, query: {StudyInstanceUID: 1.2.3}}", "is set by the node"),
    ("{name: j, source: PACS, every_minutes: 0}", "greater than 0"),
    ("{name: j, source: PACS, worklist: {source: RIS}}", "worklist source 'RIS' is not a configured peer"),
    ("{name: j, source: PACS, retrieve: push}", "Input should be 'move' or 'get'"),
    ("{name: j, source: PACS, worklist: {source: PACS}, query: {Modality: CT}}", "give its keys in worklist.query"),
    ("{name: j, source: PACS, study_days: 1, worklist: {source: PACS, query: {ScheduledProcedureStepStartDate: "
     "'20260101'}}}", "study_days or a ScheduledProcedureStepStartDate"),
])
def test_batch_configuration_errors_name_the_key(entry, message):
    with pytest.raises(ConfigError) as err:
        parse_config(PEERS + f"batch:\n  - {entry}\n", "node.yaml")
    text = str(err.value)
    assert message in text
    assert text.startswith("node.yaml:") and ("batch.0" in text or "batch[0] (j)" in text)


def test_two_batch_jobs_may_not_share_a_name():
    with pytest.raises(ConfigError, match="two jobs share one name"):
        parse_config(PEERS + "batch: [{name: j, source: PACS}, {name: j, source: PACS}]\n")


def test_triggers_follow_the_schedule_keys():
    assert isinstance(trigger_of(job(cron="30 1 * * 1-5")), CronTrigger)
    interval = trigger_of(job(every_minutes=0.5))
    assert isinstance(interval, IntervalTrigger) and interval.interval.total_seconds() == 30
    assert trigger_of(job()) is None


def test_batch_list_shows_each_jobs_schedule_and_what_it_pulls(tmp_path, capsys):
    config = tmp_path / "node.yaml"
    config.write_text(f"""node: {{data_dir: {tmp_path / 'var'}}}
{PEERS}batch:
  - {{name: nightly, source: PACS, cron: "30 2 * * *", query: {{ModalitiesInStudy: CT}}, study_days: 1}}
  - {{name: often, source: PACS, every_minutes: 15}}
  - {{name: scheduled, source: PACS, worklist: {{source: PACS, query: {{Modality: CT}}}}, series: {{Modality: CT}}}}
""")
    assert main(["batch", "list", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"nightly: from PACS, cron '30 2 \* \* \*' \(next \d{4}-\d\d-\d\d 02:30 \S+\); "
                        r"matching ModalitiesInStudy='CT'; StudyDate in the last 1 day\(s\); at most 100 studies a run",
                        lines[0])
    assert lines[1] == "  none yet"
    assert lines[2].startswith("often: from PACS, every 15 min while the node runs; matching every study;")
    assert lines[4].startswith("scheduled: from PACS, on command only; studies scheduled in PACS's worklist "
                               "(Modality='CT'), series matching Modality='CT';")
    assert main(["check-config", str(config)]) == 0
    assert ": OK (1 peers, 2 rules, 3 batch jobs, pipelines: " in capsys.readouterr().out


# -- run records ------------------------------------------------------------------------------------------

def test_one_run_of_a_job_at_a_time_and_a_dead_ones_run_is_stopped(tmp_path):
    store = JobStore(tmp_path / "state.sqlite3")
    first = store.start_batch_run("j", "PACS", "schedule", stale_after_s=300, now=1000.0)
    assert first is not None and first.state == "running"
    assert store.start_batch_run("j", "PACS", "command", stale_after_s=300, now=1100.0) is None
    assert store.start_batch_run("other", "PACS", "command", stale_after_s=300, now=1100.0) is not None
    later = store.start_batch_run("j", "PACS", "command", stale_after_s=300, now=1400.0)  # heartbeat 400 s old
    assert later is not None
    dead = store.batch_run(first.id)
    assert dead.state == "stopped" and "process running it stopped" in dead.note


def test_pulled_studies_are_those_done_from_that_source(tmp_path):
    store = JobStore(tmp_path / "state.sqlite3")
    run = store.start_batch_run("j", "PACS", "command", stale_after_s=300)
    store.queue_batch_studies(run.id, ["1.1", "1.2", "1.3"])
    store.update_batch_study(run.id, "1.1", state="done", completed=40)
    store.update_batch_study(run.id, "1.2", state="failed", last_error="C-MOVE status 0xA801")
    assert store.pulled_studies("PACS", ["1.1", "1.2", "1.3", "1.4"]) == {"1.1"}
    assert store.pulled_studies("OTHER", ["1.1"]) == set()
    with pytest.raises(ValueError, match="not a column"):
        store.update_batch_study(run.id, "1.1", remainder=2)


# -- against a real PACS ---------------------------------------------------------------------------------

@pytest.fixture
def open_orthanc(tmp_path):
    """Start an Orthanc with settings of the test's own (e.g. answering any AE); stopped at teardown."""
    started = []

    def start(**settings):
        started.append(start_orthanc(tmp_path / f"pacs-{len(started)}", "open-pacs", **settings))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def node_with_batch(start_node, orthanc, extra: str = ""):
    return start_node(f"""
peers:
  - ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
batch:
  - name: chest-ct
    source: {orthanc.aet}
    query: {{ModalitiesInStudy: CT}}
{extra}""")


def upload(orthanc, phantom, folder) -> list:
    paths = phantom.write(folder)
    for path in paths:
        orthanc.upload(path)
    return paths


@pytest.mark.integration
def test_batch_pulls_matching_studies_once_and_their_results_go_back(orthanc, start_node, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(batch, "REPORT_EVERY_S", 0.0)  # a line at every pending C-MOVE response
    node = node_with_batch(start_node, orthanc)
    orthanc.add_modality("ainode", node.config.node.ae_title, node.port)
    ct = make_chest_phantom(slices=40, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed="batch-ct")
    sources = upload(orthanc, ct, tmp_path / "ct")
    upload(orthanc, make_chest_radiograph(uid_seed="batch-xr"), tmp_path / "xr")  # ModalitiesInStudy DX
    study_uid = str(ct.datasets[0].StudyInstanceUID)

    assert main(["batch", "run", "chest-ct", "--dry-run", "--config", str(node.config_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "dry run, nothing pulled: 1 studies matched; a run would pull 1",
        f"  {study_uid}  would pull  (CT, {len(sources)} instances)"]
    assert node.store.batch_runs() == [] and node.store.all_series() == []

    assert main(["batch", "run", "chest-ct", "--config", str(node.config_path)]) == 0
    out = capsys.readouterr().out
    assert "1 studies matched; pulling 1" in out
    assert f"study {study_uid} (1/1): series 1/1 CT, {len(sources)} instances delivered, 0 failed" in out
    assert re.search(rf"study {re.escape(study_uid)} \(1/1\): series 1/1 CT: \d+ delivered, \d+ to go", out), out
    [run] = node.store.batch_runs()
    assert (run.state, run.trigger, run.found) == ("done", "command", 1)
    [study] = node.store.batch_studies(run.id)
    assert (study.study_uid, study.state, study.series_done, study.completed, study.failed) == (
        study_uid, "done", 1, len(sources), 0)
    [series] = [s for s in node.store.all_series() if s.study_uid == study_uid]
    assert series.instances == len(sources) and series.calling_ae == orthanc.aet

    def results_in_orthanc():  # SEG + SR + SC of ct_lung, sent back to the PACS the study came from
        found = orthanc.instances_of_study(study_uid)
        return found if len(found) >= len(sources) + 3 else None

    wait_for(results_in_orthanc, timeout=180, what="the pulled study's results in Orthanc")
    wait_for(lambda: all(j.state == "done" for j in node.store.jobs()), timeout=60, what="the job done")

    # The next run finds the study again (with its results now), and leaves it: pulled before.
    assert main(["batch", "run", "chest-ct", "--config", str(node.config_path)]) == 0
    assert "1 studies matched, 1 pulled before; pulling 0" in capsys.readouterr().out
    assert main(["batch", "run", "chest-ct", "--dry-run", "--config", str(node.config_path)]) == 0
    assert f"  {study_uid}  pulled before, left  (CT/" in capsys.readouterr().out  # and now SEG, SR, OT too
    assert [s.revision for s in node.store.all_series() if s.study_uid == study_uid] == [series.revision]
    assert len(orthanc.instances_of_study(study_uid)) == len(sources) + 3  # nothing sent twice
    assert len(node.store.jobs()) == 1

    assert main(["status", "--config", str(node.config_path)]) == 0
    status = capsys.readouterr().out
    assert "BATCH RUNS" in status and f"study {study_uid}  done     series 1/1, {len(sources)} instances" in status
    assert "0 failed; in the node: 1 series routed; jobs 1 done" in status
    assert main(["batch", "list", "--config", str(node.config_path)]) == 0
    assert "chest-ct: from ORTHANC, on command only; matching ModalitiesInStudy='CT'" in capsys.readouterr().out


@pytest.mark.integration
def test_a_pacs_that_does_not_know_the_node_fails_the_study_with_what_to_fix(start_node, tmp_path, open_orthanc):
    # Orthanc answers C-FIND and C-MOVE from any AE here, but has no address for the move destination.
    orthanc = open_orthanc(DicomAlwaysAllowFind=True, DicomAlwaysAllowMove=True)
    node = node_with_batch(start_node, orthanc)
    ct = make_chest_phantom(slices=20, size=64, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed="batch-unknown")
    upload(orthanc, ct, tmp_path / "ct")
    runner = BatchRunner(node.config, node.store, node.audit)
    run = runner.run("chest-ct")
    assert run.state == "failed"
    [study] = node.store.batch_studies(run.id)
    assert study.state == "failed" and "C-MOVE status 0x" in study.last_error, study.last_error
    assert "DICOM_AI_NODE" in study.last_error and "first: series" in run.note
    assert node.store.all_series() == []

    # Once the PACS knows the node, the next run pulls the study that failed.
    orthanc.add_modality("ainode", node.config.node.ae_title, node.port)
    again = runner.run("chest-ct")
    assert again.state == "done", again.note
    assert [s.state for s in node.store.batch_studies(again.id)] == ["done"]


@pytest.mark.integration
def test_a_run_stopped_with_the_node_leaves_its_studies_to_the_next(orthanc, start_node, tmp_path):
    node = node_with_batch(start_node, orthanc)
    orthanc.add_modality("ainode", node.config.node.ae_title, node.port)
    ct = make_chest_phantom(slices=20, size=64, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed="batch-stop")
    upload(orthanc, ct, tmp_path / "ct")
    runner = BatchRunner(node.config, node.store, node.audit)
    stopping = threading.Event()
    stopping.set()  # the node began to stop while the run queried
    run = runner.run("chest-ct", stop=stopping)
    assert run.state == "stopped" and "the rest is pulled by the next run" in run.note
    assert [s.state for s in node.store.batch_studies(run.id)] == ["queued"]
    assert runner.run("chest-ct").state == "done"
    runner.abort_active()  # nothing running: nothing to abort


@pytest.mark.integration
def test_a_pacs_that_refuses_queries_from_the_node_is_named(orthanc, start_node):
    node = node_with_batch(start_node, orthanc)  # this Orthanc answers C-FIND only from AEs it knows
    run = BatchRunner(node.config, node.store, node.audit).run("chest-ct")
    assert run.state == "failed"
    assert run.note.startswith("C-FIND at STUDY level from ORTHANC at 127.0.0.1:"), run.note


@pytest.mark.integration
def test_a_pacs_that_is_down_fails_the_run_and_the_node_goes_on(orthanc, start_node):
    node = node_with_batch(start_node, orthanc)
    orthanc.stop()
    run = BatchRunner(node.config, node.store, node.audit).run("chest-ct")
    assert run.state == "failed"
    assert run.note.startswith(f"association with ORTHANC at 127.0.0.1:{orthanc.dicom_port}: ")
    with pytest.raises(BatchError, match="no batch job named 'nope' \\(batch jobs: chest-ct\\)"):
        BatchRunner(node.config, node.store, node.audit).run("nope")


@pytest.mark.integration
def test_a_scheduled_job_runs_inside_the_node(orthanc, start_node):
    node = node_with_batch(start_node, orthanc, "    every_minutes: 0.02\n")  # every 1.2 s
    orthanc.add_modality("ainode", node.config.node.ae_title, node.port)  # so that it answers the node's C-FIND
    runs = wait_for(lambda: [r for r in node.store.batch_runs() if r.state == "done"], timeout=30,
                    what="a scheduled batch run")
    assert runs[0].trigger == "schedule" and runs[0].note.startswith("0 studies matched")


@pytest.fixture
def worklist_scp(tmp_path):
    """DCMTK's Modality Worklist SCP (wlmscpfs) answering as WORKLIST from the .wl files in a folder."""
    root = tmp_path / "worklists"
    folder = root / "WORKLIST"
    folder.mkdir(parents=True)
    (folder / "lockfile").touch()  # wlmscpfs serves a called AE title's folder only with this file in it
    port = free_port()
    with open(tmp_path / "wlmscpfs.log", "wb") as log:
        process = subprocess.Popen([require_tool("wlmscpfs"), "-dfr", "-dfp", str(root), str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: echoscu(port, "DICOM_AI_NODE", "WORKLIST").returncode == 0, timeout=20,
                 what="wlmscpfs answering")
        yield folder, port
    finally:
        process.terminate()
        process.wait(timeout=10)


def scheduled_step(folder: Path, name: str, study_uid: str, modality: str, station: str, day: str) -> None:
    """One worklist entry as a RIS would schedule it: a requested procedure with one procedure step."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Worklist^Test"
    ds.PatientID = f"WL-{name}"
    ds.AccessionNumber = f"ACC{name}"
    ds.StudyInstanceUID = study_uid
    ds.RequestedProcedureID = f"RP{name}"
    ds.RequestedProcedureDescription = f"{modality} scheduled"
    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = day
    step.ScheduledProcedureStepStartTime = "080000"
    step.ScheduledProcedureStepID = f"SPS{name}"
    step.ScheduledProcedureStepDescription = f"{modality} scheduled"
    ds.ScheduledProcedureStepSequence = [step]
    ds.save_as(folder / f"{name}.wl", implicit_vr=False, little_endian=True, enforce_file_format=False)


@pytest.mark.integration
def test_a_worklist_job_pulls_scheduled_studies_once_they_are_in_the_pacs(orthanc, start_node, tmp_path,
                                                                          worklist_scp, capsys, caplog):
    caplog.set_level("DEBUG")
    folder, port = worklist_scp
    first = make_chest_phantom(slices=20, size=64, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed="wl-1")
    later = make_chest_phantom(slices=20, size=64, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed="wl-2")
    first_uid, later_uid = (str(p.datasets[0].StudyInstanceUID) for p in (first, later))
    today = date.today().strftime("%Y%m%d")
    scheduled_step(folder, "1", first_uid, "CT", "CT1", today)
    scheduled_step(folder, "2", later_uid, "CT", "CT1", today)  # scheduled, not acquired yet
    scheduled_step(folder, "3", "1.2.826.0.1.3680043.8.498.7", "MR", "MR1", today)  # another scanner's
    upload(orthanc, first, tmp_path / "first")
    node = start_node(f"""
peers:
  - {{ae_title: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.dicom_port}}}
  - {{ae_title: WORKLIST, host: 127.0.0.1, port: {port}}}
batch:
  - name: scheduled-ct
    source: {orthanc.aet}
    worklist: {{source: WORKLIST, query: {{Modality: CT, ScheduledStationAETitle: CT1}}}}
    study_days: 1
""")
    orthanc.add_modality("ainode", node.config.node.ae_title, node.port)
    config = ["--config", str(node.config_path)]

    assert main(["batch", "run", "scheduled-ct", *config]) == 0
    out = capsys.readouterr().out
    assert "2 scheduled studies matched; pulling 2" in out
    assert re.search(rf"study {re.escape(later_uid)} \([12]/2\): not in ORTHANC yet", out), out  # worklist order
    [run] = node.store.batch_runs()
    assert "1 of 2 pulled (20 instances), 1 not in ORTHANC yet" in run.note
    assert {s.study_uid: s.state for s in node.store.batch_studies(run.id)} == {first_uid: "done", later_uid: "waiting"}
    assert {s.study_uid for s in node.store.all_series()} == {first_uid}

    upload(orthanc, later, tmp_path / "later")  # acquired and archived since
    assert main(["batch", "run", "scheduled-ct", *config]) == 0
    out += capsys.readouterr().out
    assert "2 scheduled studies matched, 1 pulled before; pulling 1" in out
    assert {s.study_uid for s in node.store.all_series()} == {first_uid, later_uid}

    # The worklist held names, IDs and accession numbers; none of them reaches what the node writes.
    assert main(["status", *config]) == 0
    written = out + capsys.readouterr().out + caplog.text + node.config.audit_path.read_text()
    written += "".join(str(tuple(r)) for r in node.store._db().execute("SELECT * FROM batch_runs"))
    written += "".join(str(tuple(r)) for r in node.store._db().execute("SELECT * FROM batch_studies"))
    for value in ("Worklist^Test", "WL-1", "WL-2", "ACC1", "ACC2"):
        assert value not in written


# -- C-GET: the instances come back on the node's own association -----------------------------------------

@pytest.mark.integration
def test_a_get_job_needs_no_address_of_the_node_at_the_pacs(start_node, tmp_path, capsys, open_orthanc):
    # Orthanc answers C-FIND and C-GET from any AE and knows nothing of the node: no modality entry.
    orthanc = open_orthanc(DicomAlwaysAllowFind=True, DicomAlwaysAllowGet=True)
    node = node_with_batch(start_node, orthanc, "    retrieve: get\n")
    ct = make_chest_phantom(slices=20, size=64, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed="batch-get")
    sources = upload(orthanc, ct, tmp_path / "ct")
    study_uid = str(ct.datasets[0].StudyInstanceUID)
    assert main(["batch", "run", "chest-ct", "--config", str(node.config_path)]) == 0
    out = capsys.readouterr().out
    assert f"study {study_uid} (1/1): series 1/1 CT, {len(sources)} instances delivered, 0 failed" in out
    [series] = node.store.all_series()
    assert (series.study_uid, series.instances, series.calling_ae) == (study_uid, len(sources), orthanc.aet)
    for row in node.store.instances(series.series_uid):  # in the spool, whole, as the PACS sent them
        assert pydicom.dcmread(row.path).SOPInstanceUID == row.sop_uid
    assert [p.name for p in node.config.journal_dir.iterdir()] == ["0"]  # the pull's journal is gone
    # Processed like a pushed series, and the results go back to the PACS it came from.
    wait_for(lambda: len(orthanc.instances_of_study(study_uid)) >= len(sources) + 3, timeout=180,
             what="the results of the C-GET pulled series in Orthanc")


def test_a_journal_has_one_owner_and_the_sweep_leaves_it_alone(tmp_path):
    store, root, spool_dir = JobStore(tmp_path / "state.sqlite3"), tmp_path / "journal", tmp_path / "spool"
    owner = IngestJournal(root / "get-1", spool_dir, store)
    owner.recover()
    with pytest.raises(JournalInUse, match="in use by a running process"):
        IngestJournal(root / "get-1", spool_dir, store).recover()
    assert recover_other_journals(root, spool_dir, store, keep=set()) == 0
    assert (root / "get-1").is_dir()
    owner.close()
    assert recover_other_journals(root, spool_dir, store, keep=set()) == 0
    assert not (root / "get-1").exists()  # nobody's, and empty: removed


@pytest.mark.integration
def test_the_node_places_what_a_pull_that_died_had_acknowledged(start_node, tmp_path):
    node = start_node()
    config = node.config
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from dicom_ai_node.jobs.store import JobStore
from dicom_ai_node.receive.journal import IngestJournal, JournalInUse, recover_other_journals
from dicom_ai_node.receive.journal import IngestJournal
from test_ingest import _ct_series, _received
spool = Path({str(config.spool_dir)!r})
journal = IngestJournal(Path({str(config.journal_dir)!r}) / "get-dead", spool, JobStore(Path({str(config.db_path)!r})))
journal.recover()
journal._closed = False  # appends, but never places: the pull dies after the PACS got its answers
for ds in _ct_series(2):
    journal.append(*_received(ds, spool))
print("acknowledged", flush=True)
sys.stdin.readline()
os._exit(1)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "acknowledged"
        assert node.replay_abandoned_journals() == 0  # alive: its own to place
        assert (config.journal_dir / "get-dead").is_dir() and node.store.all_series() == []
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    folder = config.journal_dir / "get-dead"
    assert node.replay_abandoned_journals() == 0  # just made: perhaps a pull's about to lock it; next sweep
    os.utime(folder, (time.time() - 60, time.time() - 60))  # the pull died a minute ago
    assert node.replay_abandoned_journals() == 2
    [series] = node.store.all_series()
    assert series.instances == 2 and not (config.journal_dir / "get-dead").exists()
