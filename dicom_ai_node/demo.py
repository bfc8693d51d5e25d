"""`dicom-ai-node demo`: push a synthetic chest CT and a synthetic chest radiograph to a running node and
show the results arrive (lungs: SEG, SR, key image; radiograph: nodule probability SR and Grad-CAM heatmap).

The phantoms get a fresh StudyInstanceUID each time. The demo sends with calling AE DEMO_PACS from this
machine; a node with no peers accepts it because it comes from loopback, and writes results to its outbox.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pydicom
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai_node.config import NodeConfig
from dicom_ai_node.jobs.store import JobStore
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.phantom_xray import make_chest_radiograph
from dicom_ai_node.net import AssociationAttempt, keep_responses_for_the_requestor

DEMO_AE = "DEMO_PACS"


def push_datasets(datasets, host: str, port: int, called_ae: str, calling_ae: str = DEMO_AE) -> int:
    """C-STORE every dataset over one association; returns how many were stored (status 0x0000)."""
    ae = AE(ae_title=calling_ae)
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    attempt = AssociationAttempt()
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=attempt.handlers)
    if not assoc.is_established:
        raise ConnectionError(f"could not associate with {called_ae} at {host}:{port}: {attempt.failure(assoc)}"
                              " (is `dicom-ai-node serve` running?)")
    keep_responses_for_the_requestor(assoc)
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status and int(status.Status) == 0:
                stored += 1
    finally:
        assoc.release()
    return stored


def run_demo(config: NodeConfig, host: str = "127.0.0.1", wait_s: float = 600.0) -> int:
    demo_id = uuid.uuid4()
    phantom = make_chest_phantom(uid_seed=f"demo-{demo_id}")
    radiograph = make_chest_radiograph(seed=7, nodule=True, uid_seed=f"demo-xr-{demo_id}")
    node = config.node
    print(f"pushing a synthetic chest CT ({len(phantom.datasets)} slices) and a synthetic chest radiograph "
          f"with a nodule to {node.ae_title} at {host}:{node.port}")
    datasets = phantom.datasets + [radiograph.dataset]
    stored = push_datasets(datasets, host, node.port, node.ae_title)
    print(f"stored {stored}/{len(datasets)} instances; CT study {phantom.datasets[0].StudyInstanceUID}, "
          f"radiograph study {radiograph.dataset.StudyInstanceUID}")
    print(f"truth: right lung {phantom.right_lung_ml:.0f} mL, left lung {phantom.left_lung_ml:.0f} mL, "
          f"LAA-950 {phantom.laa950_percent:.1f} %; the radiograph has a nodule")
    if stored != len(datasets):
        return 1
    if wait_s <= 0:
        return 0
    if not config.db_path.exists():
        print(f"cannot follow progress: no state database at {config.db_path} (pass the node's --config/--data-dir)")
        return 0
    print("waiting for the series to complete (a few seconds after the association is released, at most "
          f"the {config.completion.quiet_period_s:g} s quiet period) and for the results...")
    store = JobStore(config.db_path)
    deadline = time.time() + wait_s
    outcomes = [_follow(store, config, str(series_uid), deadline - time.time())
                for series_uid in (phantom.datasets[0].SeriesInstanceUID, radiograph.dataset.SeriesInstanceUID)]
    return max(outcomes)


def describe_result(path: Path) -> str:
    """One line per result object; for an SR, its measurements and coded findings."""
    ds = pydicom.dcmread(path)
    line = f"{ds.Modality} \"{ds.SeriesDescription}\" ({path.name})"
    if ds.Modality == "SR":
        for tracking, item in _report_values(ds):
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "NUM":
                value = item.MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                line += f"\n      {tracking}: {name} = {float(value.NumericValue):.2f} {unit}"
            else:
                line += f"\n      {tracking}: {name} = {item.ConceptCodeSequence[0].CodeMeaning}"
    return line


def _report_values(ds: pydicom.Dataset, tracking: str = "") -> list[tuple[str, pydicom.Dataset]]:
    """(tracking identifier, NUM or CODE item) of every measurement group, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if item.ValueType == "TEXT" and name == "Tracking Identifier":
            tracking = str(item.TextValue)
        measured = item.ValueType == "NUM" and "MeasuredValueSequence" in item
        evaluated = (item.ValueType == "CODE" and item.get("RelationshipType") == "CONTAINS"
                     and name != "Finding category")  # findings and qualitative evaluations, not the category
        if tracking and (measured or evaluated):
            found.append((tracking, item))
        found += _report_values(item, tracking)
    return found


def _follow(store: JobStore, config: NodeConfig, series_uid: str, wait_s: float) -> int:
    deadline = time.time() + wait_s
    last = ""
    while time.time() < deadline:
        series = store.series(series_uid)
        jobs = store.jobs(series_uid)
        sends = [s for j in jobs for s in store.sends(j.id)]
        state = f"series {series.state if series else 'unknown'}; " + (
            ", ".join(f"job {j.pipeline} {j.state}" for j in jobs) or "no job yet")
        if sends:
            state += f"; sent {sum(s.state == 'sent' for s in sends)}/{len(sends)}"
        if state != last:
            print(f"  {state}")
            last = state
        if series and series.state == "unrouted":
            print(f"no rule fired: {series.note}")
            return 1
        if any(j.state == "failed" for j in jobs):
            print("job failed: " + "; ".join(j.last_error for j in jobs if j.last_error))
            return 1
        if jobs and all(j.state == "done" for j in jobs) and sends and all(s.state in ("sent", "dead") for s in sends):
            for s in sends:
                where = config.outbox_dir if s.destination == "outbox" else s.destination
                print(f"  {s.state} to {where}: {describe_result(Path(s.path))}")
            return 0 if all(s.state == "sent" for s in sends) else 1
        time.sleep(0.5)
    print(f"gave up after {wait_s:g} s; see `dicom-ai-node status`")
    return 1
