"""Query/Retrieve as a service class user, Study Root: C-FIND at STUDY and SERIES level, C-MOVE or C-GET
by series; and Modality Worklist C-FIND (`QueryRetrieve(..., worklist=True)`).

One association per batch run; every failure is a `QueryRetrieveError` that names the peer and what it did
(rejected, aborted, a status), never the identifier's values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind as WORKLIST_FIND,
    StudyRootQueryRetrieveInformationModelFind as FIND,
    StudyRootQueryRetrieveInformationModelGet as GET,
    StudyRootQueryRetrieveInformationModelMove as MOVE,
)

from dicom_ai_node.config import NodeConfig, Peer
from dicom_ai_node.net import AssociationAttempt, keep_responses_for_the_requestor
from dicom_ai_node.receive.scp import decodable_transfer_syntaxes
from dicom_ai_node.worklist.query import (
    PENDING_STATUSES, STATUS_SUCCESS, answered_count, failed_move_status, move_failure, move_identifier,
)

if TYPE_CHECKING:
    from dicom_ai_node.worklist.get import GetReceiver


@dataclass(frozen=True)
class MoveProgress:
    """The sub-operation counts of one C-MOVE, as its latest response gave them."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int | None = None


class QueryRetrieveError(RuntimeError):
    """The source did not answer a query or a move; str() is for the operator (no identifier values).
    `progress`: what a failed move had delivered."""

    def __init__(self, message: str, progress: MoveProgress = MoveProgress()) -> None:
        super().__init__(message)
        self.progress = progress


def move_progress(status: Dataset) -> MoveProgress:
    return MoveProgress(answered_count(status, "NumberOfCompletedSuboperations") or 0,
                        answered_count(status, "NumberOfFailedSuboperations") or 0,
                        answered_count(status, "NumberOfWarningSuboperations") or 0,
                        answered_count(status, "NumberOfRemainingSuboperations"))


class QueryRetrieve:
    """An association with `peer` for C-FIND and C-MOVE (or, `worklist`, Modality Worklist C-FIND); use as a
    context manager."""

    def __init__(self, config: NodeConfig, peer: Peer, worklist: bool = False,
                 get_receiver: "GetReceiver | None" = None) -> None:
        self.config = config
        self.peer = peer
        self.find_model = WORKLIST_FIND if worklist else FIND
        self.get_receiver = get_receiver  # C-GET instead of C-MOVE: what comes back is stored by it
        self.node_ae = config.node.ae_title  # where a C-MOVE sends, and whom a C-GET's PACS sends back to
        self._assoc = None
        self._aborted = False  # by abort(), not by the peer

    def __enter__(self) -> "QueryRetrieve":
        ae = AE(ae_title=self.node_ae)
        timeout = self.config.dispatch.timeout_s
        ae.network_timeout = ae.acse_timeout = timeout
        # A move of a large series answers its final status only after the last sub-operation: pending
        # responses come at every instance, so the DIMSE timeout bounds the gap between two of them.
        ae.dimse_timeout = timeout
        ae.add_requested_context(self.find_model)
        roles = []
        handlers = []
        if self.get_receiver is not None:
            # The PACS sends the instances back as C-STORE requests on this association: the node takes the
            # SCP role for every storage class it proposes (at most 128 contexts in all: 120 classes here).
            ae.add_requested_context(GET)
            syntaxes = decodable_transfer_syntaxes()
            for context in StoragePresentationContexts:
                ae.add_requested_context(context.abstract_syntax, syntaxes)
                roles.append(build_role(context.abstract_syntax, scp_role=True))
            handlers = self.get_receiver.handlers()
        elif self.find_model is FIND:
            ae.add_requested_context(MOVE)
        attempt = AssociationAttempt()
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title, ext_neg=roles or None,
                             evt_handlers=attempt.handlers + handlers)
        if not assoc.is_established:
            raise QueryRetrieveError(f"association with {self.where}: {attempt.failure(assoc)}")
        keep_responses_for_the_requestor(assoc)
        self._assoc = assoc
        return self

    def __exit__(self, *exc_info: object) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.release()

    @property
    def where(self) -> str:
        return f"{self.peer.ae_title} at {self.peer.host}:{self.peer.port}"

    def abort(self) -> None:
        """Abort the association from another thread (the node is stopping); the current call raises."""
        assoc = self._assoc
        if assoc is not None and assoc.is_established:
            self._aborted = True
            assoc.abort()

    def find(self, identifier: Dataset) -> list[Dataset]:
        """Every matching answer of a C-FIND; QueryRetrieveError when the search does not end in success."""
        answers = []
        for status, answer in self._established().send_c_find(identifier, self.find_model):
            code = int(status.Status) if "Status" in status else None
            if code in PENDING_STATUSES:
                if answer is not None:
                    answers.append(answer)
                continue
            if code == STATUS_SUCCESS:
                return answers
            raise QueryRetrieveError(self._failed("C-FIND", identifier, code))
        raise QueryRetrieveError(self._failed("C-FIND", identifier, None))

    def retrieve_series(self, study_uid: str, series_uid: str,
                        on_progress: Callable[[MoveProgress], None]) -> MoveProgress:
        """C-MOVE one series to the node (C-GET it, with a get receiver); `on_progress` gets every pending
        response's counts. Returns the final counts when every instance was delivered (some with warnings:
        stored all the same); QueryRetrieveError, with the counts so far, otherwise."""
        last = MoveProgress()
        identifier = move_identifier(study_uid, series_uid)
        if self.get_receiver is not None:
            service = "C-GET"
            self.get_receiver.series_begins()
            responses = self._established().send_c_get(identifier, GET)
        else:
            service = "C-MOVE"
            responses = self._established().send_c_move(identifier, self.node_ae, MOVE)
        try:
            for status, _ in responses:
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    break
                if "NumberOfCompletedSuboperations" in status or "NumberOfFailedSuboperations" in status:
                    last = move_progress(status)
                if code in PENDING_STATUSES:
                    on_progress(last)
                    continue
                failure = failed_move_status(code, last.failed)
                if failure is None:
                    return last
                reason = move_failure(failure, self.node_ae, str(status.get("ErrorComment", "")), service)
                counts = f"{last.completed} delivered, {last.failed} failed, {last.warning} with warnings"
                raise QueryRetrieveError(f"series {series_uid} from {self.where}: {reason} ({counts})", last)
        finally:
            if self.get_receiver is not None:
                self.get_receiver.series_done()
        raise QueryRetrieveError(f"series {series_uid} from {self.where}: no final {service} response, "
                                 f"{self._lost()}", last)

    def _established(self):
        if self._assoc is None or not self._assoc.is_established:
            raise QueryRetrieveError(f"association with {self.where} lost")
        return self._assoc

    def _lost(self) -> str:
        if self._aborted:
            return "the node aborted the association: it is stopping"
        if self._assoc is not None and self._assoc.is_aborted:
            return (f"the PACS aborted the association (does it allow queries and moves from "
                    f"{self.node_ae}?)")
        return "no response within the timeout, or the association was lost"

    def _failed(self, service: str, identifier: Dataset, code: int | None) -> str:
        level = identifier.get("QueryRetrieveLevel", "")
        what = f"{service} at {level} level" if level else f"{service} of the Modality Worklist"
        if code is None:
            return f"{what} from {self.where}: {self._lost()}"
        return f"{what} from {self.where}: status 0x{code:04X}"
