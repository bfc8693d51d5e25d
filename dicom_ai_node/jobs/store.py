"""The job store: SQLite in WAL mode, the floor every stage stands on.

Each stage moves a row from one state to the next in one transaction, so after a crash (kill -9, power
loss) every series, job and send resumes from its last committed state. Holds UIDs, paths and states; the
spool holds the data. No folder markers: the database is the only state an operator ever clears.

States
  series: receiving -> routed | unrouted            (a late instance re-opens it: -> receiving, revision+1)
  jobs:   queued -> running -> sending -> done      (running has a lease; after a crash it is re-queued)
                            \\-> failed             (pipeline or validation error; the reason is kept)
                                 sending -> dead-letter when a send is dead; `replay` sends it again
          input refused by QC with qc.no_result_sr: its no-result SR is sent as above, the reason in last_error
  sends:  queued -> sent | dead                     (dead after the maximum age or attempts)
  destinations: a circuit breaker per destination (closed, or open until a time)
  batch runs:   running -> done | failed | stopped   (a run's heartbeat shows it alive; one run per job)
  batch studies: queued -> pulling -> done | failed | waiting (not in the source yet) | skipped (no series to pull)
                 (done: pulled in full, never pulled again from that source; the others: looked at again)
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

from dicom_ai_node import jsontext

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS associations (
    id TEXT PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    address TEXT NOT NULL,
    started REAL NOT NULL,
    released_at REAL,
    instances INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    last_association TEXT,
    expected_instances INTEGER,
    revision INTEGER NOT NULL DEFAULT 1,
    header TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    purged INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    header TEXT NOT NULL DEFAULT '{}',
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    series_revision INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'pipeline',
    pipeline TEXT NOT NULL,
    rule TEXT NOT NULL,
    destinations TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    last_error TEXT NOT NULL DEFAULT '',
    stages TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE(series_uid, series_revision, pipeline)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    next_attempt REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    last_status TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    UNIQUE(job_id, sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS sends_due ON sends(state, next_attempt);
CREATE TABLE IF NOT EXISTS journals (
    name TEXT PRIMARY KEY,
    checkpoint_seq INTEGER NOT NULL,
    waiting INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batch_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    source TEXT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    finished REAL,
    found INTEGER NOT NULL DEFAULT 0,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS batch_runs_job ON batch_runs(job, state);
CREATE TABLE IF NOT EXISTS batch_studies (
    run_id INTEGER NOT NULL REFERENCES batch_runs(id),
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    series_total INTEGER NOT NULL DEFAULT 0,
    series_done INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    warning INTEGER NOT NULL DEFAULT 0,
    remaining INTEGER,
    last_error TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (run_id, study_uid)
);
CREATE INDEX IF NOT EXISTS batch_studies_study ON batch_studies(study_uid, state);
CREATE TABLE IF NOT EXISTS destinations (
    name TEXT PRIMARY KEY,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    open_until REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
"""

UNFINISHED_JOB_STATES = ("queued", "running", "sending", "dead-letter")


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    calling_ae: str
    modality: str
    state: str
    instances: int
    first_received: float
    last_received: float
    released_at: float | None  # release time of the association that delivered the latest instance
    expected_instances: int | None
    revision: int
    header: dict[str, Any]
    note: str
    purged: bool


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    series_revision: int
    kind: str
    pipeline: str
    rule: str
    destinations: list[str]
    state: str
    attempts: int
    last_error: str
    stages: dict[str, float]
    created: float
    updated: float


@dataclass(frozen=True)
class SendRow:
    id: int
    job_id: int
    sop_uid: str
    sop_class_uid: str
    path: str
    destination: str
    state: str
    attempts: int
    created: float
    next_attempt: float
    last_error: str
    last_status: str


@dataclass(frozen=True)
class DestinationRow:
    name: str
    consecutive_failures: int
    open_until: float
    last_error: str


@dataclass(frozen=True)
class BatchRunRow:
    id: int
    job: str
    source: str
    trigger: str  # "schedule" | "command"
    state: str
    started: float
    heartbeat: float
    finished: float | None
    found: int  # studies the run took up to pull (matched, at most max_studies, less those pulled before)
    note: str


