"""A small DICOM Upper Layer acceptor (PS3.8) for the storage SCP: one event loop for all associations.

pynetdicom's reactors poll their queues with 1 ms sleeps, which caps a Python SCP far below DCMTK's
storescp however little the handler does (measured: ~350 CT_small/s per association with a handler that
does nothing). This acceptor reads PDUs straight from non-blocking sockets, hands each C-STORE dataset
fragment to a sink as it arrives (the receiver streams it into the spool, never holding a large instance in
memory) and answers once the service has made the instance safe; the instances that become whole in the
same turn of the loop are made safe together (one flush). pynetdicom still encodes and decodes the association PDUs
and negotiates the presentation contexts, so what the node accepts is what pynetdicom would accept.

Only what a storage SCP needs: A-ASSOCIATE (accept or reject), P-DATA with C-ECHO and C-STORE, A-RELEASE,
A-ABORT, an ARTIM/idle timeout. One operation at a time per association (asynchronous operations window
1/1), which is what every storage SCU we know of uses.
"""
from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE, AsynchronousOperationsWindowNegotiation, ImplementationClassUIDNotification,
    ImplementationVersionNameNotification, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicom_ai_node.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger("dicom_ai_node.receive")

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE = 0x01, 0x02, 0x03
P_DATA_TF_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 0x04, 0x05, 0x06, 0x07

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

ABORT_SERVICE_PROVIDER = 0x02
ABORT_UNEXPECTED_PDU = 0x02

_ASSOCIATE_RQ_LIMIT = 1 << 20  # an A-ASSOCIATE-RQ is a few kB; refuse to buffer a hostile one
_COMMAND_LIMIT = 1 << 16
_READ_BYTES = 256 * 1024  # at most this much is read from a socket at a time
STATUS_PROCESSING_FAILURE = 0x0110

_pdu_header = struct.Struct(">BxI")
_pdv_header = struct.Struct(">IBB")


class ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted with `reason` (A-ABORT, PS3.8 9.3.8)."""

    def __init__(self, message: str, reason: int = 0x06) -> None:  # invalid-PDU-parameter value
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The peer closed the connection."""


@dataclass
class Association:
    """One accepted (or negotiating) association, as the service sees it."""

    address: str
    port: int
    calling_ae: str = ""
    called_ae: str = ""
    peer_max_pdu: int = 0  # 0: unlimited
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (abstract syntax, transfer syntax)
    state: dict[str, Any] = field(default_factory=dict)  # the service's own bookkeeping


@dataclass(frozen=True)
class StoreRequest:
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    move_originator_ae: str


class StoreSink(Protocol):
    def write(self, data: memoryview) -> None: ...  # the next piece of the dataset (copy it: it is reused)
    def abandon(self) -> None: ...  # the association ended before the dataset did


class Service(Protocol):
    def refusal(self, assoc: Association) -> tuple[int, int, int] | None: ...
    def opened(self, assoc: Association) -> None: ...
    def released(self, assoc: Association) -> None: ...
    def echo(self, assoc: Association) -> int: ...
    def begin_store(self, assoc: Association, request: StoreRequest, transfer_syntax: str) -> StoreSink: ...
    def finish_stores(self, sinks: list[StoreSink]) -> list[int]: ...  # each C-STORE's status, once safe


# -- DIMSE command sets (implicit VR little endian, PS3.7 E) ---------------------------------------------

def decode_command(data: bytes) -> dict[int, bytes]:
    elements: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if pos + length > len(data):
            raise ProtocolError("truncated command set")
        elements[group << 16 | element] = data[pos:pos + length]
        pos += length
    if pos != len(data):
        raise ProtocolError("trailing bytes after the command set")
    return elements


