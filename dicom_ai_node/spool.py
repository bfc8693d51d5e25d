"""Durable instance storage and the integrity checks done before an instance is acknowledged.

A received instance is held in memory while it is small and then handed, checked (`IncomingInstance.check`),
to the ingest journal (receive/journal.py), which makes it durable and places it in the spool. One too
large to hold is streamed to a temporary file in the spool, checked, fdatasynced, renamed into its folder
and the folder fsynced (`IncomingInstance.commit`): after that a power cut cannot lose it. Paths are built
only from UIDs that passed `is_safe_uid`, so a hostile UID such as "../../etc" never becomes a path.

The checks read the received bytes without decoding them into a pydicom Dataset: one walk over the
element headers proves the stream is complete (no element and no sequence cut short) and collects the
top-level elements, whose values become the flat routing header. pydicom decodes only what that walk does
not cover: big endian and deflated transfer syntaxes, and text in a non-ASCII character set.
"""
from __future__ import annotations

import io
import mmap
import os
import re
import shutil
import struct
import threading
import time
import uuid
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.values import TEXT_VR_DELIMS

UNDEFINED_LENGTH = 0xFFFFFFFF
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"}


class InvalidInstance(ValueError):
    """The received bytes are not a complete, usable DICOM instance; the message names the tag at fault."""


