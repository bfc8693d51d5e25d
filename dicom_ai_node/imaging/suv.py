"""PET activity concentration (Bq/mL) -> SUV body weight (g/mL), the vendor-neutral way.

Follows the QIBA / DICOM vendor-neutral SUVbw calculation (the "PET SUV calculation" pseudo-code of the
QIBA FDG-PET profile, as implemented by the DICOM-based SUV tools):

    SUVbw = activity concentration [Bq/mL] * PatientWeight [kg] * 1000 [g/kg] / decayed dose [Bq]

where the decayed dose is RadionuclideTotalDose decayed from the injection (RadiopharmaceuticalStartDateTime,
or RadiopharmaceuticalStartTime on the SeriesDate) to the time the image values are decay corrected to:

- DecayCorrection START: the images are decay corrected to the start of the acquisition, i.e. the series
  date/time; when the SeriesDate/SeriesTime is later than the earliest AcquisitionDate/AcquisitionTime of the
  series (a series re-created after the scan), the earliest acquisition date/time is used instead.
- DecayCorrection ADMIN: the images are decay corrected to the administration time, so the dose is used as is.
- DecayCorrection NONE (or anything else) is refused: each frame would need its own decay factor.

Preconditions (each missing or invalid one raises a ValueError naming the tag): Units BQML, CorrectedImage
containing ATTN and DECY, PatientWeight > 0, and RadiopharmaceuticalInformationSequence[0] with
RadionuclideTotalDose > 0, RadionuclideHalfLife > 0 and a start date/time. A weight is never guessed.
Vendor private tags (GE, Philips SUV scale factors) are not used.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from dicom_ai_node.imaging.errors import tag_name
from dicom_ai_node.imaging.volume import Volume

__all__ = ["SUVError", "suv_bw_factor", "scan_datetime", "to_suv", "SUV_UNIT"]

SUV_UNIT = "g/ml"  # UCUM; the SR unit concept is UCUM "g/ml{SUVbw}"
FACTOR_TOLERANCE = 1e-6  # relative: instances of one series must agree on the factor


class SUVError(ValueError):
    """SUV cannot be computed from the header; the message names the tag at fault."""


def _present(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and ds[keyword].value not in (None, "", b"")


def _positive(ds: Dataset, keyword: str, where: str = "") -> float:
    if not _present(ds, keyword):
        raise SUVError(f"SUV: {where}{tag_name(keyword)} is missing or empty")
    try:
        value = float(ds[keyword].value)
    except (TypeError, ValueError) as exc:
        raise SUVError(f"SUV: {where}{tag_name(keyword)} {ds[keyword].value!r} is not a number") from exc
    if not np.isfinite(value) or value <= 0:
        raise SUVError(f"SUV: {where}{tag_name(keyword)} is {value:g}; a positive value is needed")
    return value


def _naive(value: dt.datetime) -> dt.datetime:
    # Mixed offset-aware/naive values: compare wall-clock times (both are local times of one site).
    return value.replace(tzinfo=None)


def _date_time(ds: Dataset, date_keyword: str, time_keyword: str) -> dt.datetime | None:
    """DA + TM of a dataset as a datetime; None when either is absent. Raises on unparsable values."""
    if not (_present(ds, date_keyword) and _present(ds, time_keyword)):
        return None
    try:
        date = DA(str(ds[date_keyword].value))
        time = TM(str(ds[time_keyword].value))
    except (TypeError, ValueError) as exc:
        raise SUVError(f"SUV: {tag_name(date_keyword)}/{tag_name(time_keyword)} cannot be parsed: {exc}") from exc
    if date is None or time is None:
        return None
    return dt.datetime.combine(date, time.replace(tzinfo=None))


def scan_datetime(datasets: Iterable[Dataset]) -> dt.datetime:
    """The date/time START-decay-corrected images refer to: SeriesDate/Time, or the earliest
    AcquisitionDate/Time of the series when that is earlier (the QIBA rule for post-processed series)."""
    datasets = list(datasets)
    if not datasets:
        raise SUVError("SUV: no instances")
    series = _date_time(datasets[0], "SeriesDate", "SeriesTime")
    if series is None:
        raise SUVError(f"SUV: {tag_name('SeriesDate')} or {tag_name('SeriesTime')} is missing or empty")
    acquisitions = [a for a in (_date_time(ds, "AcquisitionDate", "AcquisitionTime") for ds in datasets) if a]
    earliest = min(acquisitions) if acquisitions else None
    return earliest if earliest is not None and earliest < series else series


def _injection_datetime(ds: Dataset, item: Dataset) -> dt.datetime:
    where = "RadiopharmaceuticalInformationSequence[0] "
    if _present(item, "RadiopharmaceuticalStartDateTime"):
        try:
            value = DT(str(item.RadiopharmaceuticalStartDateTime))
        except (TypeError, ValueError) as exc:
            raise SUVError(f"SUV: {where}{tag_name('RadiopharmaceuticalStartDateTime')} cannot be parsed: {exc}") from exc
        if value is not None:
            return _naive(value)
    if not _present(item, "RadiopharmaceuticalStartTime"):
        raise SUVError(
            f"SUV: {where}has neither {tag_name('RadiopharmaceuticalStartDateTime')} nor "
            f"{tag_name('RadiopharmaceuticalStartTime')}: the injection time is unknown"
        )
    if not _present(ds, "SeriesDate"):
        raise SUVError(f"SUV: {tag_name('SeriesDate')} is missing (needed with RadiopharmaceuticalStartTime)")
    try:
        time = TM(str(item.RadiopharmaceuticalStartTime))
        date = DA(str(ds.SeriesDate))
    except (TypeError, ValueError) as exc:
        raise SUVError(f"SUV: {where}{tag_name('RadiopharmaceuticalStartTime')} cannot be parsed: {exc}") from exc
    return dt.datetime.combine(date, time.replace(tzinfo=None))


def suv_bw_factor(ds: Dataset, scan_time: dt.datetime | None = None) -> float:
    """The factor (g/Bq) that turns Bq/mL into SUVbw (g/mL) for a PET image header.

    `scan_time` is the date/time START decay correction refers to; None: scan_datetime([ds]).
    Raises SUVError (a ValueError) naming the tag when a precondition fails.
    """
    units = str(ds.get("Units", "")).strip().upper()
    if units != "BQML":
        raise SUVError(f"SUV: {tag_name('Units')} is {units or 'absent'}; BQML is needed for SUV body weight")
    raw = ds.get("CorrectedImage") if _present(ds, "CorrectedImage") else []
    corrected = {str(v).strip().upper() for v in ([raw] if isinstance(raw, str) else raw)}
    missing = [c for c in ("ATTN", "DECY") if c not in corrected]
    if missing:
        raise SUVError(
            f"SUV: {tag_name('CorrectedImage')} lacks {' and '.join(missing)}: images not attenuation and decay "
            "corrected cannot give an SUV"
        )
    decay_correction = str(ds.get("DecayCorrection", "")).strip().upper()
    if decay_correction not in ("START", "ADMIN"):
        raise SUVError(f"SUV: {tag_name('DecayCorrection')} is {decay_correction or 'absent'}; START or ADMIN is needed")
    weight_kg = _positive(ds, "PatientWeight")
    items = ds.get("RadiopharmaceuticalInformationSequence") or []
    if not items:
        raise SUVError(f"SUV: {tag_name('RadiopharmaceuticalInformationSequence')} is missing or empty")
    item = items[0]
    where = "RadiopharmaceuticalInformationSequence[0] "
    dose_bq = _positive(item, "RadionuclideTotalDose", where)
    half_life_s = _positive(item, "RadionuclideHalfLife", where)
    if decay_correction == "ADMIN":
        decayed_dose = dose_bq
    else:
        injection = _injection_datetime(ds, item)
        scan = scan_time if scan_time is not None else scan_datetime([ds])
        decay_s = (scan - injection).total_seconds()
        if decay_s < 0:
            raise SUVError(
                f"SUV: the injection ({where}{tag_name('RadiopharmaceuticalStartDateTime')} or StartTime) is "
                f"{-decay_s:.0f} s after the scan start ({tag_name('SeriesTime')}/{tag_name('AcquisitionTime')})"
            )
        decayed_dose = dose_bq * 2.0 ** (-decay_s / half_life_s)
    return weight_kg * 1000.0 / decayed_dose


def to_suv(volume: Volume) -> Volume:
    """The PET volume in SUVbw (unit "g/ml"); raises SUVError when any source lacks what SUV needs."""
    if volume.modality != "PT":
        raise SUVError(f"SUV: modality {volume.modality or 'absent'} is not PT")
    if volume.unit != "Bq/mL":
        raise SUVError(f"SUV: the volume is in {volume.unit!r}, not Bq/mL ({tag_name('Units')} BQML)")
    instances = volume.source_instances
    scan = scan_datetime(instances)
    factors = [suv_bw_factor(ds, scan) for ds in instances]
    factor = factors[0]
    for ds, other in zip(instances[1:], factors[1:]):
        if abs(other - factor) > FACTOR_TOLERANCE * factor:
            raise SUVError(
                f"SUV: instance {ds.get('SOPInstanceUID', '?')} gives SUV factor {other:.6g}, unlike {factor:.6g} "
                "of the first instance (PatientWeight, dose or times differ within the series)"
            )
    array = (volume.array.astype(np.float64) * factor).astype(np.float32)
    return replace(volume, array=array, unit=SUV_UNIT)
