"""Dispatch: send result objects to their destinations (C-STORE SCU) or to the outbox folder.

Each queued send is one (result object, destination) row in the job store. A pass groups due sends by
destination and sends them over one association; a failed send is retried with exponential backoff and
becomes dead (dead-letter) after the configured number of attempts, with the last error kept for the
operator. Results carry deterministic UIDs, so a send repeated after a crash replaces rather than duplicates.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import OUTBOX, Dispatch, NodeConfig
from dicom_ai_node.jobs.store import JobStore, SendRow
from dicom_ai_node.receive.scp import _set_tcp_nodelay
from dicom_ai_node.spool import write_durably

log = logging.getLogger("dicom_ai_node.dispatch")

# C-STORE statuses that mean "stored": success and the three warnings (coercion, elements discarded,
# data set does not match SOP class) under which the SCP has still kept the object.
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


def retry_delay_s(policy: Dispatch, attempts_so_far: int) -> float:
    """Delay before the next attempt after `attempts_so_far` failures (exponential, capped)."""
    return min(policy.initial_delay_s * policy.backoff_factor ** max(attempts_so_far - 1, 0), policy.max_delay_s)


@dataclass(frozen=True)
class SendOutcome:
    send_id: int
    ok: bool
    error: str = ""
    status: int | None = None  # the peer's C-STORE status, when it answered


class Dispatcher:
    def __init__(self, config: NodeConfig, store: JobStore, audit: AuditLog) -> None:
        self.config = config
        self.store = store
        self.audit = audit

    def run_once(self, now: float | None = None) -> int:
        """Attempt every due send once; returns how many were attempted."""
        due = self.store.due_sends(now)
        by_destination: dict[str, list[SendRow]] = defaultdict(list)
        for send in due:
            by_destination[send.destination].append(send)
        for destination, sends in by_destination.items():
            if destination == OUTBOX:
                outcomes = [self._to_outbox(s) for s in sends]
            else:
                outcomes = self._c_store(destination, sends)
            for send, outcome in zip(sends, outcomes):
                self._record(send, outcome)
        return len(due)

    def _record(self, send: SendRow, outcome: SendOutcome) -> None:
        if outcome.ok:
            self.store.mark_sent(send.id)
            self.audit.write("result-sent", sop_uid=send.sop_uid, destination=send.destination, job_id=send.job_id,
                             status=None if outcome.status is None else f"0x{outcome.status:04X}")
            return
        attempts = send.attempts + 1
        policy = self.config.dispatch
        if attempts >= policy.attempts:
            self.store.mark_send_failed(send.id, outcome.error, None)
            log.error("send of %s to %s is dead after %d attempts: %s", send.sop_uid, send.destination,
                      attempts, outcome.error)
            self.audit.write("send-dead", sop_uid=send.sop_uid, destination=send.destination, error=outcome.error)
        else:
            delay = retry_delay_s(policy, attempts)
            self.store.mark_send_failed(send.id, outcome.error, time.time() + delay)
            log.warning("send of %s to %s failed (attempt %d, retry in %.0f s): %s", send.sop_uid,
                        send.destination, attempts, delay, outcome.error)

    def _to_outbox(self, send: SendRow) -> SendOutcome:
        try:
            ds = pydicom.dcmread(send.path, stop_before_pixels=True)
            target = self.config.outbox_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / Path(send.path).name
            write_durably(target, Path(send.path).read_bytes())
            return SendOutcome(send.id, True)
        except OSError as exc:
            return SendOutcome(send.id, False, f"outbox write failed: {exc.strerror or exc}")

    def _c_store(self, destination: str, sends: list[SendRow]) -> list[SendOutcome]:
        peer = self.config.peer(destination)
        if peer is None:
            return [SendOutcome(s.id, False, f"destination {destination!r} is not a configured peer") for s in sends]
        ae = AE(ae_title=self.config.node.ae_title)
        ae.network_timeout = self.config.dispatch.timeout_s
        ae.acse_timeout = self.config.dispatch.timeout_s
        ae.dimse_timeout = self.config.dispatch.timeout_s
        for sop_class in sorted({s.sop_class_uid for s in sends}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _set_tcp_nodelay)])
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
            return [SendOutcome(s.id, False, f"association with {destination} at {peer.host}:{peer.port}: {why}")
                    for s in sends]
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
        except (OSError, ValueError) as exc:  # missing file or no accepted context for the SOP class
            return SendOutcome(send.id, False, str(exc))
        code = int(getattr(status, "Status", -1)) if status else -1
        if code == -1:
            return SendOutcome(send.id, False, "no response (timeout or abort)")
        if code in STORED_STATUSES:
            return SendOutcome(send.id, True, status=code)
        return SendOutcome(send.id, False, f"C-STORE status 0x{code:04X}", status=code)