@dataclass(frozen=True)
class BatchStudyRow:
    run_id: int
    study_uid: str
    state: str
    series_total: int
    series_done: int
    completed: int  # sub-operations of the C-MOVEs/C-GETs: instances delivered, not delivered, delivered with
    # a warning
    failed: int
    warning: int
    remaining: int | None  # of the series being pulled, as the PACS last reported
    last_error: str


@dataclass(frozen=True)
class PlannedJob:
    """A job routing decided for a complete series: run a pipeline, or forward the received instances."""

    kind: str  # "pipeline" | "forward"
    pipeline: str  # the pipeline's name; "forward" for forward jobs
    rule: str
    destinations: list[str]
    forward_sop_uids: tuple[str, ...] = ()  # forward jobs: the instances to send (after the rule's filter)


@dataclass(frozen=True)
class JournalRow:
    """An ingest journal as of its last checkpoint or failure (receive/journal.py)."""

    name: str
    checkpoint_seq: int
    waiting: int  # instances acknowledged and journalled, not yet placed in the spool and recorded
    last_error: str  # why placing them fails ('' when it does not)
    updated: float


@dataclass(frozen=True)
class InstanceRow:
    sop_uid: str
    sop_class_uid: str
    path: str
    header: dict[str, Any]


@dataclass(frozen=True)
class ReceivedInstance:
    """An instance the receiver has made durable in the spool, to be recorded in the store."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_uid: str
    study_uid: str
    calling_ae: str
    path: str
    size: int
    header: dict[str, Any]
    association_id: str | None = None
    expected_instances: int | None = None
    received: float = field(default_factory=time.time)

    @cached_property
    def header_json(self) -> str:
        """The header as JSON, made once: the journal's record and the store's row both carry it."""
        return jsontext.dumps(self.header)


def _series(row: sqlite3.Row) -> SeriesRow:
    return SeriesRow(
        row["series_uid"], row["study_uid"], row["calling_ae"], row["modality"], row["state"], row["instances"],
        row["first_received"], row["last_received"], row["released_at"], row["expected_instances"],
        row["revision"], json.loads(row["header"]), row["note"], bool(row["purged"]),
    )


def _job(row: sqlite3.Row) -> JobRow:
    return JobRow(
        row["id"], row["series_uid"], row["series_revision"], row["kind"], row["pipeline"], row["rule"],
        json.loads(row["destinations"]), row["state"], row["attempts"], row["last_error"], json.loads(row["stages"]),
        row["created"], row["updated"],
    )


def _send(row: sqlite3.Row) -> SendRow:
    return SendRow(
        row["id"], row["job_id"], row["sop_uid"], row["sop_class_uid"], row["path"], row["destination"],
        row["state"], row["attempts"], row["created"], row["next_attempt"], row["last_error"], row["last_status"],
    )


def _batch_run(row: sqlite3.Row) -> BatchRunRow:
    return BatchRunRow(*(row[name] for name in BatchRunRow.__dataclass_fields__))


def _batch_study(row: sqlite3.Row) -> BatchStudyRow:
    return BatchStudyRow(*(row[name] for name in BatchStudyRow.__dataclass_fields__))


SERIES_SELECT = (
    "SELECT s.*, a.released_at FROM series s LEFT JOIN associations a ON a.id = s.last_association"
)


class JobStore:
    """Thread-safe access to the state database: one SQLite connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._db()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: state database schema {version}, this node needs {SCHEMA_VERSION}")
        db.executescript(SCHEMA)  # executescript manages its own transaction
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed state survives a power cut
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- receive ---------------------------------------------------------------------------------------

    def association_opened(self, association_id: str, calling_ae: str, address: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO associations(id, calling_ae, address, started) VALUES (?,?,?,?)",
                       (association_id, calling_ae, address, now))

    def association_released(self, association_id: str, now: float | None = None) -> None:
        """A clean A-RELEASE: the sender says it is done, which shortens the wait for its series."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE associations SET released_at=? WHERE id=?", (now, association_id))

    def record_instance(
        self, *, sop_uid: str, sop_class_uid: str, transfer_syntax_uid: str, series_uid: str, study_uid: str,
        calling_ae: str, path: str, size: int, header: dict[str, Any], association_id: str | None = None,
        expected_instances: int | None = None, now: float | None = None,
    ) -> bool:
        """Record a stored instance; returns True when it re-opened a series that was already processed."""
        instance = ReceivedInstance(sop_uid, sop_class_uid, transfer_syntax_uid, series_uid, study_uid, calling_ae,
                                    path, size, header, association_id, expected_instances,
                                    time.time() if now is None else now)
        with self._tx() as db:
            return self._record(db, instance)

    def record_instances(self, batch: list[ReceivedInstance], durable: bool = True) -> list[bool | Exception]:
        """Record several stored instances in one transaction. Each gets its outcome: re-opened (bool) or
        the error. When the transaction fails, each instance is retried alone, so one bad row fails only
        its own instance. durable=False skips the WAL fsync: for the ingest journal, which already holds
        the instances and makes the rows durable at its checkpoint (`save_journal_checkpoint`)."""
        db = self._db()
        if not durable:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            return self._record_all(batch)
        finally:
            if not durable:
                db.execute("PRAGMA synchronous=FULL")

    def _record_all(self, batch: list[ReceivedInstance]) -> list[bool | Exception]:
        try:
            with self._tx() as db:
                return [self._record(db, instance) for instance in batch]
        except Exception as exc:  # noqa: BLE001 - retried one by one below, each with its own outcome
            if len(batch) == 1:
                return [exc]
        outcomes: list[bool | Exception] = []
        for instance in batch:
            try:
                with self._tx() as db:
                    outcomes.append(self._record(db, instance))
            except Exception as exc:  # noqa: BLE001 - handed back with its instance
                outcomes.append(exc)
        return outcomes

    def instance_recorded(self, sop_uid: str, path: str, size: int) -> bool:
        """Whether this very file (path and size) is recorded for the instance already."""
        row = self._db().execute("SELECT path, size FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
        return row is not None and row["path"] == path and row["size"] == size

    def journal_checkpoint(self, journal: str) -> int:
        """An ingest journal's last checkpoint: every instance journalled up to it is placed and durable."""
        row = self._db().execute("SELECT checkpoint_seq FROM journals WHERE name=?", (journal,)).fetchone()
        return 0 if row is None else int(row["checkpoint_seq"])

    def save_journal_checkpoint(self, journal: str, seq: int, waiting: int = 0, now: float | None = None) -> None:
        """Commit the checkpoint with a WAL fsync, which also makes every row committed before it durable.
        `waiting`: instances journalled after it and not yet placed; a checkpoint clears the last error."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("INSERT INTO journals(name, checkpoint_seq, waiting, last_error, updated) VALUES (?,?,?,'',?)"
                       " ON CONFLICT(name) DO UPDATE SET checkpoint_seq=excluded.checkpoint_seq,"
                       " waiting=excluded.waiting, last_error='', updated=excluded.updated",
                       (journal, seq, waiting, now))

    def journal_trouble(self, journal: str, waiting: int, error: str, now: float | None = None) -> None:
        """Show that a journal's instances are not being placed, and why (for `dicom-ai-node status`)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE journals SET waiting=?, last_error=?, updated=? WHERE name=?",
                       (waiting, error, now, journal))

    def journals(self) -> list[JournalRow]:
        rows = self._db().execute("SELECT * FROM journals ORDER BY name").fetchall()
        return [JournalRow(r["name"], r["checkpoint_seq"], r["waiting"], r["last_error"], r["updated"]) for r in rows]

    def forget_journal(self, journal: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM journals WHERE name=?", (journal,))

    @staticmethod
    def _record(db: sqlite3.Connection, instance: ReceivedInstance) -> bool:
        i, now = instance, instance.received
        header = i.header_json
        row = db.execute("SELECT state FROM series WHERE series_uid=?", (i.series_uid,)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO series(series_uid, study_uid, calling_ae, modality, state, first_received,"
                " last_received, last_association, header, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (i.series_uid, i.study_uid, i.calling_ae, str(i.header.get("Modality", "")), "receiving", now, now,
                 i.association_id, header, now),
            )
        is_new = db.execute(
            "INSERT INTO instances(sop_uid, series_uid, sop_class_uid, transfer_syntax_uid, path, size, header,"
            " received) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO NOTHING",
            (i.sop_uid, i.series_uid, i.sop_class_uid, i.transfer_syntax_uid, i.path, i.size, header, now),
        ).rowcount == 1
        if not is_new:  # sent again: the new copy replaces the old one
            db.execute("UPDATE instances SET path=?, size=?, received=?, header=?, transfer_syntax_uid=?"
                       " WHERE sop_uid=?", (i.path, i.size, now, header, i.transfer_syntax_uid, i.sop_uid))
        # Counted incrementally: a COUNT(*) per instance would make a 5000-slice series quadratic.
        reopened = row is not None and row["state"] != "receiving"
        if reopened:
            # A late instance: the series is assembled again and re-run; results keep their UIDs
            # (derived from the series and pipeline), so the new ones replace the old ones at the PACS.
            db.execute(
                "UPDATE series SET state='receiving', revision=revision+1, last_received=?, last_association=?,"
                " updated=?, purged=0, note='re-opened by a late instance', instances=instances+?,"
                " expected_instances=COALESCE(?, expected_instances) WHERE series_uid=?",
                (now, i.association_id, now, int(is_new), i.expected_instances, i.series_uid),
            )
        else:
            db.execute(
                "UPDATE series SET last_received=?, last_association=?, updated=?, instances=instances+?,"
                " expected_instances=COALESCE(?, expected_instances) WHERE series_uid=?",
                (now, i.association_id, now, int(is_new), i.expected_instances, i.series_uid),
            )
        if i.association_id is not None:
            db.execute("UPDATE associations SET instances=instances+1 WHERE id=?", (i.association_id,))
        return reopened

    # -- assemble / route ------------------------------------------------------------------------------

    def series_in_state(self, state: str) -> list[SeriesRow]:
        rows = self._db().execute(f"{SERIES_SELECT} WHERE s.state=? ORDER BY s.first_received", (state,))
        return [_series(r) for r in rows]

    def series(self, series_uid: str) -> SeriesRow | None:
        row = self._db().execute(f"{SERIES_SELECT} WHERE s.series_uid=?", (series_uid,)).fetchone()
        return _series(row) if row else None

    def series_of_study(self, study_uid: str) -> list[SeriesRow]:
        rows = self._db().execute(f"{SERIES_SELECT} WHERE s.study_uid=? ORDER BY s.first_received", (study_uid,))
        return [_series(r) for r in rows]

    def all_series(self, limit: int = 200) -> list[SeriesRow]:
        rows = self._db().execute(f"{SERIES_SELECT} ORDER BY s.updated DESC LIMIT ?", (limit,))
        return [_series(r) for r in rows]

    def instances(self, series_uid: str) -> list[InstanceRow]:
        rows = self._db().execute(
            "SELECT sop_uid, sop_class_uid, path, header FROM instances WHERE series_uid=? ORDER BY sop_uid",
            (series_uid,),
        )
        return [InstanceRow(r["sop_uid"], r["sop_class_uid"], r["path"], jsontext.loads(r["header"])) for r in rows]

    def count_hints_since(self, series_uid: str, after_rowid: int, keys: Sequence[str]) -> tuple[int, list[list[Any]]]:
        """The highest rowid of the series' instances recorded after `after_rowid` (or `after_rowid`), and the
        distinct lists of their header values of `keys` (None where a header lacks one): lets a poller read
        only what is new, and SQLite picks the values out of each header rather than Python decoding it
        whole (an instance sent again keeps its row, so its new header is not seen)."""
        paths = ", ".join("?" for _ in keys)
        rows = self._db().execute(
            f"SELECT MAX(rowid) AS last, json_extract(header, {paths}) AS hints FROM instances"
            " WHERE series_uid=? AND rowid>? GROUP BY hints",
            (*[f'$."{key}"' for key in keys], series_uid, after_rowid),
        ).fetchall()
        last = max((int(r["last"]) for r in rows), default=after_rowid)
        return last, [json.loads(r["hints"]) if len(keys) > 1 else [r["hints"]] for r in rows]

    def instance_paths(self, series_uid: str) -> list[str]:
        return [i.path for i in self.instances(series_uid)]

    def route_series(
        self, series: SeriesRow, jobs: list[PlannedJob], note: str, now: float | None = None,
    ) -> bool:
        """Move a complete series to routed (creating its jobs) or unrouted, in one transaction.

        Does nothing and returns False when the series changed since `series` was read (a new instance
        arrived), so a decision taken on stale data is never committed. Forward jobs queue their sends
        (the received instances themselves) at once.
        """
        now = time.time() if now is None else now
        series_uid, revision = series.series_uid, series.revision
        with self._tx() as db:
            row = db.execute(
                "SELECT state, revision, last_received FROM series WHERE series_uid=?", (series_uid,)
            ).fetchone()
            if row is None or (row["state"], row["revision"], row["last_received"]) != (
                "receiving", revision, series.last_received
            ):
                return False
            for job in jobs:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO jobs(series_uid, series_revision, kind, pipeline, rule, destinations,"
                    " state, created, updated) VALUES (?,?,?,?,?,?,?,?,?)",
                    (series_uid, revision, job.kind, job.pipeline, job.rule, json.dumps(job.destinations), "queued",
                     now, now),
                )
                if job.kind == "forward" and cursor.rowcount:
                    self._queue_forward(db, cursor.lastrowid, job, now)
            db.execute(
                "UPDATE series SET state=?, note=?, updated=? WHERE series_uid=?",
                ("routed" if jobs else "unrouted", note, now, series_uid),
            )
        return True

    @staticmethod
    def _queue_forward(db: sqlite3.Connection, job_id: int, job: PlannedJob, now: float) -> None:
        instances = [db.execute("SELECT sop_uid, sop_class_uid, path FROM instances WHERE sop_uid=?",
                                (uid,)).fetchone() for uid in job.forward_sop_uids]
        instances = [i for i in instances if i is not None]
        for instance in instances:
            for destination in job.destinations:
                db.execute(
                    "INSERT OR IGNORE INTO sends(job_id, sop_uid, sop_class_uid, path, destination, state, created,"
                    " next_attempt, updated) VALUES (?,?,?,?,?,?,?,?,?)",
                    (job_id, instance["sop_uid"], instance["sop_class_uid"], instance["path"], destination, "queued",
                     now, now, now),
                )
        db.execute("UPDATE jobs SET state=?, updated=? WHERE id=?",
                   ("sending" if instances and job.destinations else "done", now, job_id))

    # -- jobs ------------------------------------------------------------------------------------------

    def claim_job(self, lease_s: float, now: float | None = None) -> JobRow | None:
        """Take the oldest queued pipeline job (or one whose lease expired) and lease it."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE kind='pipeline' AND ((state='queued' AND (lease_until IS NULL OR lease_until <= ?))"
                " OR (state='running' AND lease_until < ?)) ORDER BY id LIMIT 1",
                (now, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, lease_until=?, updated=? WHERE id=?",
                (now + lease_s, now, row["id"]),
            )
            row = db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return _job(row)

    def requeue_running(self, now: float | None = None) -> int:
        """At start-up: jobs a killed process left running go back to the queue. Returns how many."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET state='queued', lease_until=NULL, updated=? WHERE state='running'", (now,)
            )
        return cursor.rowcount

    def finish_job(
        self, job_id: int, sends: list[tuple[str, str, str, str]], stages: dict[str, float] | None = None,
        now: float | None = None, note: str = "",
    ) -> None:
        """Record a job's results and queue them: sends are (sop_uid, sop_class_uid, path, destination).
        `note` is kept as the job's last_error: why a job whose input was refused sent a no-result SR."""
        now = time.time() if now is None else now
        with self._tx() as db:
            for sop_uid, sop_class_uid, path, destination in sends:
                db.execute(
                    "INSERT OR IGNORE INTO sends(job_id, sop_uid, sop_class_uid, path, destination, state,"
                    " created, next_attempt, updated) VALUES (?,?,?,?,?,?,?,?,?)",
                    (job_id, sop_uid, sop_class_uid, path, destination, "queued", now, now, now),
                )
            db.execute(
                "UPDATE jobs SET state=?, lease_until=NULL, last_error=?, stages=?, updated=? WHERE id=?",
                ("sending" if sends else "done", note[:2000], json.dumps(stages or {}), now, job_id),
            )

    def fail_job(self, job_id: int, error: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='failed', lease_until=NULL, last_error=?, updated=? WHERE id=?",
                (error[:2000], now, job_id),
            )

    def requeue_job(self, job_id: int, error: str, now: float | None = None) -> None:
        """Put a job back in the queue after its worker died (not the pipeline's fault)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='queued', lease_until=NULL, last_error=?, updated=? WHERE id=?",
                       (error[:2000], now, job_id))

    def defer_job(self, job_id: int, reason: str, until: float, now: float | None = None) -> None:
        """Back to the queue, not claimable before `until`, the attempt not counted: the device had no room
        for it (memory guard); `reason` shows in status meanwhile."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='queued', attempts=MAX(attempts-1, 0), lease_until=?, last_error=?,"
                       " updated=? WHERE id=?", (until, reason[:2000], now, job_id))

    def job(self, job_id: int) -> JobRow | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, series_uid: str | None = None, limit: int = 500) -> list[JobRow]:
        if series_uid is None:
            rows = self._db().execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._db().execute("SELECT * FROM jobs WHERE series_uid=? ORDER BY id", (series_uid,))
        return [_job(r) for r in rows]

    # -- sends -----------------------------------------------------------------------------------------

    def due_sends(self, destination: str | None = None, now: float | None = None, limit: int = 500) -> list[SendRow]:
        now = time.time() if now is None else now
        query = "SELECT * FROM sends WHERE state='queued' AND next_attempt <= ?"
        args: tuple[Any, ...] = (now,)
        if destination is not None:
            query += " AND destination=?"
            args += (destination,)
        rows = self._db().execute(query + " ORDER BY id LIMIT ?", args + (limit,))
        return [_send(r) for r in rows]

    def due_destinations(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        rows = self._db().execute(
            "SELECT DISTINCT destination FROM sends WHERE state='queued' AND next_attempt <= ?", (now,))
        return [r["destination"] for r in rows]

    def _settle_job(self, db: sqlite3.Connection, job_id: int, now: float) -> None:
        """A sending job is done when every send is sent, dead-letter when none is queued and one is dead."""
        counts = {r["state"]: r["n"] for r in db.execute(
            "SELECT state, COUNT(*) AS n FROM sends WHERE job_id=? GROUP BY state", (job_id,))}
        if counts.get("queued"):
            state = "sending"
        elif counts.get("dead"):
            state = "dead-letter"
        else:
            state = "done"
        db.execute("UPDATE jobs SET state=?, updated=? WHERE id=? AND state IN ('sending', 'dead-letter')",
                   (state, now, job_id))

    def mark_sent(self, send_id: int, status: str = "", now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE sends SET state='sent', attempts=attempts+1, last_error='', last_status=?, updated=?"
                " WHERE id=?", (status, now, send_id))
            self._settle_job(db, db.execute("SELECT job_id FROM sends WHERE id=?", (send_id,)).fetchone()[0], now)

    def mark_send_failed(self, send_id: int, error: str, next_attempt: float | None, status: str = "",
                         now: float | None = None) -> None:
        """Record a failed attempt: retried at next_attempt, or dead (dead-letter) when it is None."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE sends SET state=?, attempts=attempts+1, next_attempt=COALESCE(?, next_attempt),"
                " last_error=?, last_status=?, updated=? WHERE id=?",
                ("queued" if next_attempt is not None else "dead", next_attempt, error[:2000], status, now, send_id),
            )
            self._settle_job(db, db.execute("SELECT job_id FROM sends WHERE id=?", (send_id,)).fetchone()[0], now)

    def expire_sends(self, max_age_s: float, now: float | None = None) -> list[SendRow]:
        """Dead-letter the queued sends older than max_age_s, attempted or not (e.g. while a circuit is open)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT * FROM sends WHERE state='queued' AND created <= ?",
                              (now - max_age_s,)).fetchall()
            for row in rows:
                db.execute("UPDATE sends SET state='dead', last_error=?, updated=? WHERE id=?",
                           ((row["last_error"] or "not attempted") + f" (older than {max_age_s:g} s)", now, row["id"]))
                self._settle_job(db, row["job_id"], now)
        return [_send(r) for r in rows]

    def replay(self, study_uid: str | None = None, destination: str | None = None, now: float | None = None) -> int:
        """Queue dead sends again (all, or of one study and/or destination) with fresh age and attempts."""
        now = time.time() if now is None else now
        query = ("SELECT d.id, d.job_id FROM sends d JOIN jobs j ON j.id = d.job_id JOIN series s"
                 " ON s.series_uid = j.series_uid WHERE d.state='dead'")
        args: list[Any] = []
        if study_uid is not None:
            query += " AND s.study_uid=?"
            args.append(study_uid)
        if destination is not None:
            query += " AND d.destination=?"
            args.append(destination)
        with self._tx() as db:
            rows = db.execute(query, args).fetchall()
            for row in rows:
                db.execute("UPDATE sends SET state='queued', attempts=0, created=?, next_attempt=?, updated=?"
                           " WHERE id=?", (now, now, now, row["id"]))
                db.execute("UPDATE jobs SET state='sending', updated=? WHERE id=?", (now, row["job_id"]))
        return len(rows)

    def sends(self, job_id: int | None = None) -> list[SendRow]:
        if job_id is None:
            rows = self._db().execute("SELECT * FROM sends ORDER BY id")
        else:
            rows = self._db().execute("SELECT * FROM sends WHERE job_id=? ORDER BY id", (job_id,))
        return [_send(r) for r in rows]

    # -- destinations (circuit breakers) ---------------------------------------------------------------

    def destination(self, name: str) -> DestinationRow:
        row = self._db().execute("SELECT * FROM destinations WHERE name=?", (name,)).fetchone()
        if row is None:
            return DestinationRow(name, 0, 0.0, "")
        return DestinationRow(row["name"], row["consecutive_failures"], row["open_until"], row["last_error"])

    def destinations(self) -> list[DestinationRow]:
        rows = self._db().execute("SELECT * FROM destinations ORDER BY name")
        return [DestinationRow(r["name"], r["consecutive_failures"], r["open_until"], r["last_error"]) for r in rows]

    def record_destination(self, name: str, failures: int, open_until: float, error: str,
                           now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "INSERT INTO destinations(name, consecutive_failures, open_until, last_error, updated)"
                " VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET consecutive_failures=excluded.consecutive_failures,"
                " open_until=excluded.open_until, last_error=excluded.last_error, updated=excluded.updated",
                (name, failures, open_until, error[:2000], now),
            )

    # -- batch pulls (worklist/batch.py) ----------------------------------------------------------------

    def start_batch_run(self, job: str, source: str, trigger: str, stale_after_s: float,
                        now: float | None = None) -> BatchRunRow | None:
        """A new running run of `job`, or None while another run of it is alive (its heartbeat younger than
        `stale_after_s`); a run whose heartbeat is older died with its process and is marked stopped."""
        now = time.time() if now is None else now
        with self._tx() as db:
            alive = db.execute("SELECT id FROM batch_runs WHERE job=? AND state='running' AND heartbeat>=?",
                               (job, now - stale_after_s)).fetchone()
            if alive is not None:
                return None
            db.execute("UPDATE batch_runs SET state='stopped', finished=?, note='the process running it stopped'"
                       " WHERE job=? AND state='running'", (now, job))
            run_id = db.execute("INSERT INTO batch_runs(job, source, trigger, state, started, heartbeat)"
                                " VALUES (?,?,?,'running',?,?)", (job, source, trigger, now, now)).lastrowid
        return self.batch_run(run_id)

    def batch_run(self, run_id: int) -> BatchRunRow:
        return _batch_run(self._db().execute("SELECT * FROM batch_runs WHERE id=?", (run_id,)).fetchone())

    def batch_runs(self, limit: int = 20, job: str | None = None) -> list[BatchRunRow]:
        """The latest runs (of `job`), newest first."""
        if job is None:
            rows = self._db().execute("SELECT * FROM batch_runs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._db().execute("SELECT * FROM batch_runs WHERE job=? ORDER BY id DESC LIMIT ?", (job, limit))
        return [_batch_run(r) for r in rows]

    def finish_batch_run(self, run_id: int, state: str, note: str = "", now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE batch_runs SET state=?, note=?, finished=?, heartbeat=? WHERE id=?",
                       (state, note[:2000], now, now, run_id))

    def queue_batch_studies(self, run_id: int, study_uids: Sequence[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE batch_runs SET found=?, heartbeat=? WHERE id=?", (len(study_uids), now, run_id))
            db.executemany("INSERT OR IGNORE INTO batch_studies(run_id, study_uid, state, updated)"
                           " VALUES (?,?,'queued',?)", [(run_id, uid, now) for uid in study_uids])

    def pulled_studies(self, source: str, study_uids: Sequence[str]) -> set[str]:
        """Those of `study_uids` that a batch run already pulled in full from `source`."""
        found: set[str] = set()
        for start in range(0, len(study_uids), 500):
            chunk = list(study_uids[start:start + 500])
            rows = self._db().execute(
                "SELECT s.study_uid FROM batch_studies s JOIN batch_runs r ON r.id = s.run_id WHERE r.source=?"
                f" AND s.state='done' AND s.study_uid IN ({','.join('?' * len(chunk))})", (source, *chunk))
            found.update(r["study_uid"] for r in rows)
        return found

    def update_batch_study(self, run_id: int, study_uid: str, now: float | None = None, **values: Any) -> None:
        """Set the columns `values` (state, series_total, series_done, completed, failed, warning, remaining,
        last_error) of one study of a run; beats the run's heartbeat."""
        now = time.time() if now is None else now
        unknown = set(values) - (set(BatchStudyRow.__dataclass_fields__) - {"run_id", "study_uid"})
        if unknown:
            raise ValueError(f"not a column of a batch study: {sorted(unknown)}")
        if "last_error" in values:
            values["last_error"] = str(values["last_error"])[:2000]
        columns = ", ".join(f"{k}=?" for k in values)
        with self._tx() as db:
            db.execute(f"UPDATE batch_studies SET {columns}, updated=? WHERE run_id=? AND study_uid=?",
                       (*values.values(), now, run_id, study_uid))
            db.execute("UPDATE batch_runs SET heartbeat=? WHERE id=?", (now, run_id))

    def batch_studies(self, run_id: int) -> list[BatchStudyRow]:
        rows = self._db().execute("SELECT * FROM batch_studies WHERE run_id=? ORDER BY rowid", (run_id,))
        return [_batch_study(r) for r in rows]

    # -- retention -------------------------------------------------------------------------------------

    def purgeable_series(self, older_than: float) -> list[SeriesRow]:
        """Series finished before `older_than` whose jobs are all finished: their spool data may go."""
        placeholders = ",".join("?" * len(UNFINISHED_JOB_STATES))
        rows = self._db().execute(
            f"{SERIES_SELECT} WHERE s.state IN ('routed', 'unrouted') AND s.purged=0 AND s.updated < ?"
            f" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state IN ({placeholders}))",
            (older_than, *UNFINISHED_JOB_STATES),
        )
        return [_series(r) for r in rows]

    def finished_jobs(self, older_than: float) -> list[JobRow]:
        """Jobs done or failed before `older_than`: their result files are no longer needed for a send."""
        rows = self._db().execute(
            "SELECT * FROM jobs WHERE kind='pipeline' AND state IN ('done', 'failed') AND updated < ?", (older_than,))
        return [_job(r) for r in rows]

    def mark_purged(self, series_uid: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE series SET purged=1, note='spool data removed by retention' WHERE series_uid=?"
                       " AND state IN ('routed', 'unrouted')", (series_uid,))
