"""The ingest journal: one flush makes a received instance durable before it is acknowledged.

Making a new spool file durable takes three flushes (the file's data, its folder entry, the row's commit
in the SQLite WAL), and with one association each costs more than DCMTK's storescp spends on a whole
instance. The journal needs one: each instance (its row and the file's bytes) is appended as a record to a
segment file and fdatasynced; only then is the C-STORE answered. A single placer thread then writes the
spool file and records the row without flushing either, and every so often checkpoints: it flushes the
spool's file system (syncfs) and commits the highest placed sequence number in the store with a WAL fsync,
after which the segments behind it are reused. After a crash or power cut, `recover` replays every record
after the checkpoint, so an acknowledged instance is never lost.

Records: header (magic, sequence number, metadata length, data length, CRC-32C of metadata and data), JSON
metadata (the ReceivedInstance, and whether the file is already in place), the file's bytes. A record is
valid when its magic and CRC are right and its sequence number follows the previous record of its segment;
a torn write at the end of a segment fails the CRC, and the stale records of a reused segment fail the
sequence, so a scan stops at both. Sequence numbers only grow, over the node's whole life.

Instances too large to hold in memory are streamed to their file, which the receiver makes durable itself;
their record carries the row only (`in_place`), so every row still reaches the store through one ordered
path. Appends from several associations at once share one write and one flush (group commit).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import fcntl
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import crc32c

from dicom_ai_node import jsontext
from dicom_ai_node.jobs.store import JobStore, ReceivedInstance
from dicom_ai_node.spool import fsync_dir, write_durably

log = logging.getLogger("dicom_ai_node.receive")

MAGIC = b"DAJ2"  # records checksummed with CRC-32C (hardware-accelerated: ~5x zlib's CRC-32 on 0.5 MB here)
# What each magic's checksum is: DAJ1 records (zlib's CRC-32) were written by earlier versions, and a journal
# they left unplaced is still replayed.
CHECKSUMS: dict[bytes, Callable[[Any, int], int]] = {b"DAJ1": zlib.crc32, MAGIC: crc32c.crc32c}
RECORD_HEADER = struct.Struct("<4sQIQI")  # magic, seq, metadata length, data length, checksum
SEGMENT_BYTES = 64 * 1024 * 1024  # a segment prepared in the background
FIRST_SEGMENT_BYTES = 4 * 1024 * 1024  # one made on the spot (first start, or no spare ready): quick to fill
SPARE_SEGMENTS = 4  # segments kept for reuse beyond the one being written; more are deleted
# A checkpoint flushes every spool file placed since the last one, which a busy disk feels: it is taken
# once nothing new has arrived for CHECKPOINT_IDLE_S, and while instances keep arriving only every
# CHECKPOINT_EVERY_S or once the segments written since hold CHECKPOINT_BYTES (which bounds the journal's
# disk use and the replay after a crash).
CHECKPOINT_IDLE_S = 1.0
CHECKPOINT_EVERY_S = 30.0
CHECKPOINT_BYTES = 512 * 1024 * 1024
RETRY_S = (1.0, 60.0)  # the placer's wait after a failure: first, longest
PLACE_GATHER_S = 0.005
BACKLOG_BYTES = 1024 * 1024 * 1024  # journalled but not yet placed: appends wait beyond it
BACKLOG_WAIT_S = 30.0  # then fail (Out of Resources: the sender retries later) rather than grow without bound


class JournalClosed(OSError):
    """The journal was closed (the node is stopping): the instance is not acknowledged."""


@dataclass
class JournalEntry:
    seq: int
    instance: ReceivedInstance
    parts: Sequence[Any]  # the spool file's bytes (file meta, dataset) of a replayed record; else empty
    in_place: bool
    length: int = 0  # of the file's bytes
    # Where the journal holds the file's bytes once written (segment, offset): the placer copies them from
    # there (page cache, kernel to kernel), so that acknowledged instances waiting to be placed take no
    # memory in the process however far the placer falls behind.
    source: tuple[_Segment, int] | None = None


@dataclass
class _Segment:
    path: Path
    fd: int
    capacity: int  # zero-filled (or written before) up to here: records beyond would grow the file
    offset: int = 0  # where the next record goes
    last_seq: int = 0  # the highest sequence number written into it


class JournalInUse(RuntimeError):
    """Another live process holds this journal (its owner lock): it is that process's to place."""


