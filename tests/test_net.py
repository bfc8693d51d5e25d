"""The node's pynetdicom requestors (dispatch, demo push) keep a response the association's reactor took
off the DIMSE queue while a send waited for it (net.keep_responses_for_the_requestor), and report a peer's
reject with its reason even when pynetdicom calls it an abort (net.AssociationAttempt)."""
from __future__ import annotations

import subprocess
import threading
import time

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage

from conftest import PEER_ENV, free_port, require_tool
from dicom_ai_node.net import NODELAY_HANDLERS, AssociationAttempt, keep_responses_for_the_requestor


def _storescp(option: str):
    """DCMTK's storescp as ARCHIVE on a free port (`--ignore`: accepts and drops what it gets; `--refuse`:
    rejects every association), yielded once it answers an association request."""
    require_tool("storescp")
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "ARCHIVE", option, str(port)], env=PEER_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        attempt = AssociationAttempt()
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")
        probe = ae.associate("127.0.0.1", port, ae_title="ARCHIVE", evt_handlers=attempt.handlers)
        answered = probe.is_established or attempt.reject is not None
        if probe.is_established:
            probe.release()
        if answered:
            break
        time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def storescp():
    yield from _storescp("--ignore")


@pytest.fixture
def refusing_storescp():
    yield from _storescp("--refuse")


def _paused(assoc) -> None:
    """Pause the reactor as a send_*() does before it sends."""
    assoc._reactor_checkpoint.clear()  # noqa: SLF001
    while not assoc._is_paused:  # noqa: SLF001
        time.sleep(0.0001)


def test_a_response_the_reactor_takes_goes_back_to_the_waiting_send(storescp):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="NODE")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", storescp, ae_title="ARCHIVE", evt_handlers=NODELAY_HANDLERS)
    assert assoc.is_established
    try:
        keep_responses_for_the_requestor(assoc)
        response = C_STORE()
        response.MessageIDBeingRespondedTo = 7
        response.Status = 0x0000
        response.AffectedSOPClassUID = CTImageStorage
        response.AffectedSOPInstanceUID = ds.SOPInstanceUID
        assert response.is_valid_response and not response.is_valid_request

        _paused(assoc)  # a send waits: what the reactor takes is given back
        assoc._serve_request(response, 1)  # noqa: SLF001 - what the reactor does when it wins the race
        assert assoc.dimse.get_msg(block=False) == (1, response)
        assoc._reactor_checkpoint.set()  # noqa: SLF001

        assoc._serve_request(response, 1)  # noqa: SLF001 - nobody waits (a stale answer): dropped, as before
        assert assoc.dimse.get_msg(block=False) == (None, None)

        status = assoc.send_c_store(ds)  # and sending goes on as ever
        assert int(status.Status) == 0x0000
    finally:
        assoc.release()


@pytest.mark.parametrize("slow_requestor", [False, True])
def test_a_reject_is_reported_with_the_peers_reason(refusing_storescp, monkeypatch, slow_requestor):
    if slow_requestor:
        # pynetdicom's requestor thread looks late (a busy process): it sees the socket the reactor closed on
        # the reject and reports an abort; the attempt still has the reject and its reason.
        wait = threading.Event.wait

        def late(self, timeout=None):
            ready = wait(self, timeout)
            if threading.current_thread() is threading.main_thread():
                time.sleep(0.2)
            return ready

        monkeypatch.setattr(threading.Event, "wait", late)
    attempt = AssociationAttempt()
    ae = AE(ae_title="NODE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", refusing_storescp, ae_title="ARCHIVE", evt_handlers=attempt.handlers)
    monkeypatch.undo()
    assert not assoc.is_established
    if slow_requestor:
        assert assoc.is_aborted and not assoc.is_rejected  # pynetdicom's own account, for the record
    assert attempt.failure(assoc) == "rejected (Rejected (Permanent), DUL service-user: No reason given)"
