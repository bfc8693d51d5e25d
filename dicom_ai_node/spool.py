"""Durable instance storage and the integrity checks done before an instance is acknowledged.

An instance is written to a temporary file in its final folder, fsynced, renamed into place and the folder
fsynced: after `store_instance` returns, a power cut cannot lose it. Paths are built only from UIDs that
passed `is_safe_uid`, so a hostile UID such as "../../etc" never becomes a path.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

UNDEFINED_LENGTH = 0xFFFFFFFF
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"}


class InvalidInstance(ValueError):
    """The received bytes are not a complete, usable DICOM instance; the message names the tag at fault."""


def is_safe_uid(value: str) -> bool:
    """A UID that may become a path component: digits and dots, 1-64 chars, no empty component."""
    return len(value) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) is not None


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    routing_header: dict[str, Any]  # flat keyword -> str | list[str], for rules; no sequences or binary


def _value_end(element: RawDataElement) -> int:
    if element.length == UNDEFINED_LENGTH:
        return element.value_tell + len(element.value or b"") + 8  # sequence delimitation item
    return element.value_tell + element.length


def _check_complete(raw: bytes, ds: Dataset) -> None:
    """Reject a dataset whose last element stops short of the end of the stream (a truncated transfer)."""
    elements = ds._dict  # noqa: SLF001 - the raw elements carry the stream offsets we need
    for tag, element in elements.items():
        if isinstance(element, RawDataElement) and element.length != UNDEFINED_LENGTH:
            if element.value is not None and len(element.value) < element.length:
                raise InvalidInstance(f"element {tag} is truncated: {len(element.value)} of {element.length} bytes")
    last = elements[max(elements)]
    if isinstance(last, RawDataElement) and last.value_tell is not None and _value_end(last) != len(raw):
        raise InvalidInstance(f"stream of {len(raw)} bytes ends inside element {last.tag}")


def _expected_native_pixel_bytes(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    return (pixels * bits + 7) // 8


def _routing_header(ds: Dataset) -> dict[str, Any]:
    header: dict[str, Any] = {}
    # Look at the raw elements first: converting every element (private ones included) is most of the
    # cost of receiving an instance, and rules only ever name standard, non-binary attributes.
    for tag, raw in ds._dict.items():  # noqa: SLF001
        if tag.is_private or tag.group == 0x7FE0:
            continue
        keyword = keyword_for_tag(tag)
        if not keyword or (getattr(raw, "VR", None) or dictionary_VR(tag)) in _BINARY_VRS:
            continue
        value = ds[tag].value
        if isinstance(value, MultiValue):
            header[keyword] = [str(v) for v in value]
        elif value is None:
            header[keyword] = ""
        else:
            header[keyword] = str(value)
    return header


def parse_instance(raw: bytes, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    """Parse and check a received instance (file meta + dataset bytes). Raises InvalidInstance."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom only warns when a stream ends before a delimiter
            ds = pydicom.dcmread(io.BytesIO(raw))
            _check_complete(raw, ds)
            header = _routing_header(ds)
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input; all mean "cannot understand"
        raise InvalidInstance(f"cannot parse dataset: {type(exc).__name__}") from exc
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
        value = str(ds.get(keyword, ""))
        if not is_safe_uid(value):
            raise InvalidInstance(f"{keyword} is missing or not a valid UID")
    if str(ds.SOPInstanceUID) != sop_instance_uid or str(ds.SOPClassUID) != sop_class_uid:
        raise InvalidInstance("SOPInstanceUID/SOPClassUID of the dataset differ from the C-STORE request")
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    if "PixelData" in ds and not transfer_syntax.is_compressed:
        try:
            expected = _expected_native_pixel_bytes(ds)
        except (AttributeError, TypeError, ValueError) as exc:
            raise InvalidInstance(f"image pixel module incomplete: {exc}") from exc
        if len(ds.PixelData) < expected:
            raise InvalidInstance(f"PixelData (7FE0,0010) has {len(ds.PixelData)} bytes, expected {expected}")
    return InstanceHeader(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        transfer_syntax_uid=str(transfer_syntax),
        routing_header=header,
    )


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that it is complete on disk or absent, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def instance_path(spool_dir: Path, header: InstanceHeader) -> Path:
    for uid in (header.study_uid, header.series_uid, header.sop_instance_uid):
        if not is_safe_uid(uid):
            raise InvalidInstance("unsafe UID")  # parse_instance already checked; defence in depth
    return spool_dir / header.study_uid / header.series_uid / f"{header.sop_instance_uid}.dcm"


def store_instance(spool_dir: Path, header: InstanceHeader, raw: bytes) -> Path:
    path = instance_path(spool_dir, header)
    write_durably(path, raw)
    return path
