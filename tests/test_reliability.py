"""Never lose, never duplicate: the node is killed with SIGKILL at every stage while studies stream in,
Orthanc goes down during sends, and sends past their maximum age are dead-lettered and replayed.
Real peers only: the node runs as its own process (`dicom-ai-node serve`), Orthanc is the PACS."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian

from conftest import free_port, wait_for
from dicom_ai_node.phantom import make_chest_phantom

STUDIES = 20
SLICES = 40
NODE_AE = "DICOM_AI_NODE"
PUSHER_AE = "MODALITY"


def unfinished_jobs(db: Path) -> list[tuple]:
    """Jobs of each series' latest revision that are not done: (id, state)."""
    return db_rows(db, "SELECT j.id, j.state FROM jobs j JOIN series s ON s.series_uid = j.series_uid"
                       " WHERE j.series_revision = s.revision AND j.state != 'done'")


def small_study(index: int):
    return make_chest_phantom(slices=SLICES, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0,
                              seed=index, uid_seed=f"reliability-{index}")


class NodeProcess:
    """`dicom-ai-node serve` as a separate process that the test can SIGKILL and start again."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_ai_node.cli", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the node's main process only, as a crash would; its workers must not outlive it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills += 1
        wait_for(lambda: not self._group_alive(), timeout=10, what="worker processes to die with the node")

    def _group_alive(self) -> bool:
        """Any live (not zombie) process left in the node's process group?"""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, pgrp = fields[0], int(fields[2])
            if pgrp == self.process.pid and state != "Z":
                return True
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the node and its worker processes, as a crash would
            self.process.wait()


