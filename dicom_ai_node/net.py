"""Network settings shared by every stage that speaks DICOM (receive, dispatch, worklist, demo)."""
from __future__ import annotations

import socket
from typing import Any

from pynetdicom import _config as pynetdicom_config, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

# pynetdicom logs the identifiers of C-FIND/C-MOVE requests and responses (names, IDs) by default.
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: without TCP_NODELAY every DIMSE message waits ~40 ms for delayed ACKs."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]


class AssociationAttempt:
    """Why an association we requested did not come up, in the peer's words when it rejected it.

    The A-ASSOCIATE-RJ is caught as its PDU arrives (EVT_PDU_RECV, in pynetdicom's reactor thread), because
    pynetdicom 3.0's requestor reports a reject as an abort when its own thread looks late: it checks
    whether the socket is still connected, and the reactor closes it on the reject (tests/test_net.py)."""

    def __init__(self) -> None:
        self.reject: A_ASSOCIATE_RJ | None = None
        self.handlers = [*NODELAY_HANDLERS, (evt.EVT_PDU_RECV, self._on_pdu)]

    def _on_pdu(self, event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            self.reject = event.pdu

    def failure(self, assoc: Any) -> str:
        """What went wrong, for the operator: "rejected (Rejected (Permanent), DUL service-user: Calling AE
        title not recognised)", "aborted" or "no connection"."""
        if self.reject is not None:
            rj = self.reject
            return f"rejected ({rj.result_str}, {rj.source_str}: {rj.reason_str})"
        if assoc.is_rejected:
            return "rejected"
        return "aborted" if assoc.is_aborted else "no connection"


def keep_responses_for_the_requestor(assoc: Any) -> None:
    """Work around a race in pynetdicom 3.0's requestor (pydicom/pynetdicom#875): a send_*() pauses the
    association's reactor by a check-then-act on a flag, so the reactor can still take one more message off
    the DIMSE queue; when the peer answers fast (the node itself, Orthanc on loopback), that message is the
    response the send_*() waits for: pynetdicom logs "Received unexpected C-STORE service message", drops
    it, and the send waits for its DIMSE timeout. Here a response the reactor took while a send_*() waits
    (the reactor is then meant to be paused) goes back on the queue for it."""
    serve = assoc._serve_request  # noqa: SLF001 - pynetdicom is pinned to 3.0.x (pyproject.toml)

    def serve_or_give_back(msg: Any, context_id: int) -> None:
        waiting = not assoc._reactor_checkpoint.is_set()  # noqa: SLF001 - a send_*() has paused the reactor
        if waiting and not msg.is_valid_request and msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_give_back  # noqa: SLF001
