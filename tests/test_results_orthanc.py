"""A real Orthanc stores every result kind the node writes (ARCHITECTURE.md standard 7).

The objects are sent by pynetdicom, as the dispatcher sends them, one presentation context per SOP class.
DCMTK's storescu cannot send a Label Map SEG at all (its dictionary predates the class), and Orthanc 1.10
takes one only with UnknownSopClassAccepted, which the test Orthanc sets.
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from test_results import ORG_ROOT, manifest_in
from test_results_kinds import ALL_KINDS, full_result, source_volume

from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.writer import write_results

SUCCESS = 0x0000


def c_store_all(datasets: list[pydicom.Dataset], port: int) -> list[int]:
    ae = AE(ae_title="DICOM_AI_NODE")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.mark.integration
@pytest.mark.parametrize("source", ["phantom", "cr"])
def test_orthanc_stores_every_kind(orthanc, source: str, tmp_path: Path) -> None:
    volume = source_volume(source, tmp_path)
    manifest = manifest_in(tmp_path / "pipelines" / "ct_lung")
    ctx = ResultContext(org_root=ORG_ROOT)
    result = full_result(volume)
    datasets = write_results(volume, result, manifest, ctx, ALL_KINDS, "binary")
    datasets += write_results(volume, result, manifest, ctx, ("seg",), "labelmap")
    assert c_store_all(datasets, orthanc.dicom_port) == [SUCCESS] * len(datasets)
    stored = {i["MainDicomTags"]["SOPInstanceUID"]
              for i in orthanc.instances_of_study(str(volume.sources[0].StudyInstanceUID))}
    assert {str(ds.SOPInstanceUID) for ds in datasets} <= stored
