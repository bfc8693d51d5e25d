"""The receive path of a C-GET: the instances a PACS sends back on the node's own association.

They take the path of pushed instances (the receiver's checks, an ingest journal, the spool, the store), so
each C-STORE sub-operation is answered 0x0000 only once it is durable. The journal is the pull's own
(`journal/get-<pid>-<id>`), since a pull may run in the `batch run` command's process beside a running
node: it holds the journal's owner lock while it pulls, places everything and removes the journal at the
end, and a journal left by a pull that died is replayed by the node (receive/journal.py
recover_other_journals, at start and every few minutes).
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid

from pynetdicom import evt

from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import NodeConfig, Peer
from dicom_ai_node.jobs.store import JobStore
from dicom_ai_node.receive.scp import STATUS_OUT_OF_RESOURCES, Receiver
from dicom_ai_node.receive.ul import Association, StoreRequest

log = logging.getLogger("dicom_ai_node.worklist")


class GetReceiver:
    """Stores what C-GETs from `peer` bring back; use as a context manager around the pulls."""

    def __init__(self, config: NodeConfig, store: JobStore, audit: AuditLog, peer: Peer) -> None:
        self.peer = peer
        self.store = store
        self.receiver = Receiver(config, store, audit, journal=f"get-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._assoc: Association | None = None

    def __enter__(self) -> "GetReceiver":
        self.receiver.journal.recover()  # a fresh journal: takes its owner lock, makes its first segment
        self.receiver.journal.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.series_done()
        journal = self.receiver.journal
        journal.close()  # every instance placed and checkpointed: nothing left to replay
        shutil.rmtree(journal.folder, ignore_errors=True)
        self.store.forget_journal(journal.name)

    def series_begins(self) -> None:
        """One C-GET is one delivery, like one pushed association: its release shortens the series' wait."""
        self._assoc = Association(self.peer.host, self.peer.port, calling_ae=self.peer.ae_title)
        self.receiver.opened(self._assoc)

    def series_done(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None:
            self.receiver.released(assoc)

    def handlers(self) -> list[tuple[evt.EventType, object]]:
        return [(evt.EVT_C_STORE, self._on_store)]

    def _on_store(self, event: evt.Event) -> int:
        """A C-STORE sub-operation of the C-GET: its status once the instance is durable, or why not."""
        if self._assoc is None:
            self.series_begins()
        request = event.request
        store = StoreRequest(int(request.MessageID), str(request.AffectedSOPClassUID),
                             str(request.AffectedSOPInstanceUID), int(request.Priority or 0), "")
        try:
            sink = self.receiver.begin_store(self._assoc, store, str(event.context.transfer_syntax))
            sink.write(memoryview(event.encoded_dataset(include_meta=False)))
            [status] = self.receiver.finish_stores([sink])
        except Exception:  # noqa: BLE001 - a sub-operation fails, the association and the pull go on
            log.exception("C-GET sub-operation for %s not stored", store.sop_instance_uid)
            return STATUS_OUT_OF_RESOURCES
        return status
