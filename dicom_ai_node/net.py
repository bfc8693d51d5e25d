"""Network settings shared by every stage that speaks DICOM (receive, dispatch, worklist, demo)."""
from __future__ import annotations

import socket

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
