"""The DICOM listener: association policy, C-ECHO, and C-STORE into the durable spool.

An instance is answered 0x0000 only after it is fsynced in the spool and recorded in the job store; any
failure before that gets a failure status, so the sender keeps its copy and retries. Handlers are small
functions bound to pynetdicom events, as pynetdicom recommends.
"""
from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import uuid
from dataclasses import dataclass, field

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import AllTransferSyntaxes, UID

from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import NodeConfig, Peer
from dicom_ai_node.jobs.store import JobStore
from dicom_ai_node.net import set_tcp_nodelay
from dicom_ai_node.spool import InvalidInstance, parse_instance, store_instance

log = logging.getLogger("dicom_ai_node.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110

REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAG_CALLING_AE_NOT_RECOGNISED = 0x03
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def decodable_transfer_syntaxes() -> list[UID]:
    """Every transfer syntax whose pixel data this installation can decode (uncompressed included)."""
    out = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:
            continue
    return out


@dataclass(frozen=True)
class AssociationPolicy:
    """Who may associate: configured peers (AE title, bound to their IP), or loopback when none."""

    peers: tuple[Peer, ...]
    peer_addresses: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: NodeConfig) -> "AssociationPolicy":
        addresses: dict[str, set[str]] = {}
        for peer in config.peers:
            try:
                infos = socket.getaddrinfo(peer.host, None)
                addresses[peer.ae_title] = {info[4][0] for info in infos}
            except OSError:
                addresses[peer.ae_title] = {peer.host}
        return cls(tuple(config.peers), addresses)

    def refusal(self, calling_ae: str, address: str) -> str | None:
        """Why an association must be refused, or None when it is allowed."""
        if not self.peers:
            if any(ipaddress.ip_address(address) in net for net in LOOPBACK):
                return None
            return f"no peers configured, so only loopback may associate; calling AE {calling_ae!r} from {address}"
        peer = next((p for p in self.peers if p.ae_title == calling_ae), None)
        if peer is None:
            return f"calling AE {calling_ae!r} from {address} is not a configured peer"
        if peer.check_ip and address not in self.peer_addresses.get(peer.ae_title, set()):
            return f"calling AE {calling_ae!r} connected from {address}, but the peer is bound to {peer.host}"
        return None


class Receiver:
    """The C-STORE SCP. `start()` listens in background threads; `stop()` closes the listener."""

    def __init__(self, config: NodeConfig, store: JobStore, audit: AuditLog) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self.policy = AssociationPolicy.from_config(config)
        self.ae = self._build_ae()
        self.server: ThreadedAssociationServer | None = None

    def _build_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = not node.accept_any_called_ae
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in _STORAGE_CLASSES.values():
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        return ae

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> None:
        node = self.config.node
        handlers = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self.server = self.ae.start_server((node.bind_address, node.port), block=False, evt_handlers=handlers)
        if not self.policy.peers:
            log.warning("no peers configured: only associations from 127.0.0.1 / ::1 are accepted")
        log.info("listening as %s on %s:%d", node.ae_title, node.bind_address, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        # At EVT_REQUESTED only the A-ASSOCIATE-RQ primitive holds the calling AE (pynetdicom copies it later).
        calling_ae = str(requestor.primitive.calling_ae_title).strip()
        reason = self.policy.refusal(calling_ae, requestor.address)
        if reason is not None:
            log.warning("association rejected: %s", reason)
            self.audit.write("association-rejected", calling_ae=calling_ae, address=requestor.address, reason=reason)
            event.assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, DIAG_CALLING_AE_NOT_RECOGNISED)
            # As pynetdicom's own rejections do: wait for the DUL to send the A-ASSOCIATE-RJ before the
            # server closes the socket, or the peer sees an abort instead of a rejection.
            event.assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        # Each association gets an id so its release can tell the assembler a sender has finished.
        association_id = uuid.uuid4().hex
        event.assoc.node_association_id = association_id
        requestor = event.assoc.requestor
        self.store.association_opened(association_id, requestor.ae_title.strip(), requestor.address)

    def _on_released(self, event: evt.Event) -> None:
        association_id = getattr(event.assoc, "node_association_id", None)
        if association_id is not None:
            self.store.association_released(association_id)

    def _on_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip()
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID)
        spool = self.config.spool_dir
        min_free = self.config.node.min_free_disk_mb * 1024 * 1024
        try:
            spool.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(spool).free < min_free:
                log.error("C-STORE %s refused: free disk below %d MB", sop_uid, self.config.node.min_free_disk_mb)
                return STATUS_OUT_OF_RESOURCES
            raw = event.encoded_dataset()
            if len(raw) > self.config.node.max_instance_mb * 1024 * 1024:
                log.error("C-STORE %s refused: %d bytes exceeds max_instance_mb", sop_uid, len(raw))
                return STATUS_OUT_OF_RESOURCES
            header = parse_instance(raw, str(request.AffectedSOPClassUID), sop_uid)
        except InvalidInstance as exc:
            log.error("C-STORE %s from %s refused: %s", sop_uid, calling_ae, exc)
            self.audit.write("instance-refused", calling_ae=calling_ae, sop_uid=sop_uid, reason=str(exc))
            return STATUS_CANNOT_UNDERSTAND
        try:
            path = store_instance(spool, header, raw)
            self.store.record_instance(
                sop_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
                transfer_syntax_uid=header.transfer_syntax_uid, series_uid=header.series_uid,
                study_uid=header.study_uid, calling_ae=calling_ae, path=str(path), size=len(raw),
                header=header.routing_header, association_id=getattr(event.assoc, "node_association_id", None),
            )
        except OSError as exc:  # disk full, permissions: the sender keeps its copy and retries
            log.error("C-STORE %s not stored: %s", sop_uid, exc.strerror or exc)
            return STATUS_OUT_OF_RESOURCES
        except Exception:  # noqa: BLE001 - anything else must still answer, never kill the association
            log.exception("C-STORE %s not stored", sop_uid)
            return STATUS_PROCESSING_FAILURE
        return STATUS_SUCCESS


def _on_echo(event: evt.Event) -> int:
    return STATUS_SUCCESS