def _command_us(elements: dict[int, bytes], tag: int, default: int | None = None) -> int:
    value = elements.get(tag)
    if value is None or len(value) < 2:
        if default is None:
            raise ProtocolError(f"command set lacks ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        return default
    return struct.unpack_from("<H", value)[0]


def _command_text(elements: dict[int, bytes], tag: int) -> str:
    return elements.get(tag, b"").decode("ascii", "replace").rstrip("\0 ").strip()


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def encode_response(command_field: int, message_id: int, sop_class_uid: str, status: int,
                    sop_instance_uid: str | None = None) -> bytes:
    body = b"".join([
        _element(0x00000002, sop_class_uid.encode()),
        _element(0x00000100, struct.pack("<H", command_field)),
        _element(0x00000120, struct.pack("<H", message_id)),
        _element(0x00000800, struct.pack("<H", NO_DATASET)),
        _element(0x00000900, struct.pack("<H", status)),
    ] + ([_element(0x00001000, sop_instance_uid.encode())] if sop_instance_uid else []))
    return _element(0x00000000, struct.pack("<I", len(body))) + body


# -- the acceptor -----------------------------------------------------------------------------------------

class Listener:
    """Accepts connections on (host, port) in a thread and gives each to `take`; `every_turn` runs at least
    every 0.5 s (the accept timeout, which is also how soon `stop` is noticed)."""

    def __init__(self, host: str, port: int, take: Callable[[socket.socket, tuple[Any, ...]], None],
                 every_turn: Callable[[], None] | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=64)
        self._socket.settimeout(0.5)
        self._take = take
        self._every_turn = every_turn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dicom-acceptor", daemon=True)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._every_turn is not None:
                self._every_turn()
            try:
                sock, address = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("accept failed")
                continue
            if self._stop.is_set():
                sock.close()
                return
            self._take(sock, address)


class Acceptor:
    """Runs every association of this process in one thread, an event loop over non-blocking sockets: those
    it accepts on (host, port), or, with host None, those handed to it (`handle`) by a process that listens
    for it (receive/pool.py).

    One thread because the work per instance is small and Python threads make it dear: with a thread per
    association, four senders cost ~110 futex calls per instance (GIL hand-overs, condition wake-ups), as much
    system CPU as the instance's own work (benchmarks/RESULTS.md, Ingest). Each turn the loop reads what every
    ready socket holds, then finishes the instances that arrived whole in one batch (`Service.finish_stores`:
    one journal flush for all of them), then answers them. What may wait long (a release waits until its
    instances are placed; closing after a reject or an abort waits for the peer) runs in a short-lived thread
    of its own, which then owns the socket.
    """

    def __init__(self, host: str | None, port: int, service: Service, contexts: list[PresentationContext], *,
                 ae_title: str, require_called_ae: bool, max_associations: int, max_pdu: int,
                 timeout_s: float) -> None:
        self.service = service
        self.contexts = contexts
        self.ae_title = ae_title
        self.require_called_ae = require_called_ae
        self.max_associations = max_associations
        self.max_pdu = max_pdu
        self.timeout_s = timeout_s
        self._listener = Listener(host, port, self.handle) if host is not None else None
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()  # every connection not yet closed, the loop's or not
        self._handed: deque[_Connection] = deque()  # new connections, for the loop to take
        self._looped: set[_Connection] = set()  # the connections the loop serves (loop thread only)
        self._awaiting: list[_Connection] = []  # whose instance is whole and waits for its answer (loop only)
        self._read_buffer = bytearray(_READ_BYTES)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dicom-receive", daemon=True)

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.port

    def start(self) -> None:
        self._thread.start()
        if self._listener is not None:
            self._listener.start()

    def stop(self) -> None:
        """Stop listening and abort the associations in progress (their senders keep what was not answered)."""
        if self._listener is not None:
            self._listener.stop()
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:  # those in their own threads, and the loop's if it did not stop
            connection.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def handle(self, sock: socket.socket, address: tuple[Any, ...], over_limit: bool = False,
               on_close: Callable[[], None] | None = None) -> None:
        """Serve the association on an accepted connection (any thread). over_limit: refuse it (local limit)
        whatever this acceptor counts; on_close: called when the connection is done."""
        connection = _Connection(self, sock, address, over_limit, on_close)
        with self._lock:
            self._connections.add(connection)
            self._handed.append(connection)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # a wake-up is pending already (buffer full), or the acceptor is closed
            pass

    def _active(self) -> int:
        with self._lock:
            return len(self._connections)

    def _forget(self, connection: "_Connection") -> None:
        with self._lock:
            self._connections.discard(connection)

    # -- the loop (its thread only) ----------------------------------------------------------------------

    def _loop(self) -> None:
        next_idle_check = time.monotonic() + 1.0
        while not self._stop.is_set():
            try:
                events = self._selector.select(timeout=0.5)
                for key, mask in events:
                    connection = key.data
                    if connection is None:
                        self._take_handed()
                    else:
                        connection.on_events(mask)
                self._finish_awaiting()
                now = time.monotonic()
                if now >= next_idle_check:
                    next_idle_check = now + 1.0
                    for connection in list(self._looped):
                        connection.check_idle(now)
            except Exception:  # noqa: BLE001 - a bug must cost at most one turn, never the receiver
                log.exception("receive loop")
        for connection in list(self._looped):
            connection.close()
            connection.finalize()

    def _take_handed(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            with self._lock:
                if not self._handed:
                    return
                connection = self._handed.popleft()
            connection.begin()

    def _finish_awaiting(self) -> None:
        """Finish the instances that are whole, all in one batch, and answer them; an answered connection goes
        on with what it has buffered, which may finish another instance for the next batch."""
        while self._awaiting:
            batch, self._awaiting = self._awaiting, []
            sinks = [connection.sink for connection in batch]
            try:
                statuses = self.service.finish_stores(sinks)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - answer them all as failed; the senders keep their copies
                log.exception("finishing %d C-STORE(s) failed", len(batch))
                statuses = [STATUS_PROCESSING_FAILURE] * len(batch)
            for connection, status in zip(batch, statuses):
                connection.answer_store(status)


class _Connection:
    """One association's state, driven by the acceptor's loop: bytes in, PDUs parsed as they complete."""

    def __init__(self, acceptor: Acceptor, sock: socket.socket, address: tuple[Any, ...], over_limit: bool = False,
                 on_close: Callable[[], None] | None = None) -> None:
        self.acceptor = acceptor
        self.sock = sock
        self.over_limit = over_limit
        self.on_close = on_close
        host = str(address[0])
        if host.startswith("::ffff:") and "." in host:  # an IPv4 peer on a dual-stack listener
            host = host[len("::ffff:"):]
        self.assoc = Association(address=host, port=int(address[1]))
        self.inbuf = bytearray()  # received, not yet parsed
        self.outbuf = bytearray()  # to send once the socket takes it
        self.opened = False  # the association was accepted
        self.handed_off = False  # a thread of its own closes it now
        self.closed = False
        self.finalized = False
        self.last_activity = time.monotonic()
        self.pdu_left = 0  # bytes of the current P-DATA-TF not yet parsed
        self.pdv_left = 0  # bytes of the current PDV's value not yet parsed
        self.pdv_context = 0
        self.pdv_control = 0
        # the DIMSE message in progress
        self.command = bytearray()
        self.command_context: int | None = None
        self.sink: StoreSink | None = None
        self.dataset_context: int | None = None
        self.pending: tuple[int, int, str, str] | None = None  # (context, message id, class, instance)
        self.awaiting = False  # its instance is whole and waits for the batch's answer

    # -- life ----------------------------------------------------------------------------------------------

    def begin(self) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.setblocking(False)
            self.acceptor._selector.register(self.sock, selectors.EVENT_READ, self)  # noqa: SLF001
        except (OSError, ValueError) as exc:
            log.info("connection from %s dropped before its association: %s", self.assoc.address, exc)
            self.close()
            self.finalize()
            return
        self.acceptor._looped.add(self)  # noqa: SLF001
        self.last_activity = time.monotonic()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def finalize(self) -> None:
        """Once, when the connection is done: drop an unfinished instance, forget it, tell the owner."""
        if self.finalized:
            return
        self.finalized = True
        if self.sink is not None:
            self.sink.abandon()
            self.sink = None
        self.acceptor._forget(self)  # noqa: SLF001
        if self.on_close is not None:
            self.on_close()

    def _leave_loop(self) -> None:
        if self in self.acceptor._looped:  # noqa: SLF001
            self.acceptor._looped.discard(self)  # noqa: SLF001
            try:
                self.acceptor._selector.unregister(self.sock)  # noqa: SLF001
            except (KeyError, ValueError, OSError):
                pass

    def _drop(self) -> None:
        """Close now, in the loop (the peer is gone)."""
        self._leave_loop()
        self.close()
        self.finalize()

    def _hand_off(self, ending: Callable[[], None]) -> None:
        """Run `ending` (then close) in a thread of its own, which owns the socket from now on."""
        self._leave_loop()
        self.handed_off = True
        if self.sink is not None:
            self.sink.abandon()
            self.sink = None

        def run() -> None:
            try:
                self.sock.setblocking(True)
                if self.outbuf:
                    self.sock.sendall(self.outbuf)
                    self.outbuf.clear()
                ending()
            except OSError:
                pass
            except Exception:  # noqa: BLE001
                log.exception("association from %s: closing failed", self.assoc.calling_ae or self.assoc.address)
            finally:
                self.close()
                self.finalize()

        threading.Thread(target=run, name=f"dicom-close-{self.assoc.address}:{self.assoc.port}", daemon=True).start()

    def _linger_close(self, wait_s: float = 5.0) -> None:
        """Close after the peer has read what we sent: it closes first (PS3.8 ARTIM), or wait_s passes.
        Closing at once with unread input would reset the connection and could lose our last PDU."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(wait_s)
            while self.sock.recv(65536):
                pass
        except OSError:
            pass
        self.close()

    def _abort(self, source: int = ABORT_SERVICE_PROVIDER, reason: int = 0x00) -> None:
        abort = struct.pack(">BxIxxBB", A_ABORT_TYPE, 4, source, reason)

        def ending() -> None:
            self.sock.sendall(abort)
            self._linger_close(1.0)

        self._hand_off(ending)

    def check_idle(self, now: float) -> None:
        if not self.awaiting and now - self.last_activity > self.acceptor.timeout_s:
            log.warning("association from %s %s idle for %.0f s: aborted", self.assoc.calling_ae or "?",
                        self.assoc.address, self.acceptor.timeout_s)
            self._abort()

    # -- socket --------------------------------------------------------------------------------------------

    def on_events(self, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush()
            if mask & selectors.EVENT_READ and not self.handed_off and not self.closed:
                self._read()
        except OSError as exc:
            if not self.closed:
                log.info("association from %s: %s", self.assoc.calling_ae or self.assoc.address, exc)
            self._drop()

    def _read(self) -> None:
        buffer = self.acceptor._read_buffer  # noqa: SLF001 - one per loop: what is kept is copied out at once
        try:
            count = self.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        if not count:
            if self.opened:
                log.info("association from %s: connection closed by the peer", self.assoc.calling_ae)
            self._drop()
            return
        self.last_activity = time.monotonic()
        with memoryview(buffer) as view:
            if self.inbuf:
                self.inbuf += view[:count]
                self._process_buffered()
            else:  # parsed where it was read; only what is left over is kept (a dataset is copied once)
                used = self._process(buffer, count)
                if used < count and not self.closed and not self.handed_off:
                    self.inbuf += view[used:count]

    def _send(self, data: bytes) -> None:
        if not self.outbuf:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            if not self.handed_off:
                both = selectors.EVENT_READ | selectors.EVENT_WRITE
                self.acceptor._selector.modify(self.sock, both, self)  # noqa: SLF001
        self.outbuf += data

    def _flush(self) -> None:
        if self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            del self.outbuf[:sent]
        if not self.outbuf:
            self.acceptor._selector.modify(self.sock, selectors.EVENT_READ, self)  # noqa: SLF001

    # -- parsing -------------------------------------------------------------------------------------------

    def _process_buffered(self) -> None:
        del self.inbuf[:self._process(self.inbuf, len(self.inbuf))]

    def _process(self, buf: bytearray, end: int) -> int:
        """Parse buf[:end], up to an instance that waits for its answer or the end of the bytes; returns how
        many bytes were used (all of them when the association is aborted)."""
        try:
            return self._parse(buf, end)
        except ProtocolError as exc:
            log.warning("association from %s %s aborted: %s", self.assoc.calling_ae or "?", self.assoc.address, exc)
            self._abort(ABORT_SERVICE_PROVIDER, exc.reason)
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - a bug must cost one association, never the loop
            log.exception("association from %s failed", self.assoc.calling_ae or self.assoc.address)
            self._abort()
        return end

    def _parse(self, buf: bytearray, end: int) -> int:
        pos = 0
        while not self.awaiting and not self.handed_off and not self.closed:
            available = end - pos
            if self.pdv_left:  # inside a PDV's value
                take = min(available, self.pdv_left)
                if not take:
                    return pos
                with memoryview(buf) as view, view[pos:pos + take] as piece:
                    if self.pdv_control & 0x01:
                        self.command += piece
                    elif self.sink is not None:
                        self.sink.write(piece)
                pos += take
                self.pdv_left -= take
                if not self.pdv_left:
                    self._pdv_complete()
                continue
            if self.pdu_left:  # inside a P-DATA-TF: the next PDV
                if self.pdu_left < 6:
                    raise ProtocolError("P-DATA-TF with a truncated PDV item")
                if available < 6:
                    return pos
                item_length, context_id, control = _pdv_header.unpack_from(buf, pos)
                if item_length < 2 or item_length + 4 > self.pdu_left:
                    raise ProtocolError("PDV item longer than its PDU")
                pos += 6
                self.pdu_left -= item_length + 4
                self._pdv_begins(context_id, control, item_length - 2)
                if not self.pdv_left:
                    self._pdv_complete()
                continue
            if available < 6:
                return pos
            pdu_type, length = _pdu_header.unpack_from(buf, pos)
            if not self.opened:
                if pdu_type != A_ASSOCIATE_RQ_TYPE or length > _ASSOCIATE_RQ_LIMIT:
                    raise ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}",
                                        ABORT_UNEXPECTED_PDU)
                if available < 6 + length:
                    return pos
                pdu = bytes(buf[pos:pos + 6 + length])
                pos += 6 + length
                if self._negotiate(pdu):
                    self.opened = True
                    self.acceptor.service.opened(self.assoc)
                continue
            if pdu_type == P_DATA_TF_TYPE:
                pos += 6
                self.pdu_left = length
            elif pdu_type == A_RELEASE_RQ_TYPE:
                if length > 64:
                    raise ProtocolError("A-RELEASE-RQ of more than 64 bytes")
                if available < 6 + length:
                    return pos
                pos += 6 + length
                if self.sink is not None or self.pending is not None:
                    raise ProtocolError("A-RELEASE-RQ in the middle of a C-STORE")
                self._hand_off(self._release)
            elif pdu_type == A_ABORT_TYPE:
                log.info("association from %s aborted by the peer", self.assoc.calling_ae)
                self._drop()
            else:
                raise ProtocolError(f"unexpected PDU type {pdu_type:#04x}", ABORT_UNEXPECTED_PDU)
        return pos

    def _release(self) -> None:
        """In the connection's own thread: record the release once its instances are, then answer it."""
        self.acceptor.service.released(self.assoc)  # recorded before the sender hears it
        self.sock.sendall(struct.pack(">BxIxxxx", A_RELEASE_RP_TYPE, 4))
        self._linger_close()

    def _pdv_begins(self, context_id: int, control: int, size: int) -> None:
        if context_id not in self.assoc.contexts:
            raise ProtocolError(f"presentation context {context_id} was not accepted")
        if control & 0x01:
            if self.pending is not None:
                raise ProtocolError("a new command before the dataset of the previous one")
            if self.command_context not in (None, context_id):
                raise ProtocolError("command fragments on different presentation contexts")
            if len(self.command) + size > _COMMAND_LIMIT:
                raise ProtocolError("command set too large")
            self.command_context = context_id
        elif self.pending is None or context_id != self.dataset_context:
            raise ProtocolError("dataset fragment without a C-STORE command")
        self.pdv_context, self.pdv_control, self.pdv_left = context_id, control, size

    def _pdv_complete(self) -> None:
        if not self.pdv_control & 0x02:
            return  # more fragments follow
        if self.pdv_control & 0x01:
            command, self.command, self.command_context = bytes(self.command), bytearray(), None
            self._dispatch(self.pdv_context, decode_command(command))
        else:  # the dataset is whole: finished with the others that are, then answered (answer_store)
            self.awaiting = True
            self.acceptor._awaiting.append(self)  # noqa: SLF001

    def answer_store(self, status: int) -> None:
        assert self.pending is not None
        context, message_id, sop_class, sop_instance = self.pending
        self.pending, self.sink, self.awaiting = None, None, False
        try:
            self._respond(context, encode_response(C_STORE_RSP, message_id, sop_class, status, sop_instance))
            self._process_buffered()  # what the sender sent since (it may not wait for the answer)
        except OSError as exc:
            if not self.closed:
                log.info("association from %s: %s", self.assoc.calling_ae or self.assoc.address, exc)
            self._drop()

    # -- the association's messages ----------------------------------------------------------------------

    def _negotiate(self, pdu: bytes) -> bool:
        """Accept (True) or reject the association; a rejected one is closed in its own thread."""
        acceptor = self.acceptor
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(pdu)
            request = rq.to_primitive()
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises several types on malformed items
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}") from exc
        self.assoc.calling_ae = str(request.calling_ae_title).strip()
        self.assoc.called_ae = str(request.called_ae_title).strip()
        roles: dict[str, tuple[bool | None, bool | None]] = {}
        asynchronous = False
        for item in request.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.assoc.peer_max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
            elif isinstance(item, AsynchronousOperationsWindowNegotiation):
                asynchronous = (item.maximum_number_operations_invoked,
                                item.maximum_number_operations_performed) != (1, 1)
        reason = self.acceptor.service.refusal(self.assoc)
        if reason is None and not (rq.protocol_version & 0x0001):
            reason = REJECT_PROTOCOL_VERSION
        if reason is None and str(request.application_context_name) != APPLICATION_CONTEXT_NAME:
            reason = REJECT_APPLICATION_CONTEXT
        if reason is None and acceptor.require_called_ae and self.assoc.called_ae != acceptor.ae_title.strip():
            reason = REJECT_CALLED_AE
        if reason is None and (self.over_limit or acceptor._active() > acceptor.max_associations):  # noqa: SLF001
            reason = REJECT_LOCAL_LIMIT
        if reason is not None:
            reject = A_ASSOCIATE()
            reject.result, reject.result_source, reject.diagnostic = reason
            pdu_rj = A_ASSOCIATE_RJ()
            pdu_rj.from_primitive(reject)
            self._send(pdu_rj.encode())
            self._hand_off(self._linger_close)
            return False

        results, role_items = negotiate_as_acceptor(
            request.presentation_context_definition_list, acceptor.contexts, roles or None)
        for context in results:
            if context.result == 0x00 and context.context_id is not None:
                self.assoc.contexts[context.context_id] = (str(context.abstract_syntax),
                                                           str(context.transfer_syntax[0]))
        accept = A_ASSOCIATE()
        accept.application_context_name = APPLICATION_CONTEXT_NAME
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result, accept.result_source = 0x00, 0x01
        accept.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = acceptor.max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        info: list[Any] = [maximum, implementation, version, *role_items]
        if asynchronous:
            window = AsynchronousOperationsWindowNegotiation()
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            info.append(window)
        accept.user_information = info
        pdu_ac = A_ASSOCIATE_AC()
        pdu_ac.from_primitive(accept)
        self._send(pdu_ac.encode())
        return True

    def _dispatch(self, context_id: int, command: dict[int, bytes]) -> None:
        field_ = _command_us(command, 0x00000100)
        message_id = _command_us(command, 0x00000110)
        has_dataset = _command_us(command, 0x00000800, NO_DATASET) != NO_DATASET
        abstract_syntax, transfer_syntax = self.assoc.contexts[context_id]
        sop_class = _command_text(command, 0x00000002) or abstract_syntax
        if field_ == C_ECHO_RQ and not has_dataset:
            status = self.acceptor.service.echo(self.assoc)
            self._respond(context_id, encode_response(C_ECHO_RSP, message_id, sop_class, status))
        elif field_ == C_STORE_RQ and has_dataset and abstract_syntax != VERIFICATION:
            request = StoreRequest(
                message_id=message_id, sop_class_uid=sop_class,
                sop_instance_uid=_command_text(command, 0x00001000),
                priority=_command_us(command, 0x00000700, 0),
                move_originator_ae=_command_text(command, 0x00001030),
            )
            self.pending = (context_id, message_id, sop_class, request.sop_instance_uid)
            self.dataset_context = context_id
            self.sink = self.acceptor.service.begin_store(self.assoc, request, transfer_syntax)
        else:
            raise ProtocolError(f"unsupported command {field_:#06x} on presentation context {context_id}")

    def _respond(self, context_id: int, command: bytes) -> None:
        """Send a command set in P-DATA-TF PDUs no larger than the peer accepts."""
        limit = self.assoc.peer_max_pdu - 6 - 6 if self.assoc.peer_max_pdu else len(command)
        limit = max(limit, 2)
        pieces = [command[i:i + limit] for i in range(0, len(command), limit)] or [b""]
        out = []
        for index, piece in enumerate(pieces):
            control = 0x03 if index == len(pieces) - 1 else 0x01
            out.append(_pdu_header.pack(P_DATA_TF_TYPE, len(piece) + 6)
                       + _pdv_header.pack(len(piece) + 2, context_id, control) + piece)
        self._send(b"".join(out))
