"""Query/Retrieve identifiers and answers of batch jobs, as pure functions (tests cover them exhaustively).

Only UIDs, dates, modalities and counts are asked for and read: the node never needs a patient's name or
ID to pull a study, so none reaches its logs or state.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Iterable

from pydicom.dataset import Dataset

from dicom_ai_node.config import DERIVED_MODALITIES, BatchJob

STATUS_SUCCESS = 0x0000
STATUS_WARNING = 0xB000  # sub-operations complete, one or more failed or delivered with warnings
STATUS_CANCELLED = 0xFE00
PENDING_STATUSES = {0xFF00, 0xFF01}
MOVE_FAILURES = {
    0xA701: "the PACS is out of resources: it cannot count the instances to move",
    0xA702: "the PACS is out of resources: it cannot start the sub-operations",
    0xA801: "the PACS does not know the move destination {ae}: add the node to the PACS's DICOM nodes "
            "(AE title {ae}, this host, the node's port)",
    0xA900: "the PACS says the identifier does not match the SOP class",
    STATUS_CANCELLED: "the move was cancelled",
    STATUS_WARNING: "the PACS could not deliver some instances to {ae} (is the node running, and reachable "
                    "from the PACS at the host and port it has for {ae}?)",
}


def study_date_range(days: int, today: date) -> str:
    """The DICOM date range of the last `days` days, today included: 1 -> today only."""
    first = today - timedelta(days=days - 1)
    return f"{first:%Y%m%d}-{today:%Y%m%d}"


def study_identifier(job: BatchJob, today: date) -> Dataset:
    """The STUDY level C-FIND identifier of `job`: its matching keys, and the return keys the run needs."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.StudyDate = study_date_range(job.study_days, today) if job.study_days else ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = ""
    for keyword, value in job.query.items():
        setattr(ds, keyword, value)
    return ds


# Attributes of a Scheduled Procedure Step (PS3.4 K.6.1.2.2): a worklist matches them in the step's item.
SCHEDULED_STEP_KEYWORDS = frozenset({
    "Modality", "ScheduledStationAETitle", "ScheduledStationName", "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID", "ScheduledProcedureStepStatus", "ScheduledPerformingPhysicianName",
})


def worklist_identifier(job: BatchJob, today: date) -> Dataset:
    """The Modality Worklist C-FIND identifier of a worklist job: the StudyInstanceUIDs of the procedure
    steps its keys match (study_days: steps scheduled to start in the last N days)."""
    assert job.worklist is not None
    step = Dataset()
    step.Modality = ""
    step.ScheduledProcedureStepStartDate = study_date_range(job.study_days, today) if job.study_days else ""
    ds = Dataset()
    ds.StudyInstanceUID = ""
    for keyword, value in job.worklist.query.items():
        setattr(step if keyword in SCHEDULED_STEP_KEYWORDS else ds, keyword, value)
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def series_identifier(job: BatchJob, study_uid: str) -> Dataset:
    """The SERIES level C-FIND identifier of one study's series, with `job`'s series matching keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.NumberOfSeriesRelatedInstances = ""
    for keyword, value in job.series.items():
        setattr(ds, keyword, value)
    return ds


def move_identifier(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


@dataclass(frozen=True)
class SeriesToPull:
    series_uid: str
    modality: str
    instances: int | None  # as the PACS counts them (None when it does not say)


def answered_uid(identifier: Dataset, keyword: str) -> str:
    """The UID an answer carries under `keyword` ('' when it has none or an unusable one)."""
    value = str(identifier.get(keyword, "") or "").strip().rstrip("\0")
    return value if value and len(value) <= 64 and all(c.isdigit() or c == "." for c in value) else ""


def answered_count(identifier: Dataset, keyword: str) -> int | None:
    """The count an answer or status carries under `keyword` (None when it has none or an unusable one)."""
    try:
        value = identifier.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def studies_found(answers: Iterable[Dataset], limit: int) -> tuple[list[str], int]:
    """(study UIDs in answer order, once each, at most `limit`; how many distinct studies matched)."""
    seen: dict[str, None] = {}  # ordered, and a look-up per answer
    for identifier in answers:
        uid = answered_uid(identifier, "StudyInstanceUID")
        if uid:
            seen.setdefault(uid)
    return list(seen)[:limit], len(seen)


def study_summary(identifier: Dataset) -> str:
    """What an answer says of its study, for a dry run: modalities and instance count (no dates, no names)."""
    modalities = identifier.get("ModalitiesInStudy")
    if modalities is None and "ScheduledProcedureStepSequence" in identifier:
        steps = identifier.ScheduledProcedureStepSequence
        modalities = [step.get("Modality", "") for step in steps]
    if isinstance(modalities, str):
        modalities = [modalities]
    text = "/".join(str(m) for m in (modalities or []) if str(m).strip()) or "modality not given"
    count = answered_count(identifier, "NumberOfStudyRelatedInstances")
    return f"{text}, {count} instances" if count is not None else text


def series_to_pull(job: BatchJob, answers: Iterable[Dataset]) -> list[SeriesToPull]:
    """The series of a study's SERIES level answers that the job pulls: every one the PACS matched, less
    derived objects (SEG, SR, ...: the node's own results among them) unless the job asks for a Modality."""
    pulled: dict[str, SeriesToPull] = {}
    for identifier in answers:
        uid = answered_uid(identifier, "SeriesInstanceUID")
        modality = str(identifier.get("Modality", "") or "").strip().upper()
        if not uid or uid in pulled:
            continue
        if "Modality" not in job.series and modality in DERIVED_MODALITIES:
            continue
        pulled[uid] = SeriesToPull(uid, modality, answered_count(identifier, "NumberOfSeriesRelatedInstances"))
    return list(pulled.values())


def failed_move_status(code: int, failed: int) -> int | None:
    """None when a final C-MOVE status says every instance was delivered (success; or warning with none
    failed: some stored with warnings, stored all the same); else the status to explain, a success that
    still counts failed sub-operations being the warning it is."""
    if code in (STATUS_SUCCESS, STATUS_WARNING) and failed == 0:
        return None
    return STATUS_WARNING if code == STATUS_SUCCESS else code


# What differs when the node retrieves with C-GET: the instances come back on its own association.
GET_FAILURES = {
    STATUS_WARNING: "some instances were not stored by the node (see its log: refused, or the disk is full)",
    0xA702: "the PACS is out of resources, or the node did not accept the storage class of the instances",
}


def move_failure(status: int, node_ae: str, comment: str = "", service: str = "C-MOVE") -> str:
    """What a final C-MOVE (or C-GET) status other than success means, for the operator; `node_ae` is the
    node's AE title (the move destination), `comment` the PACS's ErrorComment (LO, at most 64 characters: a
    reason, not data)."""
    text = (GET_FAILURES.get(status) if service == "C-GET" else None) or MOVE_FAILURES.get(status)
    if text is None and 0xC000 <= status <= 0xCFFF:
        # Orthanc, among others, answers so when it has no address for the move destination.
        text = ("the PACS could not process the C-GET (does it allow C-GET from {ae}?)" if service == "C-GET"
                else "the PACS could not process the move (does it know {ae} as a DICOM node, with this host "
                     "and port?)")
    if text is None:
        text = f"the PACS answered with a status the standard does not define for {service}"
    said = f'; the PACS says: "{comment.strip()[:64]}"' if comment.strip() else ""
    return f"{service} status 0x{status:04X}: {text.format(ae=node_ae)}{said}"
