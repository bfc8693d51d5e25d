"""Dispatch against a real DCMTK storescp: retries while the destination is down, dead-letter after the
last attempt, and the retry delays as a pure function."""
from __future__ import annotations

import subprocess

import pytest

from conftest import PEER_ENV, free_port, require_tool, wait_for
from dicom_ai_node.config import Dispatch
from dicom_ai_node.demo import push_datasets
from dicom_ai_node.dispatch import retry_delay_s
from dicom_ai_node.phantom import make_chest_phantom


def config_yaml(destination_port: int, attempts: int) -> str:
    return f"""
peers:
  - ae_title: MODALITY
    host: 127.0.0.1
    port: 104
  - ae_title: ARCHIVE
    host: 127.0.0.1
    port: {destination_port}
rules:
  - name: chest
    match: {{Modality: CT}}
    pipelines: [ct_lung]
    destinations: [ARCHIVE]
dispatch:
  max_attempts: {attempts}
  initial_delay_s: 0.3
  backoff_factor: 1.0
  max_delay_s: 0.3
"""


def small_phantom(seed: str):
    return make_chest_phantom(slices=40, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed=seed)


def test_retry_delays_grow_exponentially_up_to_the_cap():
    policy = Dispatch(initial_delay_s=5, backoff_factor=2, max_delay_s=60)
    assert [retry_delay_s(policy, n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


@pytest.mark.integration
def test_sends_are_retried_until_the_destination_comes_up(start_node, tmp_path):
    require_tool("storescp")
    port = free_port()
    node = start_node(config_yaml(port, attempts=100))
    phantom = small_phantom("dispatch-retry")
    assert push_datasets(phantom.datasets, "127.0.0.1", node.port, "DICOM_AI_NODE", "MODALITY") == 40

    def failed_twice():
        sends = node.store.sends()
        return len(sends) == 3 and all(s.attempts >= 2 and s.state == "queued" for s in sends)

    wait_for(failed_twice, timeout=120, what="two failed attempts per result")
    assert "association with ARCHIVE" in node.store.sends()[0].last_error
    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(["storescp", "-aet", "ARCHIVE", "-od", str(received), str(port)], env=PEER_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: all(s.state == "sent" for s in node.store.sends()), timeout=60, what="sends after recovery")
        wait_for(lambda: len(list(received.iterdir())) == 3, timeout=10, what="3 files at storescp")
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
    assert {p.name.split(".", 1)[0] for p in received.iterdir()} == {"SC", "SG", "SR3"}  # storescp names files by SOP class


@pytest.mark.integration
def test_sends_become_dead_after_the_last_attempt(start_node):
    node = start_node(config_yaml(free_port(), attempts=3))  # nothing ever listens there
    phantom = small_phantom("dispatch-dead")
    assert push_datasets(phantom.datasets, "127.0.0.1", node.port, "DICOM_AI_NODE", "MODALITY") == 40
    sends = wait_for(lambda: (s := node.store.sends()) and len(s) == 3 and all(x.state == "dead" for x in s) and s,
                     timeout=120, what="dead sends")
    assert all(s.attempts == 3 and "association with ARCHIVE" in s.last_error for s in sends)
    assert node.config.audit_path.read_text().count('"send-dead"') == 3


@pytest.mark.integration
def test_a_destination_that_rejects_is_named_with_its_reason(start_node):
    require_tool("storescp")
    port = free_port()
    storescp = subprocess.Popen(["storescp", "-aet", "ARCHIVE", "--refuse", str(port)], env=PEER_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = start_node(config_yaml(port, attempts=2))
        phantom = small_phantom("dispatch-rejected")
        assert push_datasets(phantom.datasets, "127.0.0.1", node.port, "DICOM_AI_NODE", "MODALITY") == 40
        sends = wait_for(lambda: (s := node.store.sends()) and len(s) == 3 and all(x.state == "dead" for x in s)
                         and s, timeout=120, what="dead sends")
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
    # what the operator reads in `status` and the dead-letter list: who refused, and why
    assert all(s.last_error == f"association with ARCHIVE at 127.0.0.1:{port}: rejected (Rejected (Permanent), "
               "DUL service-user: No reason given)" for s in sends), sends[0].last_error
