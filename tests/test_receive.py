"""The SCP against real DCMTK and pynetdicom peers: compressed transfer syntaxes, association policy,
malformed input. Nothing is mocked: the node listens on a free port and the peers connect to it."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config as pynetdicom_config

from conftest import PEER_ENV, echoscu, require_tool
from dicom_ai_node.receive.scp import AssociationPolicy
from dicom_ai_node.config import parse_config

NODE_AE = "DICOM_AI_NODE"

# (pydicom test file, storescu option proposing its transfer syntax, transfer syntax UID)
COMPRESSED = [
    ("JPEG2000.dcm", "-xw", "1.2.840.10008.1.2.4.91"),  # JPEG 2000
    ("MR_small_jpeg_ls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    ("MR_small_RLE.dcm", "-xr", "1.2.840.10008.1.2.5"),  # RLE lossless
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy", "1.2.840.10008.1.2.4.50"),  # JPEG baseline
]

PEERS_YAML = """
peers:
  - ae_title: PACS
    host: 127.0.0.1
    port: 104
"""


def storescu(port: int, path: str, *options: str, calling_ae: str = "PACS") -> subprocess.CompletedProcess:
    require_tool("storescu")
    return subprocess.run(
        ["storescu", *options, "-aet", calling_ae, "-aec", NODE_AE, "127.0.0.1", str(port), path],
        env=PEER_ENV, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.integration
@pytest.mark.parametrize("name, option, transfer_syntax", COMPRESSED)
def test_compressed_instances_are_received_and_decoded(start_node, name, option, transfer_syntax):
    node = start_node(PEERS_YAML)
    source = get_testdata_file(name)
    result = storescu(node.port, source, option)
    assert result.returncode == 0, result.stderr
    original = pydicom.dcmread(source)
    [stored_path] = [p for p in node.store.instance_paths(str(original.SeriesInstanceUID))
                     if Path(p).stem == str(original.SOPInstanceUID)]
    stored = pydicom.dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax  # kept as sent, not transcoded
    assert np.array_equal(stored.pixel_array, original.pixel_array)
    assert Path(stored_path).is_relative_to(node.config.spool_dir)


@pytest.mark.integration
def test_unknown_calling_ae_is_rejected_and_known_one_accepted(start_node):
    node = start_node(PEERS_YAML)
    rejected = echoscu(node.port, "STRANGER")
    assert rejected.returncode != 0
    assert "Association Rejected" in rejected.stderr and "Calling AE Title Not Recognized" in rejected.stderr
    accepted = echoscu(node.port, "PACS")
    assert accepted.returncode == 0, accepted.stderr
    audit = node.config.audit_path.read_text()
    assert "association-rejected" in audit and "STRANGER" in audit


@pytest.mark.integration
def test_wrong_called_ae_is_rejected(start_node):
    node = start_node(PEERS_YAML)
    result = echoscu(node.port, "PACS", called_ae="SOMEONE_ELSE")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr and "Called AE Title Not Recognized" in result.stderr


@pytest.mark.integration
def test_truncated_instance_gets_failure_status_and_node_keeps_serving(start_node, tmp_path):
    node = start_node(PEERS_YAML)
    source = Path(get_testdata_file("CT_small.dcm"))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(source.read_bytes()[:-2000])
    # DCMTK refuses to send a truncated file, so the malformed peer is pynetdicom streaming raw bytes.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established
        bad = assoc.send_c_store(truncated)
        good = assoc.send_c_store(source)
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
    assert 0xC000 <= int(bad.Status) <= 0xCFFF
    assert int(good.Status) == 0x0000
    assert node.store.instance_paths(str(pydicom.dcmread(source).SeriesInstanceUID))
    assert echoscu(node.port, "PACS").returncode == 0  # still serving
    assert "instance-refused" in node.config.audit_path.read_text()


def test_no_phi_in_logs_while_receiving(start_node, caplog):
    caplog.set_level("DEBUG")
    node = start_node(PEERS_YAML)
    source = get_testdata_file("CT_small.dcm")
    assert storescu(node.port, source, "-xe").returncode == 0
    ds = pydicom.dcmread(source)
    audit = node.config.audit_path
    text = caplog.text + (audit.read_text() if audit.exists() else "")
    for value in (str(ds.PatientName), str(ds.PatientID)):
        if value:
            assert value not in text


def test_association_policy_without_peers_accepts_loopback_only():
    policy = AssociationPolicy.from_config(parse_config("{}"))
    assert policy.refusal("ANY", "127.0.0.1") is None
    assert policy.refusal("ANY", "::1") is None
    assert "only loopback" in policy.refusal("ANY", "10.1.2.3")


def test_association_policy_binds_peer_to_its_address():
    policy = AssociationPolicy.from_config(parse_config(PEERS_YAML))
    assert policy.refusal("PACS", "127.0.0.1") is None
    assert "bound to" in policy.refusal("PACS", "127.0.0.2")
    assert "not a configured peer" in policy.refusal("OTHER", "127.0.0.1")
