"""The DICOM listener: association policy, C-ECHO, and C-STORE into the durable spool.

An instance is answered 0x0000 only once it is on disk: checked without being decoded
(`spool.IncomingInstance`), then appended to the ingest journal and flushed (`journal.IngestJournal`, one
flush shared by the associations that deliver at the same moment), from which it is placed in the spool
and recorded in the job store. An instance too large to hold in memory is streamed to its spool file,
which is fdatasynced and its folder fsynced before its row is journalled. Any failure before that gets a
failure status, so the sender keeps its copy and retries. Associations run on `ul.Acceptor` (one event
loop); the release of an association is recorded once its instances are.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import AllTransferSyntaxes, UID

from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import NodeConfig, Peer
from dicom_ai_node.jobs.store import JobStore, ReceivedInstance
from dicom_ai_node.receive.journal import IngestJournal, recover_other_journals
from dicom_ai_node.receive.ul import (
    REJECT_CALLING_AE, STATUS_PROCESSING_FAILURE, Acceptor, Association, StoreRequest,
)
from dicom_ai_node.spool import FreeSpaceGauge, IncomingInstance, InvalidInstance

log = logging.getLogger("dicom_ai_node.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210

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


def supported_contexts() -> list[PresentationContext]:
    """Every storage SOP class with every decodable transfer syntax, and Verification."""
    syntaxes = decodable_transfer_syntaxes()
    contexts = [build_context(sop_class, syntaxes) for sop_class in _STORAGE_CLASSES.values()]
    return contexts + [build_context(Verification)]


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


def announce_listening(config: NodeConfig, port: int, detail: str = "") -> None:
    if not config.peers:
        log.warning("no peers configured: only associations from 127.0.0.1 / ::1 are accepted")
    log.info("listening as %s on %s:%d%s", config.node.ae_title, config.node.bind_address, port, detail)


class Receiver:
    """The C-STORE SCP. `start()` listens in background threads; `stop()` closes the listener."""

    def __init__(self, config: NodeConfig, store: JobStore, audit: AuditLog, journal: str = "0") -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self.policy = AssociationPolicy.from_config(config)
        self.contexts = supported_contexts()
        self.journal = IngestJournal(config.journal_dir / journal, config.spool_dir, store)
        self.free_space = FreeSpaceGauge(config.spool_dir)
        self.acceptor: Acceptor | None = None

    @property
    def port(self) -> int:
        assert self.acceptor is not None
        return self.acceptor.port

    @property
    def journal_names(self) -> set[str]:
        return {self.journal.name}

    def start(self, listen: bool = True) -> None:
        """Recover the journal and accept associations: on the configured port, or (listen=False) those
        handed to `acceptor.handle` by a ReceiverPool that listens."""
        node = self.config.node
        self.config.spool_dir.mkdir(parents=True, exist_ok=True)
        if listen:  # alone: the journals of a former pool's processes are this receiver's to replay
            recover_other_journals(self.config.journal_dir, self.config.spool_dir, self.store,
                                   keep={self.journal.name})
        self.journal.recover()  # instances acknowledged by a process that died before placing them
        self.journal.start()
        self.acceptor = Acceptor(
            node.bind_address if listen else None, node.port, self, self.contexts, ae_title=node.ae_title,
            require_called_ae=not node.accept_any_called_ae, max_associations=node.max_associations,
            max_pdu=node.max_pdu_bytes, timeout_s=node.network_timeout_s,
        )
        self.acceptor.start()
        if listen:
            announce_listening(self.config, self.port)

    def stop(self) -> None:
        if self.acceptor is not None:
            self.acceptor.stop()
            self.acceptor = None
        self.journal.close()

    # -- ul.Service ------------------------------------------------------------------------------------

    def refusal(self, assoc: Association) -> tuple[int, int, int] | None:
        reason = self.policy.refusal(assoc.calling_ae, assoc.address)
        if reason is None:
            return None
        log.warning("association rejected: %s", reason)
        self.audit.write("association-rejected", calling_ae=assoc.calling_ae, address=assoc.address, reason=reason)
        return REJECT_CALLING_AE

    def opened(self, assoc: Association) -> None:
        # Each association gets an id so its release can tell the assembler a sender has finished.
        assoc.state["id"] = uuid.uuid4().hex
        self.store.association_opened(assoc.state["id"], assoc.calling_ae, assoc.address)

    def released(self, assoc: Association) -> None:
        if "id" not in assoc.state:
            return
        # The release shortens the wait for the series; record it only once the association's instances
        # are recorded, or the series could be assembled without them.
        if self.journal.wait_placed(assoc.state.get("last_seq", 0), self.config.node.network_timeout_s):
            self.store.association_released(assoc.state["id"])
        else:
            log.warning("association %s released before its instances were placed (%s): its series complete "
                        "by their quiet period", assoc.state["id"], self.journal.stats.last_error or "slow disk")

    def echo(self, assoc: Association) -> int:
        return STATUS_SUCCESS

    def begin_store(self, assoc: Association, request: StoreRequest, transfer_syntax: str) -> "_IncomingStore":
        return _IncomingStore(self, assoc, request, transfer_syntax)

    def finish_stores(self, sinks: "list[_IncomingStore]") -> list[int]:
        """Check each whole instance, journal those that pass with one flush, and give each C-STORE's status:
        0x0000 only for an instance that is on disk."""
        prepared = [sink.prepare() for sink in sinks]
        statuses = [item if isinstance(item, int) else STATUS_SUCCESS for item in prepared]
        journalled = [(index, item) for index, item in enumerate(prepared) if not isinstance(item, int)]
        if not journalled:
            return statuses
        try:
            outcomes: list[int | BaseException] = self.journal.append_batch([item for _, item in journalled])
        except Exception as exc:  # noqa: BLE001 - the journal refuses them all (closing, or its backlog is full)
            outcomes = [exc] * len(journalled)
        for (index, item), outcome in zip(journalled, outcomes):
            sop_uid = item[0].sop_uid
            if isinstance(outcome, OSError):
                log.error("C-STORE %s not stored: %s", sop_uid, outcome.strerror or outcome)
                statuses[index] = STATUS_OUT_OF_RESOURCES
            elif isinstance(outcome, BaseException):
                log.error("C-STORE %s not stored: %s: %s", sop_uid, type(outcome).__name__, outcome)
                statuses[index] = STATUS_PROCESSING_FAILURE
            else:
                sinks[index].assoc.state["last_seq"] = max(outcome, sinks[index].assoc.state.get("last_seq", 0))
        return statuses


class _IncomingStore:
    """One C-STORE: its dataset is collected (or streamed to the spool) as it arrives; `prepare` checks it for
    Receiver.finish_stores, which answers once it is durable."""

    def __init__(self, receiver: Receiver, assoc: Association, request: StoreRequest, transfer_syntax: str) -> None:
        self.receiver = receiver
        self.assoc = assoc
        self.sop_uid = request.sop_instance_uid
        self.status = STATUS_SUCCESS
        self.incoming: IncomingInstance | None = None
        node = receiver.config.node
        self.max_bytes = node.max_instance_mb * 1024 * 1024
        spool = receiver.config.spool_dir
        try:
            if receiver.free_space.free_bytes() < node.min_free_disk_mb * 1024 * 1024:
                log.error("C-STORE %s refused: free disk below %d MB", self.sop_uid, node.min_free_disk_mb)
                self.status = STATUS_OUT_OF_RESOURCES
                return
        except OSError as exc:
            log.error("C-STORE %s not stored: %s", self.sop_uid, exc.strerror or exc)
            self.status = STATUS_OUT_OF_RESOURCES
            return
        self.incoming = IncomingInstance(spool, request.sop_class_uid, self.sop_uid, transfer_syntax,
                                         assoc.calling_ae)

    def _drop(self, status: int) -> None:
        self.status = status
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None

    def write(self, data: memoryview) -> None:
        if self.incoming is None:
            return  # refused already: the rest of the dataset is read and dropped
        if self.incoming.dataset_size + len(data) > self.max_bytes:
            log.error("C-STORE %s refused: more than max_instance_mb (%d MB)", self.sop_uid,
                      self.receiver.config.node.max_instance_mb)
            self._drop(STATUS_OUT_OF_RESOURCES)
            return
        try:
            self.incoming.write(data)
        except OSError as exc:  # disk full, permissions: the sender keeps its copy and retries
            log.error("C-STORE %s not stored: %s", self.sop_uid, exc.strerror or exc)
            self._drop(STATUS_OUT_OF_RESOURCES)

    def abandon(self) -> None:
        self._drop(STATUS_PROCESSING_FAILURE)

    def prepare(self) -> "int | tuple[ReceivedInstance, tuple[Any, ...], bool]":
        """Check the whole dataset: its status when it is refused, else what to journal (the row, the file's
        bytes, and whether the file is already in place: a large instance streamed to its file is made
        durable there, and only its row goes through the journal)."""
        incoming, self.incoming = self.incoming, None
        if incoming is None:
            return self.status
        receiver, calling_ae = self.receiver, self.assoc.calling_ae
        in_memory = incoming.in_memory
        try:
            if in_memory:
                path, header = incoming.check()
            else:
                path, header = incoming.commit()
        except InvalidInstance as exc:
            incoming.discard()
            log.error("C-STORE %s from %s refused: %s", self.sop_uid, calling_ae, exc)
            receiver.audit.write("instance-refused", calling_ae=calling_ae, sop_uid=self.sop_uid, reason=str(exc))
            return STATUS_CANNOT_UNDERSTAND
        except OSError as exc:
            incoming.discard()
            log.error("C-STORE %s not stored: %s", self.sop_uid, exc.strerror or exc)
            return STATUS_OUT_OF_RESOURCES
        except Exception:  # noqa: BLE001 - anything else must still answer, never kill the association
            incoming.discard()
            log.exception("C-STORE %s not stored", self.sop_uid)
            return STATUS_PROCESSING_FAILURE
        size = incoming.meta_size + incoming.dataset_size
        receiver.free_space.received(size)
        instance = ReceivedInstance(
            sop_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid, series_uid=header.series_uid,
            study_uid=header.study_uid, calling_ae=calling_ae, path=str(path), size=size,
            header=header.routing_header, association_id=self.assoc.state.get("id"),
        )
        return instance, (incoming.parts if in_memory else ()), not in_memory
