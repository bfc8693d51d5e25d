"""Dispatch: send result objects (and forwarded instances) to their destinations, or to the outbox folder.

Each queued send is one (object, destination) row in the job store. Every destination has its own queue,
drained by its own thread over one association at a time, so a slow or dead PACS never holds up another.
A failed send is retried with exponential backoff (initial delay, factor, cap); a send still undelivered
max_age_s after it was queued is dead (dead-letter) until `dicom-ai-node replay`. A circuit breaker per
destination stops association attempts for breaker_open_s after breaker_failures consecutive failures.
Objects carry deterministic UIDs, so a send repeated after a crash replaces rather than duplicates.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import OUTBOX, Dispatch, NodeConfig
from dicom_ai_node.jobs.store import JobStore, SendRow
from dicom_ai_node.net import AssociationAttempt, keep_responses_for_the_requestor
from dicom_ai_node.spool import write_durably

log = logging.getLogger("dicom_ai_node.dispatch")

# C-STORE statuses that mean "stored": success and the three warnings (coercion, elements discarded,
# data set does not match SOP class) under which the SCP has still kept the object.
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


def retry_delay_s(policy: Dispatch, attempts_so_far: int) -> float:
    """Delay before the next attempt after `attempts_so_far` failures (exponential, capped)."""
    return min(policy.initial_delay_s * policy.backoff_factor ** max(attempts_so_far - 1, 0), policy.max_delay_s)


def breaker_open_until(policy: Dispatch, consecutive_failures: int, now: float) -> float:
    """When a destination's circuit closes again (0: it is closed)."""
    return now + policy.breaker_open_s if consecutive_failures >= policy.breaker_failures else 0.0


@dataclass(frozen=True)
class SendOutcome:
    send_id: int
    ok: bool
    error: str = ""
    status: int | None = None  # the peer's C-STORE status, when it answered

    @property
    def status_text(self) -> str:
        return "" if self.status is None else f"0x{self.status:04X}"


class Dispatcher:
    def __init__(self, config: NodeConfig, store: JobStore, audit: AuditLog, max_parallel: int = 8) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self._pool = cf.ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="dispatch")
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def run_once(self, now: float | None = None) -> int:
        """Expire old sends, then start draining every destination with due sends; returns how many started."""
        now = time.time() if now is None else now
        for send in self.store.expire_sends(self.config.dispatch.max_age_s, now):
            log.error("send of %s to %s is dead: not delivered within %g s", send.sop_uid, send.destination,
                      self.config.dispatch.max_age_s)
            self.audit.write("send-dead", sop_uid=send.sop_uid, destination=send.destination, error="max age")
        started = 0
        for destination in self.store.due_destinations(now):
            if self.store.destination(destination).open_until > now:
                continue  # circuit open: no association attempt until it closes
            with self._lock:
                if destination in self._busy:
                    continue
                self._busy.add(destination)
            self._pool.submit(self._drain_guarded, destination)
            started += 1
        return started

    def drain(self, destination: str) -> None:
        """Send every due send of one destination (synchronously)."""
        sends = self.store.due_sends(destination)
        if not sends:
            return
        if destination == OUTBOX:
            outcomes = [self._to_outbox(s) for s in sends]
        else:
            outcomes = self._c_store(destination, sends)
        for send, outcome in zip(sends, outcomes):
            self._record(send, outcome)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _drain_guarded(self, destination: str) -> None:
        try:
            self.drain(destination)
        except Exception:  # noqa: BLE001 - one destination's trouble must not stop the others
            log.exception("dispatch to %s failed", destination)
        finally:
            with self._lock:
                self._busy.discard(destination)

    def _record(self, send: SendRow, outcome: SendOutcome) -> None:
        if outcome.ok:
            self.store.mark_sent(send.id, outcome.status_text)
            self.audit.write("result-sent", sop_uid=send.sop_uid, destination=send.destination, job_id=send.job_id,
                             status=outcome.status_text or None)
            return
        attempts = send.attempts + 1
        policy = self.config.dispatch
        if policy.max_attempts is not None and attempts >= policy.max_attempts:
            self.store.mark_send_failed(send.id, outcome.error, None, outcome.status_text)
            log.error("send of %s to %s is dead after %d attempts: %s", send.sop_uid, send.destination,
                      attempts, outcome.error)
            self.audit.write("send-dead", sop_uid=send.sop_uid, destination=send.destination, error=outcome.error)
        else:
            delay = retry_delay_s(policy, attempts)
            self.store.mark_send_failed(send.id, outcome.error, time.time() + delay, outcome.status_text)
            log.warning("send of %s to %s failed (attempt %d, retry in %.1f s): %s", send.sop_uid,
                        send.destination, attempts, delay, outcome.error)

    def _to_outbox(self, send: SendRow) -> SendOutcome:
        try:
            ds = pydicom.dcmread(send.path, stop_before_pixels=True)
            target = self.config.outbox_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / Path(send.path).name
            write_durably(target, Path(send.path).read_bytes())
            return SendOutcome(send.id, True)
        except OSError as exc:
            return SendOutcome(send.id, False, f"outbox write failed: {exc.strerror or exc}")

    def _association_result(self, destination: str, error: str) -> None:
        """Update the destination's circuit breaker after an association attempt ('' = success)."""
        previous = self.store.destination(destination)
        failures = previous.consecutive_failures + 1 if error else 0
        open_until = breaker_open_until(self.config.dispatch, failures, time.time()) if error else 0.0
        if open_until and not previous.open_until:
            log.error("destination %s: %d failed associations, pausing sends for %g s", destination, failures,
                      self.config.dispatch.breaker_open_s)
        if failures or previous.consecutive_failures:
            self.store.record_destination(destination, failures, open_until, error)

    def _c_store(self, destination: str, sends: list[SendRow]) -> list[SendOutcome]:
        peer = self.config.peer(destination)
        if peer is None:
            return [SendOutcome(s.id, False, f"destination {destination!r} is not a configured peer") for s in sends]
        ae = AE(ae_title=self.config.node.ae_title)
        ae.network_timeout = self.config.dispatch.timeout_s
        ae.acse_timeout = self.config.dispatch.timeout_s
        ae.dimse_timeout = self.config.dispatch.timeout_s
        for sop_class in sorted({s.sop_class_uid for s in sends})[:128]:  # at most 128 presentation contexts
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        attempt = AssociationAttempt()
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=attempt.handlers)
        if not assoc.is_established:
            error = f"association with {destination} at {peer.host}:{peer.port}: {attempt.failure(assoc)}"
            self._association_result(destination, error)
            return [SendOutcome(s.id, False, error) for s in sends]
        self._association_result(destination, "")
        keep_responses_for_the_requestor(assoc)
        outcomes = []
        try:
            for send in sends:
                outcomes.append(self._send_one(assoc, send))
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        outcomes += [SendOutcome(s.id, False, "association lost") for s in sends[len(outcomes):]]
        return outcomes

    def _send_one(self, assoc, send: SendRow) -> SendOutcome:
        try:
            status = assoc.send_c_store(Path(send.path))
        except (OSError, ValueError) as exc:  # missing file, or no accepted context for the SOP class
            return SendOutcome(send.id, False, str(exc))
        code = int(getattr(status, "Status", -1)) if status else -1
        if code == -1:
            return SendOutcome(send.id, False, "no response (timeout or abort)")
        if code in STORED_STATUSES:
            return SendOutcome(send.id, True, status=code)
        return SendOutcome(send.id, False, f"C-STORE status 0x{code:04X}", status=code)