@dataclass
class JournalStats:
    flushes: int = 0
    checkpoints: int = 0
    checkpoint_seq: int = 0
    replayed: int = 0
    last_error: str = ""  # of the placer's last failure


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def sync_filesystem(folder: Path) -> None:
    """Flush every written file and folder entry of `folder`'s file system (syncfs; sync where missing)."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(folder))
    finally:
        os.close(fd)


_INSTANCE_FIELDS = tuple(f.name for f in dataclasses.fields(ReceivedInstance) if f.name != "header")


@dataclass
class _Record:
    """A record's buffers but its header, which needs the sequence number."""

    meta: bytes
    parts: Sequence[Any]
    length: int  # of the parts
    crc: int

    @classmethod
    def encode(cls, instance: ReceivedInstance, parts: Sequence[Any], in_place: bool) -> "_Record":
        # {"instance": {...its fields..., "header": ...}, "in_place": ...}, with the header's JSON made once
        # for the journal and the store (asdict would also deep-copy it)
        fields = jsontext.dumps({name: getattr(instance, name) for name in _INSTANCE_FIELDS})
        meta = (f'{{"instance":{fields[:-1]},"header":{instance.header_json}}},'
                f'"in_place":{"true" if in_place else "false"}}}').encode()
        checksum = CHECKSUMS[MAGIC]
        crc = checksum(meta, 0)
        length = 0
        for part in parts:
            crc = checksum(part, crc)
            length += len(part)
        return cls(meta, parts, length, crc)

    def buffers(self, seq: int) -> list[Any]:
        return [RECORD_HEADER.pack(MAGIC, seq, len(self.meta), self.length, self.crc), self.meta, *self.parts]

    @property
    def size(self) -> int:
        return RECORD_HEADER.size + len(self.meta) + self.length


def read_segment(path: Path) -> list[JournalEntry]:
    """The valid records of a segment, in order: up to the first torn, corrupt or stale one."""
    entries: list[JournalEntry] = []
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < RECORD_HEADER.size:
            return entries
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
            pos, previous = 0, None
            while pos + RECORD_HEADER.size <= size:
                magic, seq, meta_len, data_len, crc = RECORD_HEADER.unpack_from(view, pos)
                start = pos + RECORD_HEADER.size
                end = start + meta_len + data_len
                checksum = CHECKSUMS.get(magic)
                if checksum is None or end > size or (previous is not None and seq != previous + 1):
                    break
                meta, data = view[start:start + meta_len], view[start + meta_len:end]
                if checksum(data, checksum(meta, 0)) != crc:
                    break
                try:
                    decoded = json.loads(meta)
                    instance = ReceivedInstance(**decoded["instance"])
                except (ValueError, TypeError, KeyError):
                    break
                entries.append(JournalEntry(seq, instance, (bytes(data),) if data_len else (), decoded["in_place"]))
                pos, previous = end, seq
    return entries


