"""The job store: SQLite in WAL mode, the floor every stage stands on.

Each stage moves a row from one state to the next in one transaction, so after a crash every series, job
and send resumes from its last committed state. Holds UIDs, paths and states; the spool holds the data.

States
  series: receiving -> complete -> routed | unrouted        (a late instance re-opens it: -> receiving)
  jobs:   queued -> running -> done | failed                 (running has a lease; expired leases requeue)
  sends:  queued -> sent | dead                              (dead after the configured attempts)
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    state TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,
    header TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    series_revision INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    rule TEXT NOT NULL,
    destinations TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    last_error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE(series_uid, series_revision, pipeline)
);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    UNIQUE(job_id, sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS sends_due ON sends(state, next_attempt);
"""


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    calling_ae: str
    state: str
    instances: int
    first_received: float
    last_received: float
    revision: int
    header: dict[str, Any]
    note: str


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    series_revision: int
    pipeline: str
    rule: str
    destinations: list[str]
    state: str
    attempts: int
    last_error: str


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
    last_error: str


def _series(row: sqlite3.Row) -> SeriesRow:
    return SeriesRow(
        row["series_uid"], row["study_uid"], row["calling_ae"], row["state"], row["instances"],
        row["first_received"], row["last_received"], row["revision"], json.loads(row["header"]), row["note"],
    )


def _job(row: sqlite3.Row) -> JobRow:
    return JobRow(
        row["id"], row["series_uid"], row["series_revision"], row["pipeline"], row["rule"],
        json.loads(row["destinations"]), row["state"], row["attempts"], row["last_error"],
    )


def _send(row: sqlite3.Row) -> SendRow:
    return SendRow(
        row["id"], row["job_id"], row["sop_uid"], row["sop_class_uid"], row["path"], row["destination"],
        row["state"], row["attempts"], row["last_error"],
    )


