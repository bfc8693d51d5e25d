"""The node's pynetdicom requestors (dispatch, demo push) keep a response the association's reactor took
off the DIMSE queue while a send waited for it (net.keep_responses_for_the_requestor)."""
from __future__ import annotations

import subprocess
import time

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage

from conftest import PEER_ENV, free_port, require_tool
from dicom_ai_node.net import NODELAY_HANDLERS, keep_responses_for_the_requestor


@pytest.fixture
def storescp():
    require_tool("storescp")
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "ARCHIVE", "--ignore", str(port)], env=PEER_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")
        probe = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
        if probe.is_established:
            probe.release()
            break
        time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(timeout=10)


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
