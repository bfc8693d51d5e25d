"""One run of a batch job: find the studies at the source (or in a worklist), pull each one's series into
the node (C-MOVE or C-GET), and keep every study's progress in the job store, where `dicom-ai-node status`
and `batch list` show it.

A run is one association with the source. Studies pulled in full earlier from the same source are left out
(nothing is pulled or processed twice), unless the operator asks again; a study that failed is tried again
by the next run. The pulled instances arrive over the node's own receive path, which makes them durable and
completes and routes their series as if the PACS had pushed them.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Callable, Iterator

from pydicom.dataset import Dataset

from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import BatchJob, NodeConfig, Peer
from dicom_ai_node.jobs.store import BatchRunRow, JobStore
from dicom_ai_node.worklist.get import GetReceiver
from dicom_ai_node.worklist.qr import MoveProgress, QueryRetrieve, QueryRetrieveError
from dicom_ai_node.worklist.query import (
    SeriesToPull,
    answered_uid, series_identifier, series_to_pull, studies_found, study_identifier, study_summary,
    worklist_identifier,
)

log = logging.getLogger("dicom_ai_node.worklist")

# A running run beats its heartbeat at every study and progress update (at least every PROGRESS_EVERY_S
# while a move delivers); one silent for this long belongs to a process that died, and no longer blocks
# the next run of its job.
STALE_AFTER_S = 300.0
PROGRESS_EVERY_S = 1.0
REPORT_EVERY_S = 5.0  # `batch run`'s line about a series still moving


class BatchError(RuntimeError):
    """A batch run that cannot start: an unknown job, or one already running."""


@dataclass(frozen=True)
class StudyPull:
    """What pulling one study came to."""

    study_uid: str
    delivered: int  # instances
    error: str = ""
    waiting: bool = False  # the source has no series of it yet


@dataclass(frozen=True)
class FoundStudies:
    """The studies a run takes (in the source's order, at most max_studies), and which it leaves."""

    uids: list[str]
    pulled_before: set[str]
    summaries: dict[str, str]  # study UID -> modalities and count, as the source gave them
    text: str  # "3 studies matched, 1 pulled before"

    @property
    def todo(self) -> list[str]:
        return [uid for uid in self.uids if uid not in self.pulled_before]


def _nothing(_: str) -> None:
    pass


class BatchRunner:
    def __init__(self, config: NodeConfig, store: JobStore, audit: AuditLog) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self._active: set[QueryRetrieve] = set()
        self._lock = threading.Lock()

    def abort_active(self) -> None:
        """Abort the associations of the runs in progress (the node is stopping): their studies are left
        for the next run, which pulls what is not done."""
        with self._lock:
            active = list(self._active)
        for qr in active:
            qr.abort()

    def job(self, name: str) -> BatchJob:
        job = self.config.batch_job(name)
        if job is None:
            known = ", ".join(j.name for j in self.config.batch) or "none configured"
            raise BatchError(f"no batch job named {name!r} (batch jobs: {known})")
        return job

    def run(self, name: str, trigger: str = "command", again: bool = False,
            report: Callable[[str], None] = _nothing, stop: threading.Event | None = None) -> BatchRunRow:
        """Run batch job `name` to its end; returns its run as recorded. `again` pulls studies pulled before
        too; `report` gets a line at every step (the command prints them); `stop` ends the run early."""
        job = self.job(name)
        stop = stop or threading.Event()
        run = self.store.start_batch_run(job.name, job.source, trigger, STALE_AFTER_S)
        if run is None:
            raise BatchError(f"batch job {job.name!r} is already running (see `dicom-ai-node status`)")
        log.info("batch run #%d of %s (%s): querying %s", run.id, job.name, trigger, job.source)
        self.audit.write("batch-run-started", run_id=run.id, job=job.name, source=job.source, trigger=trigger)
        state, note = "failed", ""
        try:
            state, note = self._run(run.id, job, again, report, stop)
        except QueryRetrieveError as exc:
            note = str(exc)
        except Exception as exc:  # noqa: BLE001 - the run is recorded as failed, the caller goes on
            log.exception("batch run #%d of %s failed", run.id, job.name)
            note = f"internal error ({type(exc).__name__}); see the node's log"
        finally:
            self.store.finish_batch_run(run.id, state, note)
            self.audit.write("batch-run-finished", run_id=run.id, job=job.name, state=state, note=note)
            level = {"done": logging.INFO, "stopped": logging.WARNING}.get(state, logging.ERROR)
            log.log(level, "batch run #%d of %s %s: %s", run.id, job.name, state, note)
            report(f"run #{run.id} {state}: {note}")
        return self.store.batch_run(run.id)

    def preview(self, name: str, again: bool = False) -> tuple[str, list[tuple[str, str, bool]]]:
        """What a run of `name` would pull now, without pulling or recording anything: the line a run
        starts with, and per study (UID, what the source says of it, pulled before)."""
        job = self.job(name)
        with QueryRetrieve(self.config, self._peer(job.source)) as qr:
            found = self._found(qr, job, again)
        return found.text, [(uid, found.summaries.get(uid, ""), uid in found.pulled_before) for uid in found.uids]

    def _run(self, run_id: int, job: BatchJob, again: bool, report: Callable[[str], None],
             stop: threading.Event) -> tuple[str, str]:
        peer = self._peer(job.source)
        with ExitStack() as stack:
            getter = None
            if job.retrieve == "get":
                getter = stack.enter_context(GetReceiver(self.config, self.store, self.audit, peer))
            qr = stack.enter_context(QueryRetrieve(self.config, peer, get_receiver=getter))
            stack.enter_context(self._tracked(qr))
            found = self._found(qr, job, again)
            todo = found.todo
            self.store.queue_batch_studies(run_id, todo)
            report(f"run #{run_id}: {found.text}; pulling {len(todo)}")
            pulls = []
            for number, study_uid in enumerate(todo, start=1):
                if stop.is_set():
                    break
                pulls.append(self._pull_study(qr, run_id, job, study_uid, f"{number}/{len(todo)}", report, stop))
        failed = [p for p in pulls if p.error]
        waiting = sum(p.waiting for p in pulls)
        summary = (f"{found.text}; {len(pulls) - len(failed) - waiting} of {len(todo)} pulled "
                   f"({sum(p.delivered for p in pulls)} instances)")
        if waiting:
            summary += f", {waiting} not in {job.source} yet (looked for again by the next run)"
        if stop.is_set():
            return "stopped", f"{summary}; stopped with the node, the rest is pulled by the next run"
        if failed:
            return "failed", f"{summary}; {len(failed)} failed, first: {failed[0].error}"
        return "done", summary

    def _peer(self, ae_title: str) -> Peer:
        peer = self.config.peer(ae_title)
        assert peer is not None  # config validation: a batch job's source and worklist source are peers
        return peer

    def _found(self, qr: QueryRetrieve, job: BatchJob, again: bool) -> FoundStudies:
        """The studies a run of `job` takes: from the source's study level answers, or from its worklist."""
        if job.worklist is None:
            answers = qr.find(study_identifier(job, date.today()))
        else:
            answers = self._scheduled_steps(job)
        uids, matched = studies_found(answers, job.max_studies)
        summaries = {answered_uid(a, "StudyInstanceUID"): study_summary(a) for a in answers}
        pulled_before = set() if again else self.store.pulled_studies(job.source, uids)
        text = f"{matched} {'studies' if job.worklist is None else 'scheduled studies'} matched"
        if matched > len(uids):
            text += f", {len(uids)} taken (max_studies), the rest left for the next run"
        if pulled_before:
            text += f", {len(pulled_before)} pulled before"
        return FoundStudies(uids, pulled_before, summaries, text)

    def _scheduled_steps(self, job: BatchJob) -> list[Dataset]:
        """The worklist's answers for the procedure steps that `job`'s worklist query matches."""
        assert job.worklist is not None
        peer = self._peer(job.worklist.source)
        with QueryRetrieve(self.config, peer, worklist=True) as worklist, self._tracked(worklist):
            return worklist.find(worklist_identifier(job, date.today()))

    @contextmanager
    def _tracked(self, qr: QueryRetrieve) -> Iterator[None]:
        with self._lock:
            self._active.add(qr)
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(qr)

    def _pull_study(self, qr: QueryRetrieve, run_id: int, job: BatchJob, study_uid: str, position: str,
                    report: Callable[[str], None], stop: threading.Event) -> StudyPull:
        update = lambda **values: self.store.update_batch_study(run_id, study_uid, **values)  # noqa: E731
        update(state="pulling")
        try:
            answers = qr.find(series_identifier(job, study_uid))
        except QueryRetrieveError as exc:
            update(state="failed", last_error=str(exc))
            return StudyPull(study_uid, 0, str(exc))
        if not answers:  # scheduled, not acquired (or not archived) yet: the next run looks again
            update(state="waiting", last_error=f"{job.source} has no series of this study yet")
            report(f"study {study_uid} ({position}): not in {job.source} yet")
            return StudyPull(study_uid, 0, waiting=True)
        series = series_to_pull(job, answers)
        if not series:
            update(state="skipped", last_error="no series to pull: none matched the job's series keys, or all "
                                               "are derived objects (SEG, SR, ...)")
            report(f"study {study_uid} ({position}): no series to pull")
            return StudyPull(study_uid, 0)
        update(series_total=len(series))
        delivered = failed = warning = 0
        errors = []
        for done, item in enumerate(series):
            if stop.is_set():
                errors.append("stopped with the node")
                break
            last_write, last_report = [0.0], [time.monotonic()]

            def on_progress(progress: MoveProgress, done: int = done, item: SeriesToPull = item) -> None:
                if stop.is_set():
                    qr.abort()
                now = time.monotonic()
                if now - last_write[0] >= PROGRESS_EVERY_S:
                    last_write[0] = now
                    update(completed=delivered + progress.completed, failed=failed + progress.failed,
                           warning=warning + progress.warning, remaining=progress.remaining)
                if now - last_report[0] >= REPORT_EVERY_S:  # a long series: say how far it is
                    last_report[0] = now
                    left = f", {progress.remaining} to go" if progress.remaining is not None else ""
                    report(f"study {study_uid} ({position}): series {done + 1}/{len(series)} "
                           f"{item.modality or '?'}: {progress.completed} delivered{left}")

            try:
                final = qr.retrieve_series(study_uid, item.series_uid, on_progress)
            except QueryRetrieveError as exc:
                errors.append(str(exc))
                final = exc.progress
            delivered, failed, warning = delivered + final.completed, failed + final.failed, warning + final.warning
            update(series_done=done + 1, completed=delivered, failed=failed, warning=warning, remaining=0)
            report(f"study {study_uid} ({position}): series {done + 1}/{len(series)} {item.modality or '?'}, "
                   f"{delivered} instances delivered, {failed} failed")
        error = errors[0] if errors else ""
        update(state="failed" if error else "done", last_error=error)
        self.audit.write("batch-study-pulled" if not error else "batch-study-failed", run_id=run_id, job=job.name,
                         study_uid=study_uid, series=len(series), instances=delivered, error=error or None)
        return StudyPull(study_uid, delivered, error)
