"""Several receive processes behind one port (`node.receive_processes`): concurrent DCMTK senders, the
association limit across processes, a receive process killed mid-stream, and a node that goes back to
one process replaying the journals of the others."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification

from conftest import PEER_ENV, REPO, echoscu, free_port, journal_died, node_config, require_tool, wait_for
from dicom_ai_node.audit import AuditLog
from dicom_ai_node.jobs.store import JobStore, ReceivedInstance
from dicom_ai_node.receive.journal import IngestJournal
from dicom_ai_node.receive.scp import Receiver
from dicom_ai_node.spool import IncomingInstance

NODE_AE = "DICOM_AI_NODE"
POOL_YAML = "rules: []\n"


def _series(folder: Path, count: int) -> tuple[str, list[Path]]:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, generate_uid(), i + 1
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return series, paths


def _storescu(port: int, paths: list[Path]) -> subprocess.Popen:
    require_tool("storescu")
    return subprocess.Popen(["storescu", "-aet", "PACS", "-aec", NODE_AE, "127.0.0.1", str(port), *map(str, paths)],
                            env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _receive_processes(node) -> list[int]:
    return [p.process.pid for p in node.receiver._processes]  # noqa: SLF001


def _node(start_node, extra: str = ""):
    return start_node(POOL_YAML, node_options="receive_processes: 2\n" + extra)


def test_concurrent_senders_are_spread_over_the_receive_processes(start_node, tmp_path):
    node = _node(start_node)
    assert len(set(_receive_processes(node))) == 2 and os.getpid() not in _receive_processes(node)
    sends = [_series(tmp_path / f"s{i}", 30) for i in range(4)]
    senders = [_storescu(node.port, paths) for _, paths in sends]
    for sender in senders:
        assert sender.wait(timeout=120) == 0, sender.stderr.read()
    for series, paths in sends:
        assert node.store.series(series).instances == len(paths)  # recorded before the release was answered
        for row in node.store.instances(series):
            assert pydicom.dcmread(row.path).SeriesInstanceUID == series
    # Both processes received: each has a journal with a checkpoint or placed rows behind it.
    journals = sorted(p.name for p in node.config.journal_dir.iterdir())
    assert journals == ["0", "1"]
    wait_for(lambda: all(node.store.journal_checkpoint(name) > 0 for name in journals), timeout=30,
             what="a checkpoint in each receive process's journal")


def test_association_limit_holds_across_receive_processes(start_node):
    node = _node(start_node, "max_associations: 1")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert first.is_established
    try:
        second = echoscu(node.port, "PACS")
        # the second process is idle, but the node holds one association already
        assert second.returncode != 0
        assert "Association Rejected" in second.stderr and "Local Limit Exceeded" in second.stderr, second.stderr
    finally:
        first.release()
    third = wait_for(lambda: (a := ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)).is_established and a,
                     timeout=10, what="an association once the first was released")
    assert third.send_c_echo().Status == 0
    third.release()


def test_a_killed_receive_process_is_replaced_and_loses_nothing(start_node, tmp_path):
    node = _node(start_node)
    series, paths = _series(tmp_path / "s", 40)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        for path in paths[:5]:  # acknowledged, then the process that took them dies mid-association
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        victim = next(p for p in node.receiver._processes if p.active)  # noqa: SLF001
        os.kill(victim.process.pid, signal.SIGKILL)
        wait_for(lambda: not assoc.is_established, timeout=30, what="the sender to see the association die")
    finally:
        assoc.abort()
    wait_for(lambda: all(p.process.is_alive() for p in node.receiver._processes)  # noqa: SLF001
             and victim.process.pid not in _receive_processes(node), timeout=60, what="a new receive process")
    # The five acknowledged instances are there (placed by the dead process, or replayed from its journal).
    wait_for(lambda: (row := node.store.series(series)) is not None and row.instances == 5, timeout=30,
             what="the acknowledged instances")
    # The whole series sent again, as a PACS does after a failed push: nothing is counted twice.
    again = _storescu(node.port, paths)
    assert again.wait(timeout=120) == 0, again.stderr.read()
    assert node.store.series(series).instances == len(paths)
    assert len(node.store.instances(series)) == len(paths)


def test_one_receiver_replays_the_journals_of_former_receive_processes(tmp_path):
    """A node that ran two receive processes, died, and starts again with one: what process 1 had
    acknowledged and not placed is replayed by the single receiver, and its journal removed."""
    config = node_config(tmp_path / "node", free_port())
    store = JobStore(config.db_path)
    former = IngestJournal(config.journal_dir / "1", config.spool_dir, store)
    former.recover()
    former._closed = False  # noqa: SLF001 - it accepts appends; its placer never runs: the process "died"
    series, paths = _series(tmp_path / "s", 3)
    for path in paths:
        ds = pydicom.dcmread(path)
        incoming = IncomingInstance(config.spool_dir, CTImageStorage, str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
        incoming.write(encode(ds, False, True))
        target, header = incoming.check()
        former.append(ReceivedInstance(
            sop_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid, series_uid=header.series_uid,
            study_uid=header.study_uid, calling_ae="PACS", path=str(target),
            size=incoming.meta_size + incoming.dataset_size, header=header.routing_header), incoming.parts)
    journal_died(former)
    receiver = Receiver(config, store, AuditLog(config.audit_path))
    receiver.start()
    try:
        assert store.series(series).instances == 3
        assert sorted(p.name for p in config.journal_dir.iterdir()) == ["0"]
        for row in store.instances(series):
            assert pydicom.dcmread(row.path).SOPInstanceUID == row.sop_uid
    finally:
        receiver.stop()


def test_node_stops_its_receive_processes(start_node):
    node = _node(start_node)
    pids = _receive_processes(node)
    done = threading.Event()
    threading.Thread(target=lambda: (node.stop(), done.set()), daemon=True).start()
    assert done.wait(timeout=120)
    for pid in pids:
        wait_for(lambda: not _alive(pid), timeout=30, what=f"receive process {pid} to end")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie until reaped: count it as ended
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_to_the_process_group_stops_the_node_gracefully(tmp_path):
    """systemd (without KillMode=mixed), `timeout` and Ctrl-C signal every process of the node's group: the
    receive processes leave the stop to the node, which places and checkpoints their journals and exits 0."""
    require_tool("storescu")
    port = free_port()
    config_path = tmp_path / "node.yaml"
    config_path.write_text(f"node: {{port: {port}, bind_address: 127.0.0.1, data_dir: {tmp_path / 'node'}, "
                           f"min_free_disk_mb: 1, ae_title: {NODE_AE}, receive_processes: 2}}\nrules: []\n")
    node = subprocess.Popen([sys.executable, "-m", "dicom_ai_node.cli", "serve", "--config", str(config_path)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: _storescu(port, [Path(get_testdata_file("CT_small.dcm"))]).wait(timeout=60) == 0,
                 timeout=120, interval=1.0, what="the node to take an instance")
        os.killpg(node.pid, signal.SIGTERM)
        assert node.wait(timeout=120) == 0
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    assert "SIGTERM: stopping" in node.stderr.read()
    store = JobStore(tmp_path / "node" / "state.sqlite3")
    assert sorted(j.checkpoint_seq for j in store.journals()) == [0, 1]  # placed and checkpointed, not replayed
    assert len(store.all_series()) == 1 and store.all_series()[0].instances == 1
