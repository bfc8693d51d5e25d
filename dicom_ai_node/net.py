"""Network settings shared by every stage that speaks DICOM (receive, dispatch, worklist, demo)."""
from __future__ import annotations

import socket
from typing import Any

from pynetdicom import _config as pynetdicom_config, evt

# pynetdicom logs the identifiers of C-FIND/C-MOVE requests and responses (names, IDs) by default.
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: without TCP_NODELAY every DIMSE message waits ~40 ms for delayed ACKs."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]


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