class JobStore:
    """Thread-safe access to the state database: one SQLite connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # executescript manages its own transaction

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

    def record_instance(
        self, *, sop_uid: str, sop_class_uid: str, transfer_syntax_uid: str, series_uid: str, study_uid: str,
        calling_ae: str, path: str, size: int, header: dict[str, Any], now: float | None = None,
    ) -> bool:
        """Record a stored instance; returns True when it re-opened a series that was already processed."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT state FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            reopened = False
            if row is None:
                db.execute(
                    "INSERT INTO series(series_uid, study_uid, calling_ae, state, first_received, last_received,"
                    " header, updated) VALUES (?,?,?,?,?,?,?,?)",
                    (series_uid, study_uid, calling_ae, "receiving", now, now, json.dumps(header), now),
                )
            elif row["state"] == "receiving":
                db.execute("UPDATE series SET last_received=?, updated=? WHERE series_uid=?", (now, now, series_uid))
            else:
                # A late instance: the series is assembled again and re-run; results keep their UIDs
                # (derived from the series and pipeline), so the new ones replace the old ones at the PACS.
                reopened = True
                db.execute(
                    "UPDATE series SET state='receiving', revision=revision+1, last_received=?, updated=?,"
                    " note='re-opened by a late instance' WHERE series_uid=?",
                    (now, now, series_uid),
                )
            db.execute(
                "INSERT INTO instances(sop_uid, series_uid, sop_class_uid, transfer_syntax_uid, path, size, received)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE SET path=excluded.path,"
                " size=excluded.size, received=excluded.received, transfer_syntax_uid=excluded.transfer_syntax_uid",
                (sop_uid, series_uid, sop_class_uid, transfer_syntax_uid, path, size, now),
            )
            db.execute(
                "UPDATE series SET instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?) WHERE series_uid=?",
                (series_uid, series_uid),
            )
        return reopened

    # -- assemble / route ------------------------------------------------------------------------------

    def series_in_state(self, state: str) -> list[SeriesRow]:
        rows = self._db().execute("SELECT * FROM series WHERE state=? ORDER BY first_received", (state,))
        return [_series(r) for r in rows]

    def series(self, series_uid: str) -> SeriesRow | None:
        row = self._db().execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        return _series(row) if row else None

    def all_series(self, limit: int = 200) -> list[SeriesRow]:
        rows = self._db().execute("SELECT * FROM series ORDER BY updated DESC LIMIT ?", (limit,))
        return [_series(r) for r in rows]

    def instance_paths(self, series_uid: str) -> list[str]:
        rows = self._db().execute("SELECT path FROM instances WHERE series_uid=? ORDER BY sop_uid", (series_uid,))
        return [r["path"] for r in rows]

    def route_series(
        self, series: SeriesRow, jobs: list[tuple[str, str, list[str]]], note: str, now: float | None = None,
    ) -> bool:
        """Move a complete series to routed (creating its jobs) or unrouted, in one transaction.

        Does nothing and returns False when the series changed since `series` was read (a new instance
        arrived), so a decision taken on stale data is never committed.
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
            for pipeline, rule, destinations in jobs:
                db.execute(
                    "INSERT OR IGNORE INTO jobs(series_uid, series_revision, pipeline, rule, destinations, state,"
                    " created, updated) VALUES (?,?,?,?,?,?,?,?)",
                    (series_uid, revision, pipeline, rule, json.dumps(destinations), "queued", now, now),
                )
            db.execute(
                "UPDATE series SET state=?, note=?, updated=? WHERE series_uid=?",
                ("routed" if jobs else "unrouted", note, now, series_uid),
            )
        return True

    # -- jobs ------------------------------------------------------------------------------------------

    def claim_job(self, lease_s: float, now: float | None = None) -> JobRow | None:
        """Take the oldest queued job (or one whose lease expired after a crash) and lease it."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state='queued' OR (state='running' AND lease_until < ?)"
                " ORDER BY id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, lease_until=?, updated=? WHERE id=?",
                (now + lease_s, now, row["id"]),
            )
        job = _job(row)
        return JobRow(**{**job.__dict__, "state": "running", "attempts": job.attempts + 1})

    def requeue_running(self, now: float | None = None) -> int:
        """At start-up: jobs a killed process left running go back to the queue. Returns how many."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET state='queued', lease_until=NULL, updated=? WHERE state='running'", (now,)
            )
        return cursor.rowcount

    def finish_job(
        self, job_id: int, results: list[tuple[str, str, str]], destinations: list[str], now: float | None = None,
    ) -> None:
        """Mark a job done and queue each result (sop_uid, sop_class_uid, path) for each destination."""
        now = time.time() if now is None else now
        with self._tx() as db:
            for sop_uid, sop_class_uid, path in results:
                for destination in destinations:
                    db.execute(
                        "INSERT OR IGNORE INTO sends(job_id, sop_uid, sop_class_uid, path, destination, state,"
                        " next_attempt, updated) VALUES (?,?,?,?,?,?,?,?)",
                        (job_id, sop_uid, sop_class_uid, path, destination, "queued", now, now),
                    )
            db.execute(
                "UPDATE jobs SET state='done', lease_until=NULL, last_error='', updated=? WHERE id=?", (now, job_id)
            )

    def fail_job(self, job_id: int, error: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='failed', lease_until=NULL, last_error=?, updated=? WHERE id=?",
                (error[:2000], now, job_id),
            )

    def jobs(self, series_uid: str | None = None, limit: int = 500) -> list[JobRow]:
        if series_uid is None:
            rows = self._db().execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._db().execute("SELECT * FROM jobs WHERE series_uid=? ORDER BY id", (series_uid,))
        return [_job(r) for r in rows]

    # -- sends -----------------------------------------------------------------------------------------

    def due_sends(self, now: float | None = None, limit: int = 500) -> list[SendRow]:
        now = time.time() if now is None else now
        rows = self._db().execute(
            "SELECT * FROM sends WHERE state='queued' AND next_attempt <= ? ORDER BY id LIMIT ?", (now, limit)
        )
        return [_send(r) for r in rows]

    def mark_sent(self, send_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE sends SET state='sent', attempts=attempts+1, last_error='', updated=? WHERE id=?",
                (now, send_id),
            )

    def mark_send_failed(self, send_id: int, error: str, next_attempt: float | None, now: float | None = None) -> None:
        """Record a failed attempt: retried at next_attempt, or dead (dead-letter) when it is None."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE sends SET state=?, attempts=attempts+1, next_attempt=COALESCE(?, next_attempt),"
                " last_error=?, updated=? WHERE id=?",
                ("queued" if next_attempt is not None else "dead", next_attempt, error[:2000], now, send_id),
            )

    def sends(self, job_id: int | None = None) -> list[SendRow]:
        if job_id is None:
            rows = self._db().execute("SELECT * FROM sends ORDER BY id")
        else:
            rows = self._db().execute("SELECT * FROM sends WHERE job_id=? ORDER BY id", (job_id,))
        return [_send(r) for r in rows]
