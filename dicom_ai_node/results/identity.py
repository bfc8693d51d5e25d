"""Patient and study identity of a result, copied element by element from the source.

highdicom rebuilds these tags from Python values (dates through DA/TM, names through PersonName) and drops
some (SCImage.from_ref_dataset loses IssuerOfPatientID). PACS match results to the order by these values,
so the node copies the source elements themselves, which keeps their encoded bytes.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy

from pydicom.dataset import Dataset

# Type 2 in every result IOD: present even when empty. IssuerOfPatientID is type 3: absent stays absent.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)
PATIENT_STUDY_TYPE3 = ("IssuerOfPatientID",)
PATIENT_STUDY_KEYWORDS = (*PATIENT_STUDY_TYPE2, *PATIENT_STUDY_TYPE3)


def copy_patient_study(ds: Dataset, source: Dataset) -> None:
    """Make `ds`'s patient/study tags the source's own elements (absent type 2 tags become empty)."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            ds[keyword] = deepcopy(source[keyword])
        elif keyword in PATIENT_STUDY_TYPE2:
            setattr(ds, keyword, None)
        elif keyword in ds:
            del ds[keyword]
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = deepcopy(source.SpecificCharacterSet)
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet


def copy_body_part(ds: Dataset, source: Dataset) -> None:
    """Keep the source's BodyPartExamined: a derived image shows the same anatomy."""
    if source.get("BodyPartExamined"):
        ds.BodyPartExamined = source.BodyPartExamined


def copy_laterality(ds: Dataset, source: Dataset) -> None:
    """Keep the source's Laterality; without it and without BodyPartExamined, send it empty (unknown).

    General Series Laterality is type 2C on a paired body part. dciodvfy cannot judge the condition of an
    SC, Parametric Map or presentation state without BodyPartExamined and reports Laterality missing (an
    Error), so it is kept or sent empty.
    """
    if "Laterality" in source:
        ds["Laterality"] = deepcopy(source["Laterality"])
    elif "BodyPartExamined" not in ds:
        ds.Laterality = None


@contextmanager
def no_person_name_warnings() -> Iterator[None]:
    """Silence highdicom's person-name warning, whose text quotes the name (PHI) into logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent", category=UserWarning)
        yield