class Pusher(threading.Thread):
    """A modality/PACS that sends studies and, like any real sender, re-sends whatever was not acknowledged."""

    def __init__(self, port: int, studies, pause_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.pause_s = pause_s  # between studies, as studies trickle in from a scanner
        self.port = port
        self.studies = studies
        self.current = -1  # index of the study being sent
        self.sent_in_current = 0
        self.done = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        for index, study in enumerate(self.studies):
            self.current = index
            pending = list(study.datasets)
            while pending:
                pending = self._push(pending)
                if pending:
                    time.sleep(0.3)
            time.sleep(self.pause_s)
        self.done.set()

    def _push(self, datasets):
        ae = AE(ae_title=PUSHER_AE)
        ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        if not assoc.is_established:
            return datasets
        unacknowledged = []
        self.sent_in_current = 0
        for ds in datasets:
            status = assoc.send_c_store(ds) if assoc.is_established else None
            if status is None or int(getattr(status, "Status", -1)) != 0:
                unacknowledged.append(ds)
            else:
                self.sent_in_current += 1
        if assoc.is_established:
            assoc.release()
        return unacknowledged


def node_yaml(data_dir: Path, port: int, orthanc, extra: str = "") -> str:
    return f"""
node:
  ae_title: {NODE_AE}
  port: {port}
  bind_address: 127.0.0.1
  data_dir: {data_dir}
  min_free_disk_mb: 1
peers:
  - ae_title: {PUSHER_AE}
    host: 127.0.0.1
    port: 104
  - ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
completion:
  quiet_period_s: 1.5
  after_release_s: 0.5
# A series cut short by a kill may be refused by input QC before the re-sent instances re-open it; here it
# fails as before rather than sending a no-result SR, so Orthanc ends with exactly SEG + SR + SC per study.
qc: {{no_result_sr: false}}
rules:
  - name: chest
    match: {{Modality: CT}}
    pipelines: [ct_lung]
    destinations: [{orthanc.aet}]
dispatch:
  initial_delay_s: 0.5
  backoff_factor: 1.5
  max_delay_s: 2
  timeout_s: 5
  breaker_failures: 1000
{extra}
"""


def db_rows(db_path: Path, query: str) -> list[tuple]:
    if not db_path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute(query).fetchall()
    except sqlite3.OperationalError:
        return []  # schema not created yet


def results_per_study(orthanc, studies) -> dict[str, int]:
    """Instances Orthanc holds per study: only the node's results go there (sources go to the node)."""
    return {str(s.datasets[0].StudyInstanceUID): len(orthanc.instances_of_study(str(s.datasets[0].StudyInstanceUID)))
            for s in studies}


@pytest.mark.integration
def test_kill_9_at_every_stage_loses_and_duplicates_nothing(orthanc, tmp_path):
    port = free_port()
    data_dir = tmp_path / "node"
    config = tmp_path / "node.yaml"
    config.write_text(node_yaml(data_dir, port, orthanc))
    db = data_dir / "state.sqlite3"
    studies = [small_study(i) for i in range(STUDIES)]
    node = NodeProcess(config, tmp_path / "node.log")
    node.start()
    pusher = Pusher(port, studies, pause_s=1.0)
    try:
        pusher.start()
        stages = {
            "mid-association": lambda: 0 < pusher.sent_in_current < SLICES - 5 and pusher.current >= 1,
            "after spool": lambda: db_rows(db, "SELECT 1 FROM series WHERE state='receiving' AND instances > 0"),
            "during inference": lambda: db_rows(db, "SELECT 1 FROM jobs WHERE state='running'"),
        }
        for stage, reached in stages.items():
            wait_for(reached, timeout=120, interval=0.02, what=f"stage {stage}")
            node.kill()
            time.sleep(0.2)
            node.start()
        # During send: a frozen PACS (SIGSTOP) holds the node's sends open, so the kill lands mid-send.
        os.kill(orthanc.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: db_rows(db, "SELECT 1 FROM sends WHERE state='queued' AND attempts=0"), timeout=120,
                     interval=0.05, what="stage during send")
            time.sleep(1.0)  # the dispatcher is now inside its association attempt
            node.kill()
        finally:
            os.kill(orthanc.process.pid, signal.SIGCONT)
        node.start()
        assert pusher.done.wait(timeout=300), "the pusher could not deliver every study"
        expected = {str(s.datasets[0].StudyInstanceUID): 3 for s in studies}
        # Both: the results of a series' earlier revision (a run cut short, then re-opened by the re-sent
        # instances) carry the same UIDs, so Orthanc can hold all of them while the latest run still works.
        wait_for(lambda: results_per_study(orthanc, studies) == expected and not unfinished_jobs(db),
                 timeout=300, interval=1.0,
                 what="exactly SEG + SR + SC for every study in Orthanc, and every latest job done")
    finally:
        node.stop()
    assert node.kills == 4
    final = results_per_study(orthanc, studies)
    assert final == expected, f"results per study (expected 3 each): {final}"
    # Every source slice was stored once by the node, and every job finished.
    stored = dict(db_rows(db, "SELECT series_uid, COUNT(*) FROM instances GROUP BY series_uid"))
    assert stored == {str(s.datasets[0].SeriesInstanceUID): SLICES for s in studies}
    # The job of each series' latest revision is done (a run on a series cut short by a kill may have
    # failed input QC before the re-sent instances re-opened it).
    assert not (left := unfinished_jobs(db)), f"jobs of latest revisions not done (id, state): {left}"
    # The modalities the results carry: one SEG, one SR and one SC per study.
    for study in studies:
        modalities = sorted(i["MainDicomTags"].get("SOPInstanceUID", "") and orthanc.get(
            f"/instances/{i['ID']}/simplified-tags")["Modality"] for i in orthanc.instances_of_study(
            str(study.datasets[0].StudyInstanceUID)))
        assert modalities == ["OT", "SEG", "SR"]


@pytest.mark.integration
def test_orthanc_outage_then_dead_letter_and_replay(orthanc, start_node, tmp_path):
    node = start_node(f"""
peers:
  - ae_title: {PUSHER_AE}
    host: 127.0.0.1
    port: 104
  - ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
rules:
  - name: chest
    match: {{Modality: CT}}
    pipelines: [ct_lung]
    destinations: [{orthanc.aet}]
dispatch:
  initial_delay_s: 0.3
  backoff_factor: 2
  max_delay_s: 1
  max_age_s: 8
  breaker_failures: 2
  breaker_open_s: 1
""")
    from dicom_ai_node.demo import push_datasets

    # 1. PACS down for a while during sends: everything is delivered once it is back.
    first = small_study(100)
    orthanc.stop()
    assert push_datasets(first.datasets, "127.0.0.1", node.port, NODE_AE, PUSHER_AE) == SLICES
    wait_for(lambda: any(s.attempts >= 2 for s in node.store.sends()), timeout=60, what="failed attempts")
    breaker = node.store.destination(orthanc.aet)
    assert breaker.consecutive_failures >= 2 and "association with ORTHANC" in breaker.last_error
    orthanc.start()
    wait_for(lambda: results_per_study(orthanc, [first]) == {str(first.datasets[0].StudyInstanceUID): 3},
             timeout=60, what="delivery after the outage")

    # 2. Down for longer than dispatch.max_age_s: the job ends in dead-letter, and replay delivers it.
    second = small_study(101)
    orthanc.stop()
    assert push_datasets(second.datasets, "127.0.0.1", node.port, NODE_AE, PUSHER_AE) == SLICES
    series_uid = str(second.datasets[0].SeriesInstanceUID)
    [job] = wait_for(lambda: [j for j in node.store.jobs(series_uid) if j.state == "dead-letter"], timeout=60,
                     what="dead-letter")
    assert all(s.state == "dead" for s in node.store.sends(job.id))
    orthanc.start()
    time.sleep(1.5)
    assert results_per_study(orthanc, [second]) == {str(second.datasets[0].StudyInstanceUID): 0}  # nothing resent
    replay = subprocess.run(
        [sys.executable, "-m", "dicom_ai_node.cli", "replay", "--study", str(second.datasets[0].StudyInstanceUID),
         "--data-dir", str(node.config.node.data_dir)], capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0 and "queued 3" in replay.stdout, replay.stdout + replay.stderr
    wait_for(lambda: results_per_study(orthanc, [second]) == {str(second.datasets[0].StudyInstanceUID): 3},
             timeout=60, what="delivery after replay")
    # Orthanc holds the results as soon as it answers; the dispatcher records the answers just after.
    wait_for(lambda: node.store.job(job.id).state == "done", timeout=30, what="the replayed job done")