_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_safe_uid(value: str) -> bool:
    """A UID that may become a path component: digits and dots, 1-64 chars, no empty component."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    routing_header: dict[str, Any]  # flat keyword -> str | list[str], for rules; no sequences or binary


# -- the raw walk ----------------------------------------------------------------------------------------

_VRS = frozenset(v.encode() for v in (
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
).split())
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_unpack_tag_length = struct.Struct("<HHI").unpack_from
_unpack_explicit = struct.Struct("<HH2sH").unpack_from
_unpack_u32 = struct.Struct("<I").unpack_from

class _Elements:
    """The top-level elements found by the walk, per tag: (value offset, value length (None: undefined), VR
    (None in an implicit VR dataset)). One entry per element, as the walk of every received instance makes it."""

    __slots__ = ("found",)

    def __init__(self) -> None:
        self.found: dict[int, tuple[int, int | None, bytes | None]] = {}

    def length(self, tag: int) -> int | None:
        """The value length of `tag`: None when it is absent or of undefined length."""
        entry = self.found.get(tag)
        return None if entry is None else entry[1]

    def vr(self, tag: int) -> bytes | None:
        entry = self.found.get(tag)
        return None if entry is None else entry[2]


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _walk(buf: Any, pos: int, end: int, explicit: bool, nested: bool, top: _Elements | None) -> int:
    """Walk one dataset's elements from `pos`; returns the offset after it.

    `nested`: the dataset is an undefined-length item, ended by an Item Delimitation Item. `top`, when
    given, collects the elements (the top level). Raises InvalidInstance where the stream ends early.
    This runs for every received instance: the look-ups are bound to locals.
    """
    found = top.found if top is not None else None
    unpack_explicit, unpack_u32, unpack_tag_length = _unpack_explicit, _unpack_u32, _unpack_tag_length
    long_length_vrs, known_vrs = _LONG_LENGTH_VRS, _VRS
    while pos < end:
        if pos + 8 > end:
            raise InvalidInstance(f"stream of {end} bytes ends inside an element header at byte {pos}")
        if explicit:
            group, element, vr, length = unpack_explicit(buf, pos)
            if group == 0xFFFE:  # item tags carry no VR, in any transfer syntax
                vr = None
                length = unpack_u32(buf, pos + 4)[0]
                value_pos = pos + 8
            elif vr in long_length_vrs:
                if pos + 12 > end:
                    tag = group << 16 | element
                    raise InvalidInstance(f"stream of {end} bytes ends inside the header of {_tag_str(tag)}")
                length = unpack_u32(buf, pos + 8)[0]
                value_pos = pos + 12
            elif vr in known_vrs:
                value_pos = pos + 8
            else:
                raise InvalidInstance(f"element {_tag_str(group << 16 | element)} has no valid VR")
        else:
            group, element, length = unpack_tag_length(buf, pos)
            vr = None
            value_pos = pos + 8
        tag = group << 16 | element
        if group == 0xFFFE:
            if tag == _ITEM_END and nested:
                return value_pos
            raise InvalidInstance(f"unexpected item tag {_tag_str(tag)} at byte {pos}")
        if length == UNDEFINED_LENGTH:
            # A sequence, encapsulated pixel data or an undefined-length UN (whose items are implicit VR)
            pos = _skip_items(buf, value_pos, end, explicit and vr != b"UN", tag)
            length = None
        else:
            pos = value_pos + length
            if pos > end:
                raise InvalidInstance(
                    f"element {_tag_str(tag)} is truncated: {max(end - value_pos, 0)} of {length} bytes")
        if found is not None:
            found[tag] = (value_pos, length, vr)
    if nested:
        raise InvalidInstance(f"stream of {end} bytes ends inside a sequence item")
    return pos


def _skip_items(buf: Any, pos: int, end: int, explicit: bool, tag: int) -> int:
    """Skip the items of an undefined-length value; returns the offset after its Sequence Delimitation Item."""
    while True:
        if pos + 8 > end:
            raise InvalidInstance(f"stream of {end} bytes ends inside {_tag_str(tag)}")
        group, element, length = _unpack_tag_length(buf, pos)
        pos += 8
        item = group << 16 | element
        if item == _SEQUENCE_END:
            return pos
        if item != _ITEM:
            raise InvalidInstance(f"{_tag_str(tag)} holds {_tag_str(item)} where an item should be")
        if length == UNDEFINED_LENGTH:
            pos = _walk(buf, pos, end, explicit, True, None)
        else:
            pos += length
            if pos > end:
                raise InvalidInstance(f"an item of {_tag_str(tag)} is truncated")


# -- values of the top-level elements ---------------------------------------------------------------------

_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_CHARSET_VRS = {"SH", "LO", "UC", "LT", "ST", "UT", "PN"}  # decoded with the Specific Character Set
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"} | _CHARSET_VRS


def _routing_tag(tag: int) -> tuple[str, str] | None:
    """(keyword, dictionary VR) of a standard, non-private, non-pixel tag with a keyword, else None."""
    if (tag >> 16) & 1 or tag >> 16 == 0x7FE0:
        return None
    keyword = keyword_for_tag(tag)
    return (keyword, dictionary_VR(tag)) if keyword else None


@lru_cache(maxsize=64)
def _syntax(transfer_syntax_uid: str) -> tuple[bool, bool, bool, bool]:
    """(implicit VR, compressed pixel data, deflated, read by the raw walk) of a transfer syntax."""
    ts = UID(transfer_syntax_uid)
    walks = ts.is_transfer_syntax and ts.is_little_endian
    return ts.is_implicit_VR, ts.is_compressed, ts.is_deflated, walks


MAX_INFLATED_BYTES = 512 * 1024 * 1024  # a deflated dataset may not inflate to more (a zip bomb)


def _inflate(buf: Any, start: int) -> bytes:
    """The dataset of a Deflated Explicit VR Little Endian stream (raw deflate after the file meta)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(bytes(buf[start:]), MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise InvalidInstance(f"deflated dataset cannot be inflated: {exc}") from exc
    if inflater.unconsumed_tail:
        raise InvalidInstance(f"deflated dataset inflates to more than {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        raise InvalidInstance("deflated dataset is truncated")
    return data


def _split_text(vr: str, text: str) -> str | list[str]:
    """What str() of pydicom's value gives for a decoded text value (pydicom.values' rules per VR)."""
    if vr in ("LT", "ST", "UT"):
        return text.rstrip("\0 ")
    if vr == "UR":
        return text.rstrip()
    if vr == "AE":
        values = [v.strip() for v in text.split("\\")]
    elif vr in ("SH", "LO", "UC"):
        values = [v.rstrip("\0 ") for v in text.split("\\")]
    elif vr in ("DS", "IS"):
        values = [v.strip() for v in text.strip().rstrip(" \0").split("\\")]
    elif vr == "PN":  # PersonName drops empty trailing component groups ("Doe^John=" reads "Doe^John")
        values = [v.rstrip("=") for v in text.rstrip(" \0").split("\\")]
    else:  # AS CS DA DT TM UI
        values = text.rstrip(" \0").split("\\")
    return values[0] if len(values) == 1 else values


def _binary_value(vr: str, raw: bytes) -> str | list[str] | None:
    """The routing-header value of a number or AT element as str(pydicom's value) reads, or None when it has
    none (other binary VRs, a length that does not fit the VR)."""
    if vr in _NUMBER_FORMATS:
        fmt = _NUMBER_FORMATS[vr]
        size = struct.calcsize(f"<{fmt}")
        if len(raw) % size:
            return None
        numbers = [str(n) for n in struct.unpack(f"<{len(raw) // size}{fmt}", raw)]
        return numbers[0] if len(numbers) == 1 else numbers
    if vr == "AT":
        if len(raw) % 4:
            return None
        pairs = struct.unpack(f"<{len(raw) // 2}H", raw)
        tags = [f"({pairs[i]:04X},{pairs[i + 1]:04X})" for i in range(0, len(pairs), 2)]
        return tags[0] if len(tags) == 1 else tags
    return None


class _Values:
    """Decodes top-level element values for the routing header, as str(pydicom's value) would read."""

    def __init__(self, buf: Any, elements: _Elements) -> None:
        self.buf = buf
        self.elements = elements
        self._encodings: list[str] | None = None

    def raw(self, tag: int) -> bytes | None:
        entry = self.elements.found.get(tag)
        if entry is None or entry[1] is None:
            return None
        pos, length, _ = entry
        return bytes(self.buf[pos:pos + length])

    def encodings(self) -> list[str]:
        if self._encodings is None:
            raw = self.raw(0x00080005)
            names: Any = None
            if raw:
                names = _split_text("CS", raw.decode("latin-1"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._encodings = convert_encodings(names)
        return self._encodings

    def ambiguous_vr(self, vr: str) -> str | None:
        if vr == "US or SS":  # as pydicom resolves it for the pixel-value attributes
            representation = self.number(0x00280103)
            return "SS" if representation == 1 else "US"
        return None  # "OB or OW", "US or OW", "US or SS or OW": binary, never in the routing header

    def number(self, tag: int) -> int | None:
        """The first value of a US or IS element (the image pixel module), or None."""
        raw = self.raw(tag)
        if not raw:
            return None
        vr = self.elements.vr(tag)
        if (vr.decode("ascii") if vr is not None else dictionary_VR(tag)) in ("US", "SS", "US or SS"):
            return struct.unpack_from("<H", raw)[0] if len(raw) >= 2 else None
        try:
            return int(raw.decode("latin-1").split("\\")[0].strip())
        except ValueError:
            return None

    def text(self, vr: str, raw: bytes) -> str | list[str]:
        """A text value in a non-ASCII character set (or with escape sequences)."""
        if vr == "PN":
            raw = raw.rstrip(b"\0 ")
        if vr in _CHARSET_VRS:
            text = decode_bytes(raw, self.encodings(), TEXT_VR_DELIMS)
        else:
            text = raw.decode("latin-1")  # pydicom's default encoding for the other text VRs
        return _split_text(vr, text)

    def routing_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {}
        buf = self.buf
        known_values = _header_values
        for tag, (pos, length, raw_vr) in self.elements.found.items():
            known = _routing_tags.get(tag, _UNSEEN)
            if known is _UNSEEN:
                known = _routing_tags[tag] = _routing_tag(tag)
            if known is None or length is None:
                continue
            keyword, vr = known
            if raw_vr is not None and raw_vr != b"UN":
                vr = _VR_NAMES[raw_vr]  # the VR the sender wrote wins, as in pydicom
            elif " or " in vr:  # implicit VR, or UN that pydicom replaces by the dictionary's VR
                vr = self.ambiguous_vr(vr)
                if vr is None:
                    continue
            if vr in _BINARY_VRS:
                continue
            if not length:
                header[keyword] = ""
                continue
            raw = bytes(buf[pos:pos + length])
            key = (tag, vr, raw)
            value: Any = known_values.get(key)
            if value is None:
                if vr in _TEXT_VRS:
                    if not raw.isascii() or b"\x1b" in raw:  # read with the character set: not remembered
                        header[keyword] = self.text(vr, raw)
                        continue
                    value = _split_text(vr, raw.rstrip(b"\0 ").decode("ascii") if vr == "PN" else raw.decode("ascii"))
                else:
                    value = _binary_value(vr, raw)
                    if value is None:
                        continue
                if isinstance(value, list):
                    value = tuple(value)
                if len(known_values) >= _HEADER_VALUES_LIMIT:
                    known_values.clear()
                known_values[key] = value
            header[keyword] = list(value) if type(value) is tuple else value
        return header


# The routing-header value of (tag, VR, value bytes), for values that need nothing else to be read (ASCII
# text, numbers): the instances of a series repeat most of their values (patient, study, series,
# equipment), and this runs for every top-level element of every received instance.
_header_values: dict[tuple[int, str, bytes], Any] = {}
_HEADER_VALUES_LIMIT = 16384
_routing_tags: dict[int, tuple[str, str] | None] = {}  # _routing_tag, remembered without lru_cache's call
_UNSEEN = object()
_VR_NAMES = {vr: vr.decode("ascii") for vr in _VRS}


def _expected_pixel_bytes(values: _Values) -> int:
    rows, columns, bits = values.number(0x00280010), values.number(0x00280011), values.number(0x00280100)
    if rows is None or columns is None or bits is None:
        missing = [k for k, v in (("Rows", rows), ("Columns", columns), ("BitsAllocated", bits)) if v is None]
        raise InvalidInstance(f"image pixel module incomplete: {', '.join(missing)} missing")
    samples = values.number(0x00280002) or 1
    frames = values.number(0x00280008) or 1
    return (rows * columns * samples * frames * bits + 7) // 8


def parse_dataset(buf: Any, start: int, transfer_syntax_uid: str, sop_class_uid: str,
                  sop_instance_uid: str) -> InstanceHeader:
    """Check a received dataset (little endian, deflated or not) held in buf[start:] and read its header."""
    implicit, compressed, deflated, _ = _syntax(transfer_syntax_uid)
    if deflated:
        buf, start = _inflate(buf, start), 0
    elements = _Elements()
    try:
        _walk(buf, start, len(buf), not implicit, False, elements)
    except RecursionError as exc:
        raise InvalidInstance("sequences nested too deeply") from exc
    values = _Values(buf, elements)
    uids = {}
    for keyword, tag in (("SOPInstanceUID", 0x00080018), ("SeriesInstanceUID", 0x0020000E),
                         ("StudyInstanceUID", 0x0020000D), ("SOPClassUID", 0x00080016)):
        raw = values.raw(tag)
        value = raw.decode("latin-1").rstrip("\0 ") if raw else ""
        if not is_safe_uid(value):
            raise InvalidInstance(f"{keyword} is missing or not a valid UID")
        uids[keyword] = value
    if uids["SOPInstanceUID"] != sop_instance_uid or uids["SOPClassUID"] != sop_class_uid:
        raise InvalidInstance("SOPInstanceUID/SOPClassUID of the dataset differ from the C-STORE request")
    if 0x7FE00010 in elements.found and not compressed:
        expected = _expected_pixel_bytes(values)
        length = elements.length(0x7FE00010) or 0
        if length < expected:
            raise InvalidInstance(f"PixelData (7FE0,0010) has {length} bytes, expected {expected}")
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        routing_header=values.routing_header(),
    )


def walks_raw(transfer_syntax_uid: str) -> bool:
    """Whether `parse_dataset` reads this transfer syntax (else pydicom decodes the instance)."""
    return _syntax(transfer_syntax_uid)[3]


# -- pydicom, for what the raw walk does not read ---------------------------------------------------------

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


def parse_with_pydicom(raw: bytes, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    """`parse_instance` through a pydicom Dataset: any transfer syntax, but several times slower."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom only warns when a stream ends before a delimiter
            ds = pydicom.dcmread(io.BytesIO(raw))
            if not ds.file_meta.TransferSyntaxUID.is_deflated:  # offsets are in the inflated stream
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


# -- file meta --------------------------------------------------------------------------------------------

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.7.1"  # under pydicom's root, like every UID we make
IMPLEMENTATION_VERSION_NAME = "DICOM_AI_NODE_1"


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = "") -> bytes:
    """Preamble, 'DICM' and the File Meta Information group of a received instance (PS3.10 7.1)."""
    body = b"".join([
        _meta_element(0x00020001, b"OB", b"\x00\x01"),
        _meta_element(0x00020002, b"UI", sop_class_uid.encode()),
        _meta_element(0x00020003, b"UI", sop_instance_uid.encode()),
        _meta_element(0x00020010, b"UI", transfer_syntax_uid.encode()),
        _meta_element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
        _meta_element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode()),
    ] + ([_meta_element(0x00020016, b"AE", source_ae.encode("ascii", "replace"))] if source_ae else []))
    return b"\0" * 128 + b"DICM" + _meta_element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def _read_file_meta(raw: Any) -> tuple[str, int] | None:
    """(TransferSyntaxUID, offset of the dataset) of a file with preamble, or None when it has none."""
    if len(raw) < 144 or bytes(raw[128:132]) != b"DICM":
        return None
    pos, transfer_syntax = 132, None
    while pos + 8 <= len(raw):
        group, element, vr, length = _unpack_explicit(raw, pos)
        if group != 0x0002:
            break
        pos += 8
        if vr in _LONG_LENGTH_VRS:
            length = _unpack_u32(raw, pos)[0]
            pos += 4
        if element == 0x0010:
            transfer_syntax = bytes(raw[pos:pos + length]).decode("latin-1").rstrip("\0 ")
        pos += length
    return (transfer_syntax, pos) if transfer_syntax and pos <= len(raw) else None


def parse_instance(raw: bytes, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    """Parse and check an instance file (preamble, file meta, dataset). Raises InvalidInstance."""
    try:
        meta = _read_file_meta(raw)
    except (InvalidInstance, struct.error):
        meta = None
    if meta is not None and walks_raw(meta[0]):
        return parse_dataset(raw, meta[1], meta[0], sop_class_uid, sop_instance_uid)
    return parse_with_pydicom(raw, sop_class_uid, sop_instance_uid)


# -- durable files ----------------------------------------------------------------------------------------

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


def instance_path(spool_dir: Path | str, header: InstanceHeader) -> str:
    """`<spool>/<study>/<series>/<instance>.dcm`, as a string: made for every received instance, where pathlib's
    joins would cost more than the rest of the naming."""
    for uid in (header.study_uid, header.series_uid, header.sop_instance_uid):
        if not is_safe_uid(uid):
            raise InvalidInstance("unsafe UID")  # parse_instance already checked; defence in depth
    sep = os.sep
    return f"{os.fspath(spool_dir)}{sep}{header.study_uid}{sep}{header.series_uid}{sep}{header.sop_instance_uid}.dcm"


# How stale the free-space figure of the spool may get before it is measured again (a statvfs per C-STORE
# would cost as much as naming the instance); an instance that does not fit still fails at its write.
FREE_SPACE_RECHECK_S = 0.25
FREE_SPACE_RECHECK_BYTES = 256 * 1024 * 1024


def free_space_recheck_due(now: float, measured_at: float | None, received_since: int) -> bool:
    """Whether to measure the spool's free space again before the next C-STORE."""
    return (measured_at is None or now - measured_at >= FREE_SPACE_RECHECK_S or now < measured_at
            or received_since >= FREE_SPACE_RECHECK_BYTES)


class FreeSpaceGauge:
    """The spool's free space, measured at most every FREE_SPACE_RECHECK_S or FREE_SPACE_RECHECK_BYTES
    received, less what was received since (one thread: the receive loop)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._free = 0
        self._measured_at: float | None = None
        self._received_since = 0

    def free_bytes(self) -> int:
        """The free space (OSError when it cannot be measured)."""
        now = time.monotonic()
        if free_space_recheck_due(now, self._measured_at, self._received_since):
            self._measured_at = None  # measured again next time if this raises
            self._free = shutil.disk_usage(self.folder).free
            self._measured_at, self._received_since = now, 0
        return self._free - self._received_since

    def received(self, size: int) -> None:
        self._received_since += size


class _DurableFolders:
    """Folders of the spool whose entry is known to be on disk (their parent was fsynced after mkdir)."""

    def __init__(self, limit: int = 4096) -> None:
        self._known: OrderedDict[Path, None] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def ensure(self, folder: Path, root: Path) -> None:
        with self._lock:
            if folder in self._known:
                self._known.move_to_end(folder)
                return
        # Create downwards from the root, fsyncing each parent, so no acknowledged file hangs off a folder
        # entry that a power cut could still take away.
        chain = [folder]
        while chain[-1] != root and chain[-1].parent != chain[-1]:
            chain.append(chain[-1].parent)
        for child in reversed(chain[:-1]):
            try:
                os.mkdir(child)
            except FileExistsError:
                pass
            fsync_dir(child.parent)
        with self._lock:
            self._known[folder] = None
            while len(self._known) > self._limit:
                self._known.popitem(last=False)

    def forget(self, folder: Path) -> None:
        with self._lock:
            self._known.pop(folder, None)


_folders = _DurableFolders()


SPILL_BYTES = 8 * 1024 * 1024  # a dataset larger than this goes to its file as it arrives


class IncomingInstance:
    """A C-STORE's dataset, kept in memory while it is small and streamed to a temporary file in the spool
    once it is not (so no instance, however large, is ever held whole in memory).

    `commit` checks it, makes it durable under its final name and returns (path, header); `discard` removes
    it. Temporary names match `.*.tmp`, which the service removes at start-up (a write never acknowledged).
    """

    def __init__(self, spool_dir: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                 source_ae: str = "") -> None:
        self.spool_dir = spool_dir
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax_uid = transfer_syntax_uid
        self.tmp: Path | None = None  # named when it is created: most instances never need one
        self.meta = file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae)
        self.meta_size = len(self.meta)
        self.dataset_size = 0
        self._data = bytearray()  # the dataset while it is in memory
        self._fd: int | None = None
        self._created = False  # the temporary file exists

    def _open(self, folder: Path | None = None) -> None:
        """Create the temporary file: in the instance's own folder once that is known (the rename then
        changes one folder only), else in the spool's root."""
        name = self.tmp.name if self.tmp is not None else f".incoming-{uuid.uuid4().hex}.tmp"
        self.tmp = (folder or self.spool_dir) / name
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._created = True
        self._write(self.meta)
        self._write(self._data)

    def _write(self, data: Any) -> None:
        assert self._fd is not None
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.write(self._fd, view[written:])

    def write(self, data: Any) -> None:
        """Take the next fragment (copied: the caller may reuse its buffer)."""
        self.dataset_size += len(data)
        if self._fd is not None:
            self._write(data)
            return
        self._data += data
        if self.dataset_size > SPILL_BYTES:
            self._open()
            self._data = bytearray()

    def _parse(self) -> InstanceHeader:
        if self._data or not self.dataset_size:
            if walks_raw(self.transfer_syntax_uid):
                return parse_dataset(self._data, 0, self.transfer_syntax_uid, self.sop_class_uid,
                                     self.sop_instance_uid)
            return parse_with_pydicom(self.meta + bytes(self._data), self.sop_class_uid, self.sop_instance_uid)
        assert self.tmp is not None  # spilled: the dataset is in its temporary file
        if not walks_raw(self.transfer_syntax_uid):
            return parse_with_pydicom(self.tmp.read_bytes(), self.sop_class_uid, self.sop_instance_uid)
        with open(self.tmp, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return parse_dataset(view, self.meta_size, self.transfer_syntax_uid, self.sop_class_uid,
                                 self.sop_instance_uid)

    @property
    def in_memory(self) -> bool:
        """Whether the whole instance is held in memory (then `parts` are its file's bytes)."""
        return self._fd is None

    @property
    def parts(self) -> tuple[bytes, bytearray]:
        return self.meta, self._data

    def check(self) -> tuple[str, InstanceHeader]:
        """Check an instance held in memory (InvalidInstance) without writing it: its final path, header."""
        header = self._parse()
        return instance_path(self.spool_dir, header), header

    def commit(self) -> tuple[Path, InstanceHeader]:
        """Check the instance (InvalidInstance), then make it durable under its final name (OSError)."""
        header = self._parse()
        path = Path(instance_path(self.spool_dir, header))
        if self._fd is None:  # held in memory until now: written straight into its folder
            self._ensure_folder(path.parent)
            try:
                self._open(path.parent)
            except FileNotFoundError:  # retention removed the folder since it was known
                self._ensure_folder(path.parent, again=True)
                self._open(path.parent)
        assert self._fd is not None and self.tmp is not None
        self._data = bytearray()
        os.fdatasync(self._fd)  # the data, and the size that reaches it
        os.close(self._fd)
        self._fd = None
        try:
            self._ensure_folder(path.parent)
            os.rename(self.tmp, path)
        except FileNotFoundError:
            self._ensure_folder(path.parent, again=True)
            os.rename(self.tmp, path)
        self._created = False
        fsync_dir(path.parent)
        return path, header

    def _ensure_folder(self, folder: Path, again: bool = False) -> None:
        if again:
            _folders.forget(folder)
        _folders.ensure(folder, self.spool_dir)

    def discard(self) -> None:
        self._data = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._created:
            self._created = False
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass
