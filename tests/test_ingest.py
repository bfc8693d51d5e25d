"""The fast ingest path: the raw header walk against pydicom, the streamed spool file, the group commit,
and the upper-layer acceptor against real pynetdicom and DCMTK peers (a Receiver on a free port)."""
from __future__ import annotations

import copy
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import pydicom.data
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification

from conftest import PEER_ENV, REPO, echoscu, free_port, journal_died, node_yaml, require_tool
from dicom_ai_node import spool
from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import parse_config
from dicom_ai_node.jobs.store import JobStore, ReceivedInstance
from dicom_ai_node.receive import journal as ingest_journal
from dicom_ai_node.receive.journal import IngestJournal, read_segment
from dicom_ai_node.receive.scp import Receiver
from dicom_ai_node.spool import (
    FREE_SPACE_RECHECK_BYTES,
    FREE_SPACE_RECHECK_S,
    FreeSpaceGauge,
    IncomingInstance,
    InvalidInstance,
    free_space_recheck_due,
    parse_dataset,
    parse_instance,
    parse_with_pydicom,
)

NODE_AE = "DICOM_AI_NODE"


def _normalised(value):
    """pydicom 3 gives multi-valued binary numbers as a list, which str() turned into one '[1, 2]' string;
    the raw walk gives each value (as it does for every multi-valued text element)."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        return [v.strip() for v in value[1:-1].split(",")]
    return value


def _files_with_uids():
    for path in sorted(map(str, (Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))):
        try:
            raw = Path(path).read_bytes()
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            yield path, raw, str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - not a DICOM file, or one without UIDs
            continue


def test_raw_walk_reads_what_pydicom_reads():
    compared = 0
    for path, raw, sop_class, sop_instance in _files_with_uids():
        meta = spool._read_file_meta(raw)  # noqa: SLF001
        if meta is None or not spool.walks_raw(meta[0]):
            continue
        try:
            slow = parse_with_pydicom(raw, sop_class, sop_instance)
        except InvalidInstance:
            continue  # pydicom refuses some files on warnings (badVR.dcm) which the walk accepts
        fast = parse_dataset(raw, meta[1], meta[0], sop_class, sop_instance)
        assert (fast.sop_class_uid, fast.sop_instance_uid, fast.series_uid, fast.study_uid,
                fast.transfer_syntax_uid) == (slow.sop_class_uid, slow.sop_instance_uid, slow.series_uid,
                                              slow.study_uid, slow.transfer_syntax_uid), path
        for keyword, value in slow.routing_header.items():
            assert _normalised(value) == _normalised(fast.routing_header.get(keyword)), (path, keyword)
        # The walk also reads standard elements a sender encoded as UN, which pydicom left out.
        extra = set(fast.routing_header) - set(slow.routing_header)
        assert not extra or "UN" in path or "rtdose" in path, (path, extra)
        compared += 1
    assert compared > 40


def test_non_ascii_text_is_decoded_with_the_character_set():
    for path in sorted((Path(pydicom.data.__file__).parent / "charset_files").glob("chr*.dcm")):
        ds = pydicom.dcmread(path)
        if "PatientName" not in ds or "SOPInstanceUID" not in ds:
            continue
        buffer = io.BytesIO()
        ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
        raw = buffer.getvalue()
        header = parse_instance(raw, str(ds.SOPClassUID), str(ds.SOPInstanceUID)).routing_header
        assert header["PatientName"] == str(ds.PatientName), path.name


def _ct_small_raw(**changes) -> tuple[bytes, Dataset]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), ds


def test_every_truncation_is_refused():
    """Cut anywhere inside an element, the stream is refused. Cut exactly between two elements it reads as
    a shorter, complete dataset, to the raw walk as to pydicom (the P-DATA last-fragment flag is what says
    a dataset ended); the one such cut here falls before the pixel data, so it still is accepted by both."""
    raw, ds = _ct_small_raw()
    meta = spool._read_file_meta(raw)  # noqa: SLF001
    assert meta is not None
    elements = spool._Elements()  # noqa: SLF001
    spool._walk(raw, meta[1], len(raw), True, False, elements)  # noqa: SLF001
    ends = {pos + length for pos, length, _ in elements.found.values() if length is not None}
    refused = 0
    for cut in range(meta[1] + 1, len(raw), 97):
        try:
            parse_dataset(raw[:cut], meta[1], meta[0], str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        except InvalidInstance:
            refused += 1
            continue
        assert cut in ends
        parse_with_pydicom(raw[:cut], str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert refused > 300


def test_truncated_sequence_and_short_pixel_data_are_refused():
    nested = Dataset()
    nested.CodeValue = "123"
    nested.ConceptNameCodeSequence = Sequence([Dataset()])
    raw, ds = _ct_small_raw(ProcedureCodeSequence=Sequence([nested]))
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        good = buffer.getvalue()
        meta = spool._read_file_meta(good)  # noqa: SLF001
        header = parse_dataset(good, meta[1], meta[0], str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        assert "ProcedureCodeSequence" not in header.routing_header  # sequences are not routing values
        assert header.routing_header["Modality"] == "CT" and header.transfer_syntax_uid == syntax
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # A sequence and items of undefined length, cut inside: the delimiters are missing.
    ds["ProcedureCodeSequence"].is_undefined_length = True
    for item in (ds.ProcedureCodeSequence[0], ds.ProcedureCodeSequence[0].ConceptNameCodeSequence[0]):
        item.is_undefined_length_sequence_item = True
    ds.ProcedureCodeSequence[0]["ConceptNameCodeSequence"].is_undefined_length = True
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    whole = buffer.getvalue()
    start = whole.index(b"\x08\x00\x32\x10SQ\x00\x00\xff\xff\xff\xff")  # (0008,1032), undefined length
    meta = spool._read_file_meta(whole)  # noqa: SLF001
    for cut in range(start + 12, start + 60, 4):
        with pytest.raises(InvalidInstance):
            parse_dataset(whole[:cut], meta[1], meta[0], str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    # Pixel data shorter than Rows x Columns x BitsAllocated says.
    short, ds = _ct_small_raw()
    ds.PixelData = ds.PixelData[:-200]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(InvalidInstance, match="PixelData"):
        parse_instance(buffer.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def test_wrong_or_unsafe_uids_are_refused():
    raw, ds = _ct_small_raw(StudyInstanceUID="../../etc")
    with pytest.raises(InvalidInstance, match="StudyInstanceUID"):
        parse_instance(raw, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    raw, ds = _ct_small_raw()
    with pytest.raises(InvalidInstance, match="differ"):
        parse_instance(raw, str(ds.SOPClassUID), "1.2.3")


@pytest.mark.parametrize("spill", [False, True])
def test_incoming_instance_is_a_valid_file_in_its_folder(tmp_path, monkeypatch, spill):
    if spill:
        monkeypatch.setattr(spool, "SPILL_BYTES", 1000)  # streamed to the file, checked through mmap
    raw, ds = _ct_small_raw()
    dataset = raw[spool._read_file_meta(raw)[1]:]  # noqa: SLF001
    incoming = IncomingInstance(tmp_path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian,
                                "PACS")
    for i in range(0, len(dataset), 4096):
        incoming.write(memoryview(dataset)[i:i + 4096])
    path, header = incoming.commit()
    assert path == tmp_path / header.study_uid / header.series_uid / f"{ds.SOPInstanceUID}.dcm"
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.SourceApplicationEntityTitle == "PACS"
    assert stored.PixelData == ds.PixelData and stored.PatientName == ds.PatientName
    assert not list(tmp_path.glob(".*.tmp"))


def test_refused_incoming_instance_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "SPILL_BYTES", 1000)
    raw, ds = _ct_small_raw()
    incoming = IncomingInstance(tmp_path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
    incoming.write(raw[spool._read_file_meta(raw)[1]:-500])  # noqa: SLF001
    with pytest.raises(InvalidInstance):
        incoming.commit()
    incoming.discard()
    assert list(tmp_path.iterdir()) == []


def _instance(i: int, series: str = "1.2.3") -> ReceivedInstance:
    return ReceivedInstance(sop_uid=f"{series}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax_uid=ExplicitVRLittleEndian, series_uid=series, study_uid="1.2",
                            calling_ae="PACS", path=f"/spool/{i}.dcm", size=1, header={"Modality": "CT"})


def _received(ds: Dataset, spool_dir: Path) -> tuple[ReceivedInstance, tuple]:
    """A CT_small as the receiver journals it: its row and its file's bytes (file meta, dataset)."""
    meta = spool.file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
    data = encode(ds, False, True)  # explicit VR little endian, as the dataset travels
    instance = ReceivedInstance(
        sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=ExplicitVRLittleEndian,
        series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID), calling_ae="PACS",
        path=str(spool_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"),
        size=len(meta) + len(data), header={"Modality": "CT"})
    return instance, (meta, bytearray(data))


def _ct_series(count: int) -> list[Dataset]:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    out = []
    for i in range(count):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, generate_uid(), i + 1
        out.append(ds)
    return out


def _running_journal(tmp_path: Path, **options) -> tuple[JobStore, Path, IngestJournal]:
    """A journal in tmp_path with its store and spool, recovered (nothing to replay) and placing."""
    store, spool_dir = JobStore(tmp_path / "state.sqlite3"), tmp_path / "spool"
    journal = IngestJournal(tmp_path / "journal", spool_dir, store, **options)
    assert journal.recover() == 0
    journal.start()
    return store, spool_dir, journal


@pytest.fixture
def no_checkpoints(monkeypatch):
    """The placer places but never checkpoints, as if the process died before its first checkpoint."""
    monkeypatch.setattr(ingest_journal, "CHECKPOINT_IDLE_S", 1e9)
    monkeypatch.setattr(ingest_journal, "CHECKPOINT_EVERY_S", 1e9)


def test_free_space_is_measured_again_when_stale_or_after_enough_bytes():
    assert free_space_recheck_due(100.0, None, 0)  # never measured
    assert not free_space_recheck_due(100.0, 100.0, 0)
    assert not free_space_recheck_due(100.0 + FREE_SPACE_RECHECK_S / 2, 100.0, FREE_SPACE_RECHECK_BYTES - 1)
    assert free_space_recheck_due(100.0 + FREE_SPACE_RECHECK_S, 100.0, 0)
    assert free_space_recheck_due(100.0, 100.0, FREE_SPACE_RECHECK_BYTES)
    assert free_space_recheck_due(99.0, 100.0, 0)  # the clock went back: do not trust the old figure


def test_free_space_gauge_counts_what_was_received_since_it_measured(tmp_path, monkeypatch):
    import shutil as shutil_module

    measured = []
    real = shutil_module.disk_usage
    monkeypatch.setattr("dicom_ai_node.spool.shutil.disk_usage", lambda p: measured.append(p) or real(p))
    gauge = FreeSpaceGauge(tmp_path)
    free = gauge.free_bytes()
    assert len(measured) == 1 and abs(free - real(tmp_path).free) < 64 * 1024 * 1024
    gauge.received(10 * 1024 * 1024)
    assert gauge.free_bytes() == free - 10 * 1024 * 1024 and len(measured) == 1  # estimated, not measured
    gauge.received(FREE_SPACE_RECHECK_BYTES)
    gauge.free_bytes()
    assert len(measured) == 2  # so much arrived that the figure is measured again


def test_journal_appends_from_several_threads_are_placed_recorded_and_checkpointed(tmp_path):
    store, spool_dir, journal = _running_journal(tmp_path)
    datasets = _ct_series(100)
    received = [_received(ds, spool_dir) for ds in datasets]
    seqs, errors = [], []

    def deliver(worker: int) -> None:
        for instance, parts in received[worker::4]:
            try:
                seqs.append(journal.append(instance, parts))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(seqs) == list(range(1, 101))
    assert journal.wait_placed(100, timeout=30)
    series = str(datasets[0].SeriesInstanceUID)
    assert store.series(series).instances == 100 and len(store.instances(series)) == 100
    for instance, parts in received:
        assert Path(instance.path).read_bytes() == b"".join(parts)  # the file is what was journalled
        assert pydicom.dcmread(instance.path).SOPInstanceUID == instance.sop_uid
    assert journal.stats.flushes <= 100  # appends that met shared one flush
    journal.close()
    assert store.journal_checkpoint("journal") == 100  # closing places and checkpoints everything
    assert not list(spool_dir.rglob(".*.tmp"))


def test_journal_replays_what_was_acknowledged_but_not_placed(tmp_path, no_checkpoints):
    """A crash after the C-STOREs were answered and before the placer wrote their files and rows (here:
    the placer of the dead process never ran). A new process replays them from the journal."""
    store, spool_dir = JobStore(tmp_path / "state.sqlite3"), tmp_path / "spool"
    dead = IngestJournal(tmp_path / "journal", spool_dir, store)
    dead.recover()
    dead._closed = False  # noqa: SLF001 - accepts appends, but its placer is never started: it "died"
    received = [_received(ds, spool_dir) for ds in _ct_series(5)]
    for instance, parts in received:
        dead.append(instance, parts)
    journal_died(dead)
    assert not list(spool_dir.rglob("*.dcm")) and store.series(received[0][0].series_uid) is None

    journal = IngestJournal(tmp_path / "journal", spool_dir, JobStore(tmp_path / "state.sqlite3"))
    assert journal.recover() == 5
    assert store.series(received[0][0].series_uid).instances == 5
    for instance, parts in received:
        assert Path(instance.path).read_bytes() == b"".join(parts)
    assert store.journal_checkpoint("journal") == 5
    journal.close()
    # Replayed once: a further start finds nothing after the checkpoint.
    assert IngestJournal(tmp_path / "journal", spool_dir, store).recover() == 0


def test_replay_of_placed_instances_rewrites_files_but_does_not_reopen_their_series(tmp_path, no_checkpoints):
    """Placed and recorded, series already routed, but no checkpoint yet when the process died: the replay
    restores the files (whatever the power cut left of them) and leaves rows and series as they are."""
    store, spool_dir, journal = _running_journal(tmp_path)
    received = [_received(ds, spool_dir) for ds in _ct_series(3)]
    for instance, parts in received:
        last = journal.append(instance, parts)
    assert journal.wait_placed(last, timeout=30)
    series = received[0][0].series_uid
    assert store.route_series(store.series(series), [], "no rule matched")
    Path(received[1][0].path).write_bytes(b"")  # what a power cut may leave of a file never flushed
    journal_died(journal)

    again = IngestJournal(tmp_path / "journal", spool_dir, store)
    assert again.recover() == 3
    assert Path(received[1][0].path).read_bytes() == b"".join(received[1][1])
    row = store.series(series)
    assert (row.state, row.revision, row.instances) == ("unrouted", 1, 3)


def test_segment_scan_stops_at_a_torn_corrupt_or_stale_record(tmp_path):
    spool_dir = tmp_path / "spool"
    records = [ingest_journal._Record.encode(*_received(ds, spool_dir), False) for ds in _ct_series(3)]  # noqa: SLF001
    segment = tmp_path / "segment.wal"

    def write(seqs: list[int]) -> bytes:
        data = b"".join(b"".join(bytes(b) for b in r.buffers(seq)) for r, seq in zip(records, seqs))
        segment.write_bytes(data)
        return data

    data = write([7, 8, 9])
    assert [e.seq for e in read_segment(segment)] == [7, 8, 9]
    segment.write_bytes(data[:-100])  # the last record torn
    assert [e.seq for e in read_segment(segment)] == [7, 8]
    corrupt = bytearray(data)
    corrupt[records[0].size + 500] ^= 0xFF  # a flipped byte in the second record's data
    segment.write_bytes(bytes(corrupt))
    assert [e.seq for e in read_segment(segment)] == [7]
    write([7, 8, 3])  # a stale record of the segment's previous use follows the new ones
    assert [e.seq for e in read_segment(segment)] == [7, 8]
    entry = read_segment(segment)[1]
    assert b"".join(entry.parts) == b"".join(bytes(p) for p in records[1].parts)


def test_records_of_an_earlier_version_with_zlib_crc32_are_still_replayed(tmp_path):
    """A node upgraded with instances still in its journal: their DAJ1 records (CRC-32, not CRC-32C) read,
    and a corrupt one is still caught."""
    import zlib

    spool_dir = tmp_path / "spool"
    (instance, parts), = [_received(ds, spool_dir) for ds in _ct_series(1)]
    record = ingest_journal._Record.encode(instance, parts, False)  # noqa: SLF001
    crc = zlib.crc32(b"".join(bytes(p) for p in parts), zlib.crc32(record.meta))
    header = ingest_journal.RECORD_HEADER.pack(b"DAJ1", 5, len(record.meta), record.length, crc)
    data = header + record.meta + b"".join(bytes(p) for p in parts)
    assert crc != record.crc  # the two checksums differ: the scan really reads each record with its own
    segment = tmp_path / "old.wal"
    segment.write_bytes(data)
    [entry] = read_segment(segment)
    assert entry.seq == 5 and entry.instance == instance and b"".join(entry.parts) == b"".join(bytes(p) for p in parts)
    segment.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert read_segment(segment) == []


def test_segments_are_reused_after_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_journal, "CHECKPOINT_IDLE_S", 0.0)
    store, spool_dir, journal = _running_journal(tmp_path, segment_bytes=100_000)  # ~2 CT_small each
    received = [_received(ds, spool_dir) for ds in _ct_series(40)]
    for instance, parts in received:
        last = journal.append(instance, parts)
    assert journal.wait_placed(last, timeout=30)
    journal.close()
    segments = list((tmp_path / "journal").glob("*.wal"))
    assert 1 <= len(segments) <= 1 + ingest_journal.SPARE_SEGMENTS + 1  # bounded, however many were written
    assert store.journal_checkpoint("journal") == 40 and journal.stats.checkpoints >= 2
    assert IngestJournal(tmp_path / "journal", spool_dir, store).recover() == 0


def test_recording_a_batch_fails_only_the_instance_that_cannot_be_recorded(tmp_path):
    store = JobStore(tmp_path / "state.sqlite3")
    bad = ReceivedInstance(**{**_instance(1).__dict__, "header": {"Modality": object()}})  # not JSON
    outcomes = store.record_instances([_instance(0), bad, _instance(2)])
    assert outcomes[0] is False and isinstance(outcomes[1], TypeError) and outcomes[2] is False
    assert [i.sop_uid for i in store.instances("1.2.3")] == ["1.2.3.0", "1.2.3.2"]
    # Recorded again (a re-send): counted once, the row replaced.
    assert store.record_instances([_instance(0)]) == [False]
    assert store.series("1.2.3").instances == 2


# -- the acceptor --------------------------------------------------------------------------------------

@pytest.fixture
def receiver(tmp_path):
    started = []

    def start(extra: str = "") -> Receiver:
        config = parse_config(f"node: {{port: {free_port()}, bind_address: 127.0.0.1, data_dir: {tmp_path / 'node'}, "
                              f"min_free_disk_mb: 1, ae_title: {NODE_AE}{extra}}}\n")
        config.spool_dir.mkdir(parents=True, exist_ok=True)
        r = Receiver(config, JobStore(config.db_path), AuditLog(config.audit_path))
        r.start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def _ct(uid_seed: int = 0) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(uid_seed)])
    return ds


def test_echo_and_store_with_a_large_pdu_and_asynchronous_window(receiver):
    r = receiver()
    ae = AE(ae_title="PACS")
    ae.maximum_pdu_size = 0  # unlimited: the whole dataset in one PDV
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", r.port, ae_title=NODE_AE, ext_neg=[_async_window(4)])
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 0
    assert int(assoc.send_c_echo().Status) == 0
    datasets = [_ct() for _ in range(5)]
    assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * 5
    assoc.release()
    assert assoc.is_released
    series = r.store.series(str(datasets[0].SeriesInstanceUID))
    assert series.instances == 5 and series.released_at is not None
    for ds in datasets:
        [path] = [p for p in r.store.instance_paths(str(ds.SeriesInstanceUID)) if ds.SOPInstanceUID in p]
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def _async_window(n: int):
    from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation

    item = AsynchronousOperationsWindowNegotiation()
    item.maximum_number_operations_invoked = n
    item.maximum_number_operations_performed = n
    return item


def test_small_peer_pdu_gets_fragmented_responses(receiver):
    r = receiver()
    ae = AE(ae_title="PACS")
    ae.maximum_pdu_size = 4096  # the smallest a peer may announce; responses still fit
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", r.port, ae_title=NODE_AE)
    assert assoc.is_established
    assert int(assoc.send_c_store(_ct()).Status) == 0
    assoc.release()


def test_association_limit_rejects_transiently(receiver):
    r = receiver(", max_associations: 1")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", r.port, ae_title=NODE_AE)
    assert first.is_established
    second = echoscu(r.port, "PACS")
    assert second.returncode != 0
    assert "Association Rejected" in second.stderr and "Local Limit Exceeded" in second.stderr
    first.release()
    third = ae.associate("127.0.0.1", r.port, ae_title=NODE_AE)
    assert third.is_established
    third.release()


def test_unsupported_abstract_syntax_is_not_accepted(receiver):
    r = receiver()
    ae = AE(ae_title="PACS")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.1.1")  # Patient Root Q/R FIND: not a storage class
    assoc = ae.associate("127.0.0.1", r.port, ae_title=NODE_AE)
    assert not assoc.is_established or not assoc.accepted_contexts
    if assoc.is_established:
        assoc.release()


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def test_connection_lost_mid_dataset_stores_and_records_nothing(receiver, monkeypatch):
    """A sender that dies halfway through a C-STORE: no row, no file, no temporary file left behind."""
    monkeypatch.setattr(spool, "SPILL_BYTES", 1000)  # the half sent is already in its temporary file
    r = receiver()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", r.port, ae_title=NODE_AE)
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    ds = _ct()
    from pynetdicom.dimse_primitives import C_STORE

    request = C_STORE()
    request.MessageID, request.AffectedSOPClassUID = 1, CTImageStorage
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(b"set")  # only so that the command says a dataset follows
    from pynetdicom.dimse_messages import C_STORE_RQ

    message = C_STORE_RQ()
    message.primitive_to_message(request)
    command = encode(message.command_set, True, True)
    dataset = encode(ds, False, True)
    sock = assoc.dul.socket.socket
    sock.sendall(_pdu(0x04, struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command))
    half = dataset[: len(dataset) // 2]
    sock.sendall(_pdu(0x04, struct.pack(">IBB", len(half) + 2, context_id, 0x00) + half))
    deadline = time.time() + 10
    while time.time() < deadline and not list(r.config.spool_dir.glob(".*.tmp")):
        time.sleep(0.05)
    assert list(r.config.spool_dir.glob(".*.tmp"))
    sock.shutdown(socket.SHUT_RDWR)  # the sender dies: no A-ABORT, the connection just goes
    deadline = time.time() + 10
    while time.time() < deadline and list(r.config.spool_dir.glob(".*.tmp")):
        time.sleep(0.1)
    assert r.store.series(str(ds.SeriesInstanceUID)) is None
    assert not list(r.config.spool_dir.rglob("*.dcm")) and not list(r.config.spool_dir.glob(".*.tmp"))


def test_garbage_instead_of_an_association_request_is_dropped(receiver):
    r = receiver()
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(10)
        reply = s.recv(100)
    assert reply == b"" or reply[0] == 0x07  # closed, or an A-ABORT
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", r.port, ae_title=NODE_AE)
    assert assoc.is_established  # still serving
    assoc.release()


def test_deflated_and_big_endian_instances_are_received(receiver, tmp_path):
    """Deflated datasets are inflated for the checks and stored as sent; big endian goes through pydicom."""
    import subprocess

    from conftest import PEER_ENV, require_tool

    require_tool("storescu")
    r = receiver()
    source = get_testdata_file("CT_small.dcm")
    for option, syntax in (("-xd", "1.2.840.10008.1.2.1.99"), ("-xb", "1.2.840.10008.1.2.2")):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        path = tmp_path / f"{option}.dcm"
        ds.save_as(path, enforce_file_format=True)
        result = subprocess.run(["storescu", option, "-aet", "PACS", "-aec", NODE_AE, "127.0.0.1", str(r.port),
                                 str(path)], env=PEER_ENV, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        [stored] = [p for p in r.store.instance_paths(str(ds.SeriesInstanceUID)) if ds.SOPInstanceUID in p]
        back = pydicom.dcmread(stored)
        assert back.file_meta.TransferSyntaxUID == syntax
        assert back.pixel_array.tolist() == ds.pixel_array.tolist()
    # A truncated deflate stream is refused.
    raw = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    ds.save_as(raw, enforce_file_format=True)
    meta = spool._read_file_meta(raw.getvalue())  # noqa: SLF001
    with pytest.raises(InvalidInstance, match="deflate"):
        parse_dataset(raw.getvalue()[:-100], meta[1], meta[0], str(ds.SOPClassUID), str(ds.SOPInstanceUID))


CRASHING_RECEIVER = """
import sys, threading
from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import load_config
from dicom_ai_node.jobs.store import JobStore
from dicom_ai_node.receive.journal import IngestJournal
from dicom_ai_node.receive.scp import Receiver

IngestJournal._place = lambda self, batch: threading.Event().wait()  # the placer stalls: nothing placed
config = load_config(sys.argv[1])
receiver = Receiver(config, JobStore(config.db_path), AuditLog(config.audit_path))
receiver.start()
print("listening", flush=True)
threading.Event().wait()
"""


def test_instances_acknowledged_to_storescu_survive_a_kill_before_they_are_placed(tmp_path):
    """DCMTK storescu gets 0x0000 for each instance; the node is then killed (SIGKILL) before it wrote a
    single spool file or row. The next start replays all of them from the journal, byte for byte."""
    require_tool("storescu")
    port = free_port()
    config_path = tmp_path / "node.yaml"
    config_path.write_text(node_yaml(tmp_path / "node", port).replace(
        "min_free_disk_mb: 1", "min_free_disk_mb: 1\n  network_timeout_s: 2"))
    child = subprocess.Popen([sys.executable, "-c", CRASHING_RECEIVER, str(config_path)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "listening"
        files = []
        for ds in _ct_series(6):
            path = tmp_path / "send" / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append((ds, path))
        sent = subprocess.run(["storescu", "-aet", "PACS", "-aec", NODE_AE, "127.0.0.1", str(port),
                               *[str(p) for _, p in files]], env=PEER_ENV, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr  # every instance was answered with success
    finally:
        child.kill()
        child.wait()
    config = parse_config(config_path.read_text())
    assert not list(config.spool_dir.rglob("*.dcm"))  # the dead process placed nothing
    store = JobStore(config.db_path)
    receiver = Receiver(config, store, AuditLog(config.audit_path))
    receiver.start()
    try:
        assert receiver.journal.stats.replayed == 6
        series = str(files[0][0].SeriesInstanceUID)
        rows = {row.sop_uid: row for row in store.instances(series)}
        assert sorted(rows) == sorted(str(ds.SOPInstanceUID) for ds, _ in files)
        for ds, _ in files:
            stored = pydicom.dcmread(rows[str(ds.SOPInstanceUID)].path)
            assert stored.PixelData == ds.PixelData and stored.PatientName == ds.PatientName
    finally:
        receiver.stop()


def test_a_journal_that_cannot_place_keeps_its_instances_and_says_why(tmp_path, monkeypatch):
    """The spool cannot take the instance (here a file stands where its study folder must be): the
    instance stays journalled, `dicom-ai-node status` says how many wait and why, and once the spool is
    mended it is placed and the error cleared."""
    monkeypatch.setattr(ingest_journal, "RETRY_S", (0.2, 0.2))
    monkeypatch.setattr(ingest_journal, "CHECKPOINT_IDLE_S", 0.2)
    config = parse_config(f"node: {{data_dir: {tmp_path / 'node'}, port: {free_port()}}}\n")
    store = JobStore(config.db_path)
    journal = IngestJournal(config.journal_dir / "0", config.spool_dir, store)
    journal.recover()
    journal.start()
    try:
        [ds] = _ct_series(1)
        instance, parts = _received(ds, config.spool_dir)
        blocker = config.spool_dir / str(ds.StudyInstanceUID)
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a folder")
        seq = journal.append(instance, parts)  # acknowledged: it is in the journal
        deadline = time.time() + 30
        while time.time() < deadline and not store.journals()[0].last_error:
            time.sleep(0.05)
        [row] = store.journals()
        assert row.waiting == 1 and "NotADirectoryError" in row.last_error
        status = subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "status", "--data-dir",
                                 str(config.node.data_dir)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "1 instance(s) not yet in the spool" in status.stdout and "NotADirectoryError" in status.stdout
        assert store.series(instance.series_uid) is None and not journal.wait_placed(seq, timeout=0.5)
        blocker.unlink()  # the operator mends the spool: the next retry places it
        assert journal.wait_placed(seq, timeout=30)
        assert Path(instance.path).read_bytes() == b"".join(parts)
        deadline = time.time() + 30
        while time.time() < deadline and store.journals()[0].last_error:
            time.sleep(0.05)
        assert store.journals()[0].last_error == "" and store.journals()[0].waiting == 0
    finally:
        journal.close()


def test_a_failed_journal_write_fails_only_its_c_store_and_the_next_goes_to_a_new_segment(tmp_path, monkeypatch):
    """A write to the journal fails (the disk is full): that append raises, so its C-STORE is answered
    Out of Resources and the sender keeps it; the segment is never written again, later appends go on in a
    new one, and what was acknowledged before and after is placed."""
    store, spool_dir, journal = _running_journal(tmp_path)
    try:
        received = [_received(ds, spool_dir) for ds in _ct_series(3)]
        journal.append(*received[0])
        first_segment = journal._current  # noqa: SLF001
        real_pwritev = os.pwritev

        def disk_full(fd, buffers, offset):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ingest_journal.os, "pwritev", disk_full)
        with pytest.raises(OSError, match="No space left"):
            journal.append(*received[1])
        monkeypatch.setattr(ingest_journal.os, "pwritev", real_pwritev)
        last = journal.append(*received[2])
        assert journal._current is not first_segment  # noqa: SLF001 - the failed segment is not written again
        assert journal.wait_placed(last, timeout=30)
        recorded = {row.sop_uid for row in store.instances(received[0][0].series_uid)}
        assert recorded == {received[0][0].sop_uid, received[2][0].sop_uid}
    finally:
        journal.close()
