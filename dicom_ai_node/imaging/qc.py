"""Input QC: is a volume inside the range its pipeline was validated on? A pure function of the volume's
header values and the manifest's `accepts`, so the reason a series was not processed can be shown and sent.
"""
from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from dicom_ai_node.imaging.errors import tag_name
from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Accepts, Range

# Contrast/Bolus module tags: a header holding any of them (with a value) shows a contrast-enhanced series.
CONTRAST_TAGS = ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusStartTime")
# Values some scanners write into ContrastBolusAgent/Route of a series without contrast.
NO_CONTRAST_VALUES = {"NONE", "NO", "N/A"}
CONTRAST, NON_CONTRAST = "contrast", "non-contrast"


class InputRejected(ValueError):
    """The input is outside the pipeline's validated range; the message lists every reason, `reasons` each one.

    Both travel in `args`, so the exception keeps its reasons through pickling (worker processes)."""

    def __init__(self, message: str, reasons: Sequence[str] = ()) -> None:
        super().__init__(message, tuple(reasons))
        self.reasons: tuple[str, ...] = tuple(reasons) or (message,)

    def __str__(self) -> str:
        return str(self.args[0])


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _outside(label: str, value: float | None, allowed: Range | None, unit: str) -> list[str]:
    if allowed is None or value is None or allowed.contains(value):
        return []
    bounds = " to ".join(f"{b:g}" if b is not None else "any" for b in (allowed.min, allowed.max))
    return [f"{label} {value:g} {unit} is outside the validated {bounds} {unit}"]


def _tracer(ds: Dataset) -> str:
    items = ds.get("RadiopharmaceuticalInformationSequence") or []
    return str(items[0].get("Radiopharmaceutical", "")) if items else ""


def contrast_evidence(ds: Dataset) -> str | None:
    """The first Contrast/Bolus tag holding a value (not NONE/NO/N/A): the header says contrast was given."""
    for keyword in CONTRAST_TAGS:
        value = str(ds.get(keyword, "") or "").strip()
        if value and value.upper() not in NO_CONTRAST_VALUES:
            return keyword
    return None


def contrast_phase(ds: Dataset) -> str:
    """'contrast' when the header names a contrast agent, route or start time, else 'non-contrast'."""
    return CONTRAST if contrast_evidence(ds) is not None else NON_CONTRAST


def _contrast_problems(header: Dataset, allowed: Sequence[str]) -> list[str]:
    if not allowed:
        return []
    evidence = contrast_evidence(header)
    phase = CONTRAST if evidence is not None else NON_CONTRAST
    if phase in allowed:
        return []
    why = (f"{tag_name(evidence)} is present" if evidence is not None
           else "none of " + ", ".join(tag_name(k) for k in CONTRAST_TAGS) + " is present")
    return [f"contrast phase {phase} ({why}) is not one of {', '.join(allowed)}"]


def input_problems(volume: Volume, accepts: Accepts) -> list[str]:
    """Every way `volume` falls outside `accepts`; empty when the pipeline may run on it."""
    header = volume.sources[0]
    problems = []
    modality = str(header.get("Modality", ""))
    if accepts.modality and modality.upper() not in {m.upper() for m in accepts.modality}:
        problems.append(f"Modality {modality or 'absent'} is not one of {', '.join(accepts.modality)}")
    body_part = str(header.get("BodyPartExamined", "")).upper()
    if accepts.body_part and body_part and body_part not in {b.upper() for b in accepts.body_part}:
        problems.append(f"BodyPartExamined {body_part} is not one of {', '.join(accepts.body_part)}")
    slices = volume.array.shape[0]
    if slices < accepts.min_slices:
        problems.append(f"{slices} slices, fewer than the {accepts.min_slices} required")
    thickness = _number(header, "SliceThickness") or (volume.spacing[0] if slices > 1 else None)
    problems += _outside("slice thickness", thickness, accepts.slice_thickness_mm, "mm")
    for axis, spacing in zip(("row", "column"), volume.spacing[1:]):
        problems += _outside(f"{axis} pixel spacing", spacing, accepts.pixel_spacing_mm, "mm")
    problems += _outside("kVp", _number(header, "KVP"), accepts.kvp, "kV")
    problems += _outside("field strength", _number(header, "MagneticFieldStrength"),
                         accepts.magnetic_field_strength_t, "T")
    if accepts.radiopharmaceutical:
        tracer = _tracer(header)
        if tracer.upper() not in {t.upper() for t in accepts.radiopharmaceutical}:
            problems.append(f"radiopharmaceutical {tracer or 'absent'} is not one of "
                            f"{', '.join(accepts.radiopharmaceutical)}")
    problems += _contrast_problems(header, accepts.contrast)
    return problems