class IngestJournal:
    """Append (any thread, durable on return), place (one thread), checkpoint, recover.

    `recover()` before the receiver accepts, `start()` for the placer, `close()` at shutdown."""

    def __init__(self, folder: Path, spool_dir: Path, store: JobStore, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = folder
        self.name = folder.name  # its checkpoint's key in the store
        self.spool_dir = spool_dir
        self.store = store
        self.segment_bytes = segment_bytes
        self.stats = JournalStats()
        self._cond = threading.Condition()  # guards everything below but the segments
        self._pending: list[tuple[JournalEntry, _Record]] = []
        self._leading = False
        self._done: dict[int, BaseException | None] = {}  # appends flushed (None) or failed, by seq
        self._next_seq = 1
        self._queue: deque[JournalEntry] = deque()  # flushed, not yet placed
        self._queued_bytes = 0
        self._placed_seq = 0
        self._closed = True
        self._segment_lock = threading.Lock()  # the leader writes; the placer reuses segments
        self._current: _Segment | None = None
        self._sealed: list[_Segment] = []  # full segments, reusable once checkpointed
        self._spares: list[_Segment] = []
        self._placer: threading.Thread | None = None
        self._last_append = 0.0
        self._checkpointed_at = 0.0
        self._owner_fd: int | None = None

    # -- start-up ---------------------------------------------------------------------------------------

    def recover(self) -> int:
        """Replay every record after the last checkpoint into the spool and the store; returns how many.

        Files are rewritten from the journal (whatever the crash left of them), rows recorded unless the
        same file is recorded already, and a checkpoint taken; the segments are then reused. JournalInUse when
        a live process owns the journal (until close(), this object owns it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._own()
        checkpoint = self.store.journal_checkpoint(self.name)
        segments = sorted(self.folder.glob("*.wal"))
        entries: dict[int, JournalEntry] = {}
        highest = checkpoint
        for path in segments:
            for entry in read_segment(path):
                highest = max(highest, entry.seq)
                if entry.seq > checkpoint:
                    entries[entry.seq] = entry
        replay = [entries[seq] for seq in sorted(entries)]
        for entry in replay:
            self._place_file(entry, durable=True)
        if replay:
            unrecorded = [e.instance for e in replay if not self.store.instance_recorded(e.instance.sop_uid,
                                                                                         e.instance.path,
                                                                                         e.instance.size)]
            for outcome in self.store.record_instances(unrecorded):
                if isinstance(outcome, Exception):
                    raise outcome
            log.warning("ingest journal: replayed %d acknowledged instance(s) the previous process had not "
                        "placed (%d recorded anew)", len(replay), len(unrecorded))
        self._next_seq = highest + 1
        self._placed_seq = highest
        self.store.save_journal_checkpoint(self.name, highest)
        self.stats.replayed = len(replay)
        self.stats.checkpoint_seq = highest
        # Every segment is reusable now; the largest becomes the one written to.
        reusable = sorted((self._open_segment(path) for path in segments), key=lambda s: -s.capacity)
        for segment in reusable[1:]:
            self._keep_spare(segment)
        self._current = reusable[0] if reusable else self._next_segment()
        return len(replay)

    def start(self) -> None:
        with self._cond:
            self._closed = False
            self._checkpointed_at = time.monotonic()
        self._placer = threading.Thread(target=self._place_loop, name="ingest-placer", daemon=True)
        self._placer.start()

    def close(self) -> None:
        """Refuse new appends, place what is queued, checkpoint, close the segments."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._placer is not None:
            self._placer.join(timeout=60)
            self._placer = None
        with self._segment_lock:
            for segment in [self._current, *self._sealed, *self._spares]:
                if segment is not None:
                    os.close(segment.fd)
            self._current, self._sealed, self._spares = None, [], []
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # releases the owner lock
            self._owner_fd = None

    def _own(self) -> None:
        """Hold the journal's owner lock for as long as this object has it open. The kernel lets go of it
        when the process ends however it ends, so a journal whose lock is free belongs to nobody: replaying
        it (recover_other_journals) cannot race the process writing it."""
        if self._owner_fd is not None:
            return
        fd = os.open(self.folder / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalInUse(f"ingest journal {self.folder}: in use by a running process") from None
        self._owner_fd = fd

    # -- the hot path -----------------------------------------------------------------------------------

    def append(self, instance: ReceivedInstance, parts: Sequence[Any] = (), in_place: bool = False) -> int:
        """Journal one instance; returns its sequence number once it is on disk, raises OSError if it
        could not be made durable (the C-STORE then fails and the sender keeps its copy)."""
        [outcome] = self.append_batch([(instance, parts, in_place)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def append_batch(self, items: Sequence[tuple[ReceivedInstance, Sequence[Any], bool]]) -> list[int | BaseException]:
        """Journal several instances (row, file bytes, in place) with one flush; per instance, its sequence
        number once it is on disk or the error that kept it from being made durable. Raises OSError when the
        journal takes none of them (closed, or its backlog stayed full)."""
        # Encoded outside the lock: the checksum reads every byte.
        records = [_Record.encode(instance, parts, in_place) for instance, parts, in_place in items]
        with self._cond:
            deadline = time.monotonic() + BACKLOG_WAIT_S
            while self._queued_bytes > BACKLOG_BYTES and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OSError(f"ingest journal: {self._queued_bytes >> 20} MB acknowledged but not yet placed "
                                  f"in the spool for {BACKLOG_WAIT_S:.0f} s ({self.stats.last_error or 'slow disk'})")
                self._cond.wait(remaining)
            if self._closed:
                raise JournalClosed("the ingest journal is closed: the node is stopping")
            seqs = []
            for (instance, _, in_place), record in zip(items, records):
                seq = self._next_seq
                self._next_seq += 1
                self._pending.append((JournalEntry(seq, instance, (), in_place, record.length), record))
                seqs.append(seq)
            # All of them are pending together, so one leader writes them all: wait for the last one.
            last = seqs[-1]
            while last not in self._done and self._leading:
                self._cond.wait()
            batch: list[tuple[JournalEntry, _Record]] = []
            if last not in self._done:
                self._leading = True
                batch, self._pending = self._pending, []
        if batch:
            self._write_batch(batch)
        with self._cond:
            errors = [self._done.pop(seq) for seq in seqs]
        return [seq if error is None else error for seq, error in zip(seqs, errors)]

    def _write_batch(self, batch: list[tuple[JournalEntry, _Record]]) -> None:
        error: BaseException | None = None
        try:
            with self._segment_lock:
                touched: dict[int, _Segment] = {}
                for entry, record in batch:
                    segment = self._segment_for(record.size)
                    segment.last_seq = entry.seq  # before writing: a failed write may leave part of it
                    written = os.pwritev(segment.fd, record.buffers(entry.seq), segment.offset)
                    if written != record.size:  # a short write: only on a full disk
                        raise OSError(28, "short write to the ingest journal", str(segment.path))
                    if record.length:
                        entry.source = (segment, segment.offset + record.size - record.length)
                    segment.offset += record.size
                    touched[segment.fd] = segment
                for segment in touched.values():
                    os.fdatasync(segment.fd)
        except BaseException as exc:  # noqa: BLE001 - every append of the batch fails with it
            error = exc
            log.error("ingest journal: %d instance(s) not made durable: %s", len(batch), exc)
            # After a failed write or flush the segment's state is unknown: never write to it again.
            with self._segment_lock:
                if self._current is not None:
                    self._sealed.append(self._current)
                    self._current = None
        with self._cond:
            for entry, record in batch:
                self._done[entry.seq] = error
                if error is None:
                    self._queue.append(entry)  # in sequence order: leaders follow one another
                    self._queued_bytes += record.length
            self.stats.flushes += 1
            self._last_append = time.monotonic()
            self._leading = False
            self._cond.notify_all()

    def _segment_for(self, size: int) -> _Segment:
        """The segment the next record of `size` bytes goes to (called holding the segment lock)."""
        current = self._current
        if current is not None and (current.offset == 0 or current.offset + size <= current.capacity):
            return current
        if current is not None:
            self._sealed.append(current)
        self._current = self._next_segment()
        return self._current

    def _next_segment(self) -> _Segment:
        """A spare, or a small new segment when none is ready (called holding the segment lock)."""
        segment = self._spares.pop(0) if self._spares else self._new_segment(min(FIRST_SEGMENT_BYTES,
                                                                                  self.segment_bytes))
        segment.offset = 0
        return segment

    def _keep_spare(self, segment: _Segment) -> None:
        """Keep a checkpointed segment for reuse, unless enough are kept or it is one of the small ones."""
        if len(self._spares) < SPARE_SEGMENTS and segment.capacity >= self.segment_bytes:
            self._spares.append(segment)
        else:
            self._delete_segment(segment)

    # -- placing ----------------------------------------------------------------------------------------

    def wait_placed(self, seq: int, timeout: float) -> bool:
        """Wait until the instance journalled as `seq` (and all before it) is recorded in the store."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._placed_seq < seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._placer is None:
                    return False
                self._cond.wait(remaining)
        return True

    def _place_loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._queue and not self._closed and not self._checkpoint_due():
                    self._cond.wait(self._wait_s())
                if self._queue and not self._closed:
                    # Gather what arrives over the next few ms: one transaction for many rows, and fewer
                    # turns holding the GIL that the association threads need.
                    gathered = time.monotonic() + PLACE_GATHER_S
                    while not self._closed and time.monotonic() < gathered:
                        self._cond.wait(gathered - time.monotonic())
                batch = list(self._queue)
                closing = self._closed
            try:
                if batch:
                    self._place(batch)
                if self._checkpoint_due() or (closing and not batch):
                    self._checkpoint()
                self._prepare_spare()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the journal keeps the instances: retry, never drop
                if closing:
                    log.error("ingest journal: %d instance(s) could not be placed before stopping (%s); they stay "
                              "journalled and are replayed at the next start", len(batch), exc)
                    return
                failures += 1
                delay = min(RETRY_S[0] * 2 ** (failures - 1), RETRY_S[1])
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.error("ingest journal: placing %d instance(s) failed (%s); they stay journalled, retry in "
                          "%.0f s", len(batch), self.stats.last_error, delay)
                self._report_trouble(len(batch))
                with self._cond:
                    self._cond.wait(delay)
                continue
            if closing and not batch:
                return

    def _report_trouble(self, waiting: int) -> None:
        """Put the failure where `dicom-ai-node status` shows it, if the store itself can be written."""
        try:
            self.store.journal_trouble(self.name, waiting, self.stats.last_error)
        except Exception:  # noqa: BLE001 - the log has it; the store may be what fails
            pass

    def _place(self, batch: list[JournalEntry]) -> None:
        for entry in batch:
            if not entry.in_place:
                self._place_file(entry, durable=False)
        outcomes = self.store.record_instances([e.instance for e in batch], durable=False)
        for entry, outcome in zip(batch, outcomes):
            if isinstance(outcome, Exception):
                raise RuntimeError(f"instance {entry.instance.sop_uid} not recorded: {outcome}") from outcome
        with self._cond:
            for entry in batch:
                self._queue.popleft()
                self._queued_bytes -= entry.length
            self._placed_seq = batch[-1].seq
            self._cond.notify_all()

    def _place_file(self, entry: JournalEntry, durable: bool) -> None:
        """Write the instance's spool file from the journal (atomically: a reader sees the old or the new)."""
        if entry.in_place:
            path = Path(entry.instance.path)
            if not path.is_file() or path.stat().st_size != entry.instance.size:
                raise OSError(f"journalled instance {entry.instance.sop_uid}: its file {path} is missing or "
                              f"not {entry.instance.size} bytes")
            return
        if durable:
            write_durably(Path(entry.instance.path), b"".join(entry.parts))
            return
        # Names as strings: this runs for every received instance, and pathlib's parsing costs more than it.
        folder, _, name = entry.instance.path.rpartition(os.sep)
        tmp = f"{folder}{os.sep}.{name}.{entry.seq}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            if entry.source is not None:
                segment, offset = entry.source
                copied = 0
                while copied < entry.length:
                    n = os.copy_file_range(segment.fd, fd, entry.length - copied, offset + copied)
                    if n == 0:
                        raise OSError(f"journal segment {segment.path} ends before instance {entry.instance.sop_uid}")
                    copied += n
            else:
                os.writev(fd, list(entry.parts))
        finally:
            os.close(fd)
        os.rename(tmp, entry.instance.path)

    # -- checkpoints and segments -----------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        if self._placed_seq <= self.stats.checkpoint_seq:
            return False
        now = time.monotonic()
        return (self._closed or now - self._last_append >= CHECKPOINT_IDLE_S
                or now - self._checkpointed_at >= CHECKPOINT_EVERY_S
                or sum(s.offset for s in self._sealed) >= CHECKPOINT_BYTES)

    def _wait_s(self) -> float:
        if self._placed_seq > self.stats.checkpoint_seq:
            return max(0.01, CHECKPOINT_IDLE_S - (time.monotonic() - self._last_append))
        return 1.0

    def _checkpoint(self) -> None:
        upto = self._placed_seq
        if upto > self.stats.checkpoint_seq:
            # Files and folder entries first, then the rows (the checkpoint's commit fsyncs the WAL, and
            # with it every row committed before it): only then may the journal forget the records.
            sync_filesystem(self.spool_dir)
            self.store.save_journal_checkpoint(self.name, upto, waiting=len(self._queue))
            self.stats.checkpoint_seq = upto
            self.stats.checkpoints += 1
        self._checkpointed_at = time.monotonic()
        with self._segment_lock:
            reusable = [s for s in self._sealed if s.last_seq <= upto]
            self._sealed = [s for s in self._sealed if s.last_seq > upto]
            for segment in reusable:
                self._keep_spare(segment)
            current = self._current
            if current is not None and current.last_seq <= upto:  # everything in it is placed
                if current.capacity < self.segment_bytes and self._spares:
                    self._delete_segment(current)  # a small one made on the spot: a full-size one is ready
                    self._current = self._next_segment()
                else:
                    current.offset = 0  # write from its start again
            if current is None:
                self._current = self._next_segment()

    def _prepare_spare(self) -> None:
        """Keep a segment ready once the current one is half full, so the receiver never waits for one."""
        with self._segment_lock:
            current = self._current
            needed = not self._spares and current is not None and current.offset > current.capacity // 2
        if needed:
            spare = self._new_segment(self.segment_bytes)
            with self._segment_lock:
                self._spares.append(spare)

    def _open_segment(self, path: Path) -> _Segment:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return _Segment(path, fd, os.fstat(fd).st_size)

    def _new_segment(self, capacity: int) -> _Segment:
        """A zero-filled segment: writing over allocated blocks, an fdatasync flushes the data alone, where
        appending would also commit the file system's journal (the new size and blocks) every time."""
        path = self.folder / f"{uuid.uuid4().hex}.wal"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        zeros = bytes(1 << 20)
        for offset in range(0, capacity, len(zeros)):
            os.pwrite(fd, zeros[:capacity - offset], offset)
        os.fdatasync(fd)
        fsync_dir(self.folder)  # the segment's name must survive, or a replay would not find its records
        return _Segment(path, fd, capacity)

    def _delete_segment(self, segment: _Segment) -> None:
        os.close(segment.fd)
        segment.path.unlink(missing_ok=True)


def recover_other_journals(root: Path, spool_dir: Path, store: JobStore, keep: set[str],
                           min_age_s: float = 0.0) -> int:
    """Replay and remove the journals under `root` that no receiver will open and no live process holds (a
    node that ran more receive processes before, a batch pull that died); returns how many instances they
    held. `min_age_s` leaves journals changed more recently alone: a running node sweeping for abandoned
    journals must not take one that a pull has just made and not yet locked."""
    replayed = 0
    now = time.time()
    for folder in sorted(p for p in root.glob("*") if p.is_dir() and p.name not in keep):
        try:
            if now - folder.stat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:
            continue
        journal = IngestJournal(folder, spool_dir, store)
        try:
            replayed += journal.recover()
        except JournalInUse:
            continue  # a live process's (a batch pull's): it places its own
        journal.close()
        shutil.rmtree(folder)
        store.forget_journal(folder.name)
    return replayed
